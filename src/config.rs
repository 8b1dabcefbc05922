//! Daemon configuration: the TOML file, command-line overrides, built-in defaults.
//!
//! [`FileConfig`] is the file as written (every key optional, unknown keys rejected);
//! [`Overrides`] are the `imgcache serve` flags; [`Config::resolve`] merges them (flags win
//! over the file, the file over the defaults) and validates everything once, so the rest of
//! the daemon only ever sees a [`Config`] whose addresses parse and whose chunk size is legal.
//!
//! Defaults: the state directory is `/var/lib/imgcache` for root, otherwise
//! `$XDG_STATE_HOME/imgcache` or `~/.local/state/imgcache`; it holds `catalog.redb`,
//! `store/`, `control.sock`, `nbd.sock` and `lock`. NBD over TCP listens on
//! `127.0.0.1:10809` unless set to `off`. The FUSE export is mounted on `STATE_DIR/mnt` when
//! `/dev/fuse` is usable (see [`FuseMountSetting`]).
//!
//! Stores: `[stores.NAME]` tables are [`StoreSpec`]s (`docs/stores.md`); the built-in store
//! `local` (a `dir` store at `STATE/store`) always exists and cannot be redefined.
//! Cache: the `[cache]` table ([`CacheFileConfig`]); the cache lives in `STATE/cache` and is
//! bounded to [`DEFAULT_CACHE_MAX`] unless `max-size` says otherwise (a size such as `"50G"`
//! or a percentage of the file system holding the cache, such as `"25%"`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::cache::CacheConfig;
use crate::store::spec::StoreSpec;

use crate::error::{Classify, ErrorKind};
use crate::types::{format_size, parse_size, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The default NBD TCP listen address (the IANA NBD port, loopback only).
pub const DEFAULT_NBD_TCP: &str = "127.0.0.1:10809";
/// The default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The name of the built-in store.
pub const LOCAL_STORE: &str = "local";
/// Default chunk fetches in flight (`[cache] fetch-concurrency`).
pub const DEFAULT_FETCH_CONCURRENCY: usize = 32;
/// Default read-ahead window (`[cache] readahead-chunks`).
pub const DEFAULT_READAHEAD_CHUNKS: u64 = 32;
/// Default chunk size of raw objects registered by `--url`: small enough that a scattered
/// 4 KiB read costs little more than one round trip, large enough to keep per-chunk memory
/// low (a 100 GiB object is 800 Ki chunks).
pub const DEFAULT_OBJECT_CHUNK_SIZE: u32 = 128 * 1024;
/// The default bound of the chunk cache.
pub const DEFAULT_CACHE_MAX: u64 = 10 << 30;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Errors of loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `message` is toml's own (it names unknown keys and lists the valid ones).
    #[error("config file {}{}: {message}", path.display(), location.as_deref().unwrap_or(""))]
    Parse {
        path: PathBuf,
        /// `:LINE:COLUMN`, when known.
        location: Option<String>,
        message: String,
    },
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot determine the default state directory: HOME is not set (use --state-dir)")]
    NoHome,
}

impl Classify for ConfigError {
    fn kind(&self) -> ErrorKind {
        match self {
            ConfigError::Read { source, .. } => ErrorKind::of_io(source),
            _ => ErrorKind::InvalidInput,
        }
    }
}

/// The configuration file as written. Every key is optional.
///
/// ```toml
/// state-dir = "/var/lib/imgcache"
/// nbd-tcp = "127.0.0.1:10809"   # or "off"
/// nbd-socket = "/run/imgcache/nbd.sock"
/// control-socket = "/run/imgcache/control.sock"
/// log-level = "info"            # or a tracing filter such as "imgcache=debug"
/// default-chunk-size = "1M"     # or a number of bytes
/// nbd-busy-poll = "50us"        # default "off"; see `Config::nbd_busy_poll`
/// fuse-mount = "/run/imgcache/mnt"  # or "off"; default STATE_DIR/mnt when /dev/fuse works
///
/// [cache]
/// dir = "/var/cache/imgcache"   # default STATE/cache
/// max-size = "50G"              # or "25%" of the file system; default 10G
/// high-watermark = 0.95
/// low-watermark = 0.80
/// fetch-concurrency = 32
/// fetch-timeout = "30s"
/// read-timeout = "60s"
/// readahead-chunks = 32
///
/// [stores.web]
/// type = "http"
/// url = "https://images.example.com/v1"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub nbd_tcp: Option<String>,
    pub nbd_socket: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub log_level: Option<String>,
    #[serde(default, deserialize_with = "size_value")]
    pub default_chunk_size: Option<String>,
    pub nbd_busy_poll: Option<String>,
    pub fuse_mount: Option<String>,
    #[serde(default)]
    pub cache: CacheFileConfig,
    #[serde(default)]
    pub stores: BTreeMap<String, StoreSpec>,
}

