//! Shared helpers of the integration tests: a real daemon in a temporary state directory,
//! the CLI, real external clients, and image fixtures.
#![allow(dead_code)]

pub mod vm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The imgcache binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgcache")
}

/// A fresh temporary directory on tmpfs when there is one (fast and page-cache friendly).
pub fn tempdir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::Builder::new()
            .prefix("imgcache-test-")
            .tempdir_in(base)
            .expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

/// A daemon running on its own state directory; stopped (SIGTERM) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    /// The extra `serve` arguments, reused by [`Daemon::restart`].
    extra: Vec<String>,
}

impl Daemon {
    /// Start `imgcache serve` with NBD on the unix socket only, and wait until it listens.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_in(tempdir(), extra)
    }

    /// Start with a configuration file holding `toml` (written to `DIR/imgcache.toml`).
    pub fn start_with_config(toml: &str) -> Daemon {
        let dir = tempdir();
        let path = dir.path().join("imgcache.toml");
        std::fs::write(&path, toml).unwrap();
        let path = path.to_str().unwrap().to_string();
        Daemon::start_in(dir, &["--config", &path])
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let state = dir.path().join("state");
        let mut d = Daemon {
            child: None,
            dir,
            state,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let extra = self.extra.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(bin())
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--nbd-tcp", "off"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn imgcache serve");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.control_sock().exists() && self.nbd_sock().exists() {
                let out = self.cli(&["image", "list"]);
                if out.status.success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("daemon not ready after 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop with SIGTERM and start again on the same state directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGTERM and wait (at most 10 s, then SIGKILL). Returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on a pid we own; no memory is touched.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "daemon did not stop within 10 s of SIGTERM; log:\n{}",
            self.log()
        );
    }

    /// SIGKILL the daemon (no shutdown at all) and start it again on the same state.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn control_sock(&self) -> PathBuf {
        self.state.join("control.sock")
    }

    pub fn nbd_sock(&self) -> PathBuf {
        self.state.join("nbd.sock")
    }

    /// The default FUSE mount point.
    pub fn mnt(&self) -> PathBuf {
        self.state.join("mnt")
    }

    /// The NBD URI of an export, e.g. `nbd+unix:///images/NAME?socket=...`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock().display())
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("IMGCACHE_STATE_DIR", &self.state)
            .env_remove("IMGCACHE_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run imgcache")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "imgcache {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run the CLI and require failure; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "imgcache {args:?} succeeded but should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `image show NAME --json` parsed.
    pub fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["image", "show", name, "--json"])).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on a pid we own; no memory is touched.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = child.try_wait().ok().flatten().is_some();
                if !exited {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A daemon killed with its FUSE mount leaves it dead; don't leave it behind.
        let mnt = self.mnt();
        if std::fs::metadata(&mnt).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) {
            let _ = imgcache::export::fuse::detach(&mnt);
        }
    }
}

/// Whether an external tool is installed (the test suite's script installs them).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run an external command and require success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small deterministic PRNG (xorshift64*), so fixtures are reproducible without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Write an image of `size` bytes of pseudo-random data with the given byte ranges zeroed.
pub fn write_image(path: &Path, size: u64, zero: &[(u64, u64)], seed: u64) {
    let mut data = vec![0u8; size as usize];
    Rng::new(seed).fill(&mut data);
    for &(off, len) in zero {
        let end = (off + len).min(size) as usize;
        data[off as usize..end].fill(0);
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
}