/// The `[cache]` table as written. Every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheFileConfig {
    pub dir: Option<PathBuf>,
    /// A size (`"50G"`, bytes) or a percentage of the cache file system (`"25%"`).
    #[serde(default, deserialize_with = "size_value")]
    pub max_size: Option<String>,
    pub high_watermark: Option<f64>,
    pub low_watermark: Option<f64>,
    pub fetch_concurrency: Option<usize>,
    pub fetch_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub readahead_chunks: Option<u64>,
}

/// Command-line overrides of `imgcache serve` (and the environment variables clap maps to them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    /// An address or `off`.
    pub nbd_tcp: Option<String>,
    pub nbd_socket: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub log_level: Option<String>,
    pub default_chunk_size: Option<String>,
    /// A directory or `off`.
    pub fuse_mount: Option<String>,
    /// A duration such as `50us`, or `off`.
    pub nbd_busy_poll: Option<String>,
}

/// The validated daemon configuration. All paths are absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// `None`: no TCP listener.
    pub nbd_tcp: Option<SocketAddr>,
    pub nbd_socket: PathBuf,
    pub control_socket: PathBuf,
    /// A `tracing_subscriber::EnvFilter` directive string.
    pub log_level: String,
    /// Chunk size for imports that do not choose one, in bytes.
    pub default_chunk_size: u32,
    /// Where to mount the FUSE export, if anywhere.
    pub fuse_mount: FuseMountSetting,
    /// The chunk cache settings (`max_bytes` resolved).
    pub cache: CacheConfig,
    /// Configured stores by name, validated; `local` is not among them (it is built in).
    pub stores: BTreeMap<String, StoreSpec>,
    /// Longest an NBD connection polls its socket after answering small requests, before
    /// sleeping (adaptive: see `NbdServer::with_busy_poll`); zero disables polling.
    pub nbd_busy_poll: std::time::Duration,
}

/// Which cache size the config asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    Bytes(u64),
    /// A fraction (0, 1] of the file system holding the cache directory.
    Fraction(f64),
}

/// Where the FUSE export is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuseMountSetting {
    /// No FUSE export (`fuse-mount = "off"`).
    Off,
    /// The default `STATE_DIR/mnt`: mounted when `/dev/fuse` is usable, otherwise the daemon
    /// warns and runs without it.
    Default(PathBuf),
    /// Set by the operator: failing to mount it is a start-up error.
    Required(PathBuf),
}

impl FuseMountSetting {
    /// The mount point, unless off.
    pub fn path(&self) -> Option<&Path> {
        match self {
            FuseMountSetting::Off => None,
            FuseMountSetting::Default(p) | FuseMountSetting::Required(p) => Some(p),
        }
    }
}

impl Config {
    /// Read `file` (if given), apply `overrides`, validate.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (parsed, base) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let parsed = FileConfig::parse(&text, path)?;
                let base = absolute(path.parent().unwrap_or(Path::new(".")));
                (parsed, base)
            }
            None => (FileConfig::default(), current_dir()),
        };
        Config::resolve(&parsed, &base, overrides, default_state_dir)
    }

    /// Merge `file` (relative paths resolved against `file_base`), `overrides` (relative
    /// paths resolved against the current directory) and defaults, and validate.
    /// `default_state_dir` is only called when neither sets the state directory.
    pub fn resolve(
        file: &FileConfig,
        file_base: &Path,
        overrides: &Overrides,
        default_state_dir: impl FnOnce() -> Result<PathBuf, ConfigError>,
    ) -> Result<Config, ConfigError> {
        let cwd = current_dir();
        let pick = |flag: &Option<PathBuf>, key: &Option<PathBuf>| -> Option<PathBuf> {
            flag.as_ref()
                .map(|p| cwd.join(p))
                .or_else(|| key.as_ref().map(|p| file_base.join(p)))
        };
        let state_dir = match pick(&overrides.state_dir, &file.state_dir) {
            Some(dir) => dir,
            None => default_state_dir()?,
        };
        let nbd_socket = pick(&overrides.nbd_socket, &file.nbd_socket)
            .unwrap_or_else(|| state_dir.join("nbd.sock"));
        let control_socket = pick(&overrides.control_socket, &file.control_socket)
            .unwrap_or_else(|| state_dir.join("control.sock"));
        for (key, path) in [
            ("nbd-socket", &nbd_socket),
            ("control-socket", &control_socket),
        ] {
            check_socket_path(key, path)?;
        }

        let nbd_tcp_text = overrides
            .nbd_tcp
            .as_deref()
            .or(file.nbd_tcp.as_deref())
            .unwrap_or(DEFAULT_NBD_TCP);
        let nbd_tcp = parse_nbd_tcp(nbd_tcp_text).map_err(|reason| ConfigError::Invalid {
            key: "nbd-tcp",
            value: nbd_tcp_text.to_string(),
            reason,
        })?;

        let log_level = overrides
            .log_level
            .clone()
            .or_else(|| file.log_level.clone())
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            return Err(ConfigError::Invalid {
                key: "log-level",
                value: log_level,
                reason: format!("{e} (use error, warn, info, debug, trace or a tracing filter)"),
            });
        }

        let default_chunk_size = match overrides
            .default_chunk_size
            .as_deref()
            .or(file.default_chunk_size.as_deref())
        {
            None => DEFAULT_CHUNK_SIZE,
            Some(text) => parse_chunk_size(text).map_err(|reason| ConfigError::Invalid {
                key: "default-chunk-size",
                value: text.to_string(),
                reason,
            })?,
        };

        let fuse_mount = match (&overrides.fuse_mount, &file.fuse_mount) {
            (Some(flag), _) => fuse_setting(flag, &cwd),
            (None, Some(key)) => fuse_setting(key, file_base),
            (None, None) => FuseMountSetting::Default(state_dir.join("mnt")),
        };
        let cache = resolve_cache(&file.cache, file_base, &state_dir)?;
        for (name, spec) in &file.stores {
            if name == LOCAL_STORE || name == "url" {
                return Err(ConfigError::Invalid {
                    key: "stores",
                    value: name.clone(),
                    reason: "\"local\" (the built-in store) and \"url\" (images added by --url) are reserved; choose another name"
                        .into(),
                });
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::Invalid {
                    key: "stores",
                    value: name.clone(),
                    reason: "a store name is letters, digits, - and _".into(),
                });
            }
            spec.validate(name).map_err(|e| ConfigError::Invalid {
                key: "stores",
                value: name.clone(),
                reason: crate::error::chain(&e),
            })?;
        }
        let mut stores = file.stores.clone();
        for spec in stores.values_mut() {
            if let StoreSpec::Dir { path, .. } = spec {
                *path = file_base.join(&*path);
            }
        }
        let nbd_busy_poll = match overrides
            .nbd_busy_poll
            .as_deref()
            .or(file.nbd_busy_poll.as_deref())
        {
            None => DEFAULT_NBD_BUSY_POLL,
            Some(text) => parse_busy_poll(text).map_err(|reason| ConfigError::Invalid {
                key: "nbd-busy-poll",
                value: text.to_string(),
                reason,
            })?,
        };

        Ok(Config {
            state_dir,
            nbd_tcp,
            nbd_socket,
            control_socket,
            log_level,
            default_chunk_size,
            fuse_mount,
            cache,
            stores,
            nbd_busy_poll,
        })
    }

    /// The catalog database file.
    pub fn catalog_path(&self) -> PathBuf {
        self.state_dir.join("catalog.redb")
    }

    /// The root of the local image store.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    /// The lock file that keeps a second daemon off this state directory.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("lock")
    }
}

impl FileConfig {
    /// Parse TOML `text` read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let location = e.span().map(|span| {
                let (line, column) = line_column(text, span.start);
                format!(":{line}:{column}")
            });
            ConfigError::Parse {
                path: path.to_path_buf(),
                location,
                message: e.message().trim().to_string(),
            }
        })
    }
}

/// Default of [`Config::nbd_busy_poll`].
/// Off: in A/B runs on a loaded 2-core host it helped 4K random reads by 0–30 % in some
/// runs and cost as much in others, and it burns CPU that VMs could use.
pub const DEFAULT_NBD_BUSY_POLL: std::time::Duration = std::time::Duration::ZERO;

/// A busy-poll duration: `off`, `0`, or a duration of at most one millisecond (`50us`).
fn parse_busy_poll(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    if t == "off" || t == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("{e} (use a duration such as 50us, or off)"))?;
    if d > std::time::Duration::from_millis(1) {
        return Err("at most 1ms".to_string());
    }
    Ok(d)
}

/// The default state directory for the current user.
pub fn default_state_dir() -> Result<PathBuf, ConfigError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    state_dir_for(
        euid,
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// The default state directory for user `euid` given `XDG_STATE_HOME` and `HOME`.
pub fn state_dir_for(
    euid: u32,
    xdg_state_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf, ConfigError> {
    if euid == 0 {
        return Ok(PathBuf::from("/var/lib/imgcache"));
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(x) = xdg_state_home.filter(|x| x.is_absolute()) {
        return Ok(x.join("imgcache"));
    }
    match home.filter(|h| h.is_absolute()) {
        Some(h) => Ok(h.join(".local/state/imgcache")),
        None => Err(ConfigError::NoHome),
    }
}

fn resolve_cache(
    c: &CacheFileConfig,
    file_base: &Path,
    state_dir: &Path,
) -> Result<CacheConfig, ConfigError> {
    let dir = c
        .dir
        .as_ref()
        .map(|d| file_base.join(d))
        .unwrap_or_else(|| state_dir.join("cache"));
    let size = match c.max_size.as_deref() {
        None => CacheSize::Bytes(DEFAULT_CACHE_MAX),
        Some(text) => parse_cache_size(text).map_err(|reason| ConfigError::Invalid {
            key: "cache.max-size",
            value: text.to_string(),
            reason,
        })?,
    };
    let max_bytes = match size {
        CacheSize::Bytes(n) => n,
        CacheSize::Fraction(f) => {
            // The cache directory may not exist yet: measure its nearest existing ancestor.
            let probe = dir
                .ancestors()
                .find(|p| p.exists())
                .unwrap_or(Path::new("/"));
            let total = crate::sys::fs_total_bytes(probe).map_err(|e| ConfigError::Invalid {
                key: "cache.max-size",
                value: format!("{}%", f * 100.0),
                reason: format!("cannot measure the file system of {}: {e}", probe.display()),
            })?;
            (total as f64 * f) as u64
        }
    };
    let mut cfg = CacheConfig::new(dir, max_bytes);
    // Measured in benches/lazy.sh (20 ms, 400 Mbit/s): these keep the link full.
    cfg.fetch_concurrency = DEFAULT_FETCH_CONCURRENCY;
    cfg.readahead_chunks = DEFAULT_READAHEAD_CHUNKS;
    let frac = |key: &'static str, v: Option<f64>, default: f64| -> Result<f64, ConfigError> {
        match v {
            None => Ok(default),
            Some(x) if x > 0.0 && x <= 1.0 => Ok(x),
            Some(x) => Err(ConfigError::Invalid {
                key,
                value: x.to_string(),
                reason: "must be a fraction above 0 and at most 1 (e.g. 0.95)".into(),
            }),
        }
    };
    cfg.high_watermark = frac("cache.high-watermark", c.high_watermark, cfg.high_watermark)?;
    cfg.low_watermark = frac("cache.low-watermark", c.low_watermark, cfg.low_watermark)?;
    if cfg.low_watermark >= cfg.high_watermark {
        return Err(ConfigError::Invalid {
            key: "cache.low-watermark",
            value: cfg.low_watermark.to_string(),
            reason: format!("must be below high-watermark ({})", cfg.high_watermark),
        });
    }
    if let Some(n) = c.fetch_concurrency {
        if n == 0 || n > 1024 {
            return Err(ConfigError::Invalid {
                key: "cache.fetch-concurrency",
                value: n.to_string(),
                reason: "must be from 1 to 1024".into(),
            });
        }
        cfg.fetch_concurrency = n;
        cfg.reserved_for_demand = cfg.reserved_for_demand.min(n / 2);
    }
    let duration = |key: &'static str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(ConfigError::Invalid {
                key,
                value: text.clone(),
                reason: "must be more than 0s".into(),
            }),
            Err(e) => Err(ConfigError::Invalid {
                key,
                value: text.clone(),
                reason: format!("{e}: write it like \"10s\", \"500ms\" or \"2m\""),
            }),
        },
    };
    cfg.fetch_timeout = duration("cache.fetch-timeout", &c.fetch_timeout, cfg.fetch_timeout)?;
    cfg.read_timeout = duration("cache.read-timeout", &c.read_timeout, cfg.read_timeout)?;
    if let Some(n) = c.readahead_chunks {
        if n > 1024 {
            return Err(ConfigError::Invalid {
                key: "cache.readahead-chunks",
                value: n.to_string(),
                reason: "must be at most 1024 (0 turns read-ahead off)".into(),
            });
        }
        cfg.readahead_chunks = n;
    }
    Ok(cfg)
}

/// Parse a cache size: `"50G"`, a number of bytes, or `"25%"` of the file system.
pub fn parse_cache_size(text: &str) -> Result<CacheSize, String> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        return match pct.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => Ok(CacheSize::Fraction(p / 100.0)),
            _ => Err("a percentage must be above 0% and at most 100% (e.g. \"25%\")".into()),
        };
    }
    let n = parse_size(t)?;
    if n < 16 << 20 {
        return Err("the cache needs at least 16M (e.g. \"10G\" or \"25%\")".into());
    }
    Ok(CacheSize::Bytes(n))
}

/// Parse an NBD TCP setting: `off` (no listener) or `HOST:PORT` with a numeric host.
pub fn parse_nbd_tcp(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        "expected an address such as 127.0.0.1:10809 or [::1]:10809, or \"off\"".to_string()
    })
}

/// Parse a chunk size (`1M`, `65536`) and check that it is a power of two in range.
pub fn parse_chunk_size(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text)?;
    check_chunk_size(bytes)
}

/// Check that `bytes` is a power of two between the minimum and maximum chunk sizes.
pub fn check_chunk_size(bytes: u64) -> Result<u32, String> {
    if !bytes.is_power_of_two()
        || bytes < u64::from(MIN_CHUNK_SIZE)
        || bytes > u64::from(MAX_CHUNK_SIZE)
    {
        return Err(format!(
            "chunk size must be a power of two from {} to {} (e.g. 64K, 1M, 4M)",
            format_size(MIN_CHUNK_SIZE.into()),
            format_size(MAX_CHUNK_SIZE.into())
        ));
    }
    Ok(bytes as u32)
}

/// `off`, or a directory (relative ones are resolved against `base`).
fn fuse_setting(text: &str, base: &Path) -> FuseMountSetting {
    if text.eq_ignore_ascii_case("off") {
        FuseMountSetting::Off
    } else {
        FuseMountSetting::Required(base.join(text))
    }
}

fn check_socket_path(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ConfigError::Invalid {
            key,
            value: path.display().to_string(),
            reason: format!(
                "a unix socket path can be at most {MAX_SOCKET_PATH} bytes, this one has {len}"
            ),
        });
    }
    Ok(())
}

/// Accept a size either as a TOML string (`"1M"`) or a TOML integer (bytes).
fn size_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct SizeVisitor;
    impl serde::de::Visitor<'_> for SizeVisitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"1M\" or a number of bytes")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(SizeVisitor)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn current_dir() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
}

fn absolute(p: &Path) -> PathBuf {
    if p.as_os_str().is_empty() {
        current_dir()
    } else {
        current_dir().join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(file: &FileConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::resolve(file, Path::new("/etc/imgcache"), overrides, || {
            Ok(PathBuf::from("/state"))
        })
    }

    #[test]
    fn unknown_key_is_rejected_naming_key_and_file() {
        let err = FileConfig::parse(
            "state-dir = \"/x\"\nnbd-port = 1\n",
            Path::new("/etc/i.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nbd-port"), "{err}");
        assert!(err.contains("/etc/i.toml:2:1"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn all_keys_parse() {
        let text = r#"
            state-dir = "/srv/ic"
            nbd-tcp = "off"
            nbd-socket = "nbd.sock"
            control-socket = "/run/ic.sock"
            log-level = "debug"
            default-chunk-size = "4M"
            fuse-mount = "mnt"
        "#;
        let file = FileConfig::parse(text, Path::new("c.toml")).unwrap();
        let cfg = resolve(&file, &Overrides::default()).unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/ic"));
        assert_eq!(cfg.nbd_tcp, None);
        assert_eq!(cfg.nbd_socket, PathBuf::from("/etc/imgcache/nbd.sock"));
        assert_eq!(cfg.control_socket, PathBuf::from("/run/ic.sock"));
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.default_chunk_size, 4 << 20);
        assert_eq!(
            cfg.fuse_mount,
            FuseMountSetting::Required(PathBuf::from("/etc/imgcache/mnt"))
        );
    }

    #[test]
    fn empty_config_gives_defaults_under_state_dir() {
        let cfg = resolve(&FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/state"));
        assert_eq!(cfg.control_socket, PathBuf::from("/state/control.sock"));
        assert_eq!(cfg.nbd_socket, PathBuf::from("/state/nbd.sock"));
        assert_eq!(cfg.nbd_tcp, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(cfg.default_chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(cfg.catalog_path(), PathBuf::from("/state/catalog.redb"));
        assert_eq!(
            cfg.fuse_mount,
            FuseMountSetting::Default(PathBuf::from("/state/mnt"))
        );
    }

    #[test]
    fn fuse_mount_off_flag_overrides_file() {
        let file = FileConfig {
            fuse_mount: Some("/srv/mnt".into()),
            ..FileConfig::default()
        };
        let overrides = Overrides {
            fuse_mount: Some("OFF".into()),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(&file, &overrides).unwrap().fuse_mount,
            FuseMountSetting::Off
        );
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig {
            state_dir: Some("/from-file".into()),
            nbd_tcp: Some("127.0.0.1:1".into()),
            ..FileConfig::default()
        };
        let overrides = Overrides {
            state_dir: Some("/from-flag".into()),
            nbd_tcp: Some("off".into()),
            ..Overrides::default()
        };
        let cfg = resolve(&file, &overrides).unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/from-flag"));
        assert_eq!(cfg.nbd_tcp, None);
    }

    #[test]
    fn cache_and_stores_parse_and_resolve() {
        let text = r#"
            [cache]
            max-size = "2G"
            low-watermark = 0.5
            fetch-concurrency = 4
            fetch-timeout = "2s"
            read-timeout = "3s"
            readahead-chunks = 0
            [stores.web]
            type = "http"
            url = "http://127.0.0.1:8080/images"
            [stores.near]
            type = "dir"
            path = "mirror"
        "#;
        let file = FileConfig::parse(text, Path::new("c.toml")).unwrap();
        let cfg = resolve(&file, &Overrides::default()).unwrap();
        assert_eq!(cfg.cache.dir, PathBuf::from("/state/cache"));
        assert_eq!(cfg.cache.max_bytes, 2 << 30);
        assert_eq!(cfg.cache.low_watermark, 0.5);
        assert_eq!(cfg.cache.high_watermark, 0.95);
        assert_eq!(cfg.cache.fetch_concurrency, 4);
        assert_eq!(cfg.cache.fetch_timeout, Duration::from_secs(2));
        assert_eq!(cfg.cache.read_timeout, Duration::from_secs(3));
        assert_eq!(cfg.cache.readahead_chunks, 0);
        assert_eq!(cfg.stores.len(), 2);
        assert!(matches!(&cfg.stores["near"], StoreSpec::Dir { path, .. }
            if path == Path::new("/etc/imgcache/mirror")));
    }

    #[test]
    fn cache_defaults_to_state_dir_and_10g() {
        let cfg = resolve(&FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(cfg.cache.dir, PathBuf::from("/state/cache"));
        assert_eq!(cfg.cache.max_bytes, DEFAULT_CACHE_MAX);
    }

    #[test]
    fn cache_size_as_percentage_is_accepted() {
        assert_eq!(parse_cache_size("25%"), Ok(CacheSize::Fraction(0.25)));
        assert!(parse_cache_size("0%").is_err());
        assert!(parse_cache_size("150%").is_err());
        assert!(parse_cache_size("1K").unwrap_err().contains("16M"));
    }

    #[test]
    fn inverted_watermarks_are_rejected() {
        let file = FileConfig::parse(
            "[cache]\nhigh-watermark = 0.5\nlow-watermark = 0.6\n",
            Path::new("c"),
        )
        .unwrap();
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.low-watermark"), "{err}");
        assert!(err.contains("below high-watermark"), "{err}");
    }

    #[test]
    fn bad_fetch_timeout_is_rejected() {
        let file =
            FileConfig::parse("[cache]\nfetch-timeout = \"soon\"\n", Path::new("c")).unwrap();
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.fetch-timeout"), "{err}");
    }

    #[test]
    fn store_named_local_is_rejected() {
        let file = FileConfig::parse(
            "[stores.local]\ntype = \"dir\"\npath = \"/x\"\n",
            Path::new("c"),
        )
        .unwrap();
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn invalid_store_spec_is_rejected_at_load() {
        let file = FileConfig::parse(
            "[stores.web]\ntype = \"http\"\nurl = \"http://x/\"\nmax-concurrency = 0\n",
            Path::new("c"),
        )
        .unwrap();
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max-concurrency"), "{err}");
    }

    #[test]
    fn nbd_busy_poll_defaults_parses_durations_and_off_and_rejects_junk() {
        let cfg = resolve(&FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(cfg.nbd_busy_poll, DEFAULT_NBD_BUSY_POLL);
        let file = FileConfig::parse("nbd-busy-poll = \"20us\"", Path::new("c")).unwrap();
        let cfg = resolve(&file, &Overrides::default()).unwrap();
        assert_eq!(cfg.nbd_busy_poll, std::time::Duration::from_micros(20));
        let off = Overrides {
            nbd_busy_poll: Some("off".into()),
            ..Overrides::default()
        };
        assert!(resolve(&file, &off).unwrap().nbd_busy_poll.is_zero());
        for bad in ["fast", "2s", "-5us"] {
            let o = Overrides {
                nbd_busy_poll: Some(bad.into()),
                ..Overrides::default()
            };
            let err = resolve(&FileConfig::default(), &o).unwrap_err().to_string();
            assert!(err.contains("nbd-busy-poll"), "{bad}: {err}");
        }
    }

    #[test]
    fn integer_chunk_size_is_accepted() {
        let file = FileConfig::parse("default-chunk-size = 65536", Path::new("c")).unwrap();
        assert_eq!(file.default_chunk_size.as_deref(), Some("65536"));
    }

    #[test]
    fn chunk_size_not_power_of_two_is_rejected() {
        let file = FileConfig {
            default_chunk_size: Some("3M".into()),
            ..FileConfig::default()
        };
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("default-chunk-size"), "{err}");
        assert!(err.contains("power of two"), "{err}");
    }

    #[test]
    fn chunk_size_out_of_range_is_rejected() {
        assert!(parse_chunk_size("32K").is_err());
        assert!(parse_chunk_size("32M").is_err());
        assert_eq!(parse_chunk_size("64K"), Ok(65536));
        assert_eq!(parse_chunk_size("16M"), Ok(16 << 20));
    }

    #[test]
    fn bad_nbd_address_is_rejected() {
        let file = FileConfig {
            nbd_tcp: Some("localhost".into()),
            ..FileConfig::default()
        };
        let err = resolve(&file, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nbd-tcp"), "{err}");
        assert!(err.contains("\"localhost\""), "{err}");
    }

    #[test]
    fn bad_log_level_is_rejected() {
        let overrides = Overrides {
            log_level: Some("info,=[".into()),
            ..Overrides::default()
        };
        let err = resolve(&FileConfig::default(), &overrides).unwrap_err();
        assert!(err.to_string().contains("log-level"), "{err}");
    }

    #[test]
    fn overlong_socket_path_is_rejected() {
        let overrides = Overrides {
            state_dir: Some(PathBuf::from("/").join("d".repeat(120))),
            ..Overrides::default()
        };
        let err = resolve(&FileConfig::default(), &overrides).unwrap_err();
        assert!(err.to_string().contains("at most 107 bytes"), "{err}");
    }

    #[test]
    fn default_state_dir_depends_on_user() {
        let dir = |euid, xdg: Option<&str>, home: Option<&str>| {
            state_dir_for(euid, xdg.map(PathBuf::from), home.map(PathBuf::from))
        };
        assert_eq!(
            dir(0, Some("/x"), Some("/root")).unwrap(),
            PathBuf::from("/var/lib/imgcache")
        );
        assert_eq!(
            dir(1000, Some("/x"), Some("/home/u")).unwrap(),
            PathBuf::from("/x/imgcache")
        );
        assert_eq!(
            dir(1000, Some("rel"), Some("/home/u")).unwrap(),
            PathBuf::from("/home/u/.local/state/imgcache")
        );
        assert!(dir(1000, None, None).is_err());
    }
}
