//! Store configuration: [`StoreSpec`] and [`open_store`].
//!
//! A spec names one backend (`type = "dir" | "http" | "s3"`) with its connection fields and
//! the policy fields every kind shares (`timeout`, `retries`, `deadline`, `max-concurrency`).
//! [`StoreSpec::validate`] checks a spec once, with messages that say what to fix;
//! [`open_store`] validates, builds the backend and wraps it in [`RetryStore`], the policy
//! layer. [`parse_object_url`] turns the URL of one raw image object (`http(s)://…/file.raw`,
//! `s3://bucket/key`) into a spec plus the object's key. The TOML form is in `docs/stores.md`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dir::DirStore;
use super::object::{parse_http_url, RemoteStore, S3Config};
use super::retry::{RetryPolicy, RetryStore};
use super::{validate_key, Store, StoreError};

/// The configuration of one store.
///
/// Durations are written like `"10s"`, `"500ms"`, `"2m"`. Unset policy fields take the
/// defaults of [`RetryPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum StoreSpec {
    /// A local directory.
    #[serde(rename_all = "kebab-case")]
    Dir {
        path: PathBuf,
        #[serde(default, with = "opt_duration")]
        timeout: Option<Duration>,
        #[serde(default, with = "opt_duration")]
        deadline: Option<Duration>,
        retries: Option<u32>,
        max_concurrency: Option<usize>,
    },
    /// A plain HTTP(S) server, read-only; objects are `url/key`.
    #[serde(rename_all = "kebab-case")]
    Http {
        url: String,
        #[serde(default, with = "opt_duration")]
        timeout: Option<Duration>,
        #[serde(default, with = "opt_duration")]
        deadline: Option<Duration>,
        retries: Option<u32>,
        max_concurrency: Option<usize>,
    },
    /// An S3-compatible object store (AWS S3, Ceph RGW, MinIO).
    #[serde(rename_all = "kebab-case")]
    S3 {
        endpoint: Option<String>,
        region: Option<String>,
        bucket: String,
        #[serde(default)]
        prefix: String,
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        #[serde(default)]
        allow_http: bool,
        #[serde(default = "yes")]
        path_style: bool,
        #[serde(default)]
        anonymous: bool,
        #[serde(default, with = "opt_duration")]
        timeout: Option<Duration>,
        #[serde(default, with = "opt_duration")]
        deadline: Option<Duration>,
        retries: Option<u32>,
        max_concurrency: Option<usize>,
    },
}

fn yes() -> bool {
    true
}

/// The policy fields, the same for every kind.
struct PolicyFields {
    timeout: Option<Duration>,
    deadline: Option<Duration>,
    retries: Option<u32>,
    max_concurrency: Option<usize>,
}

impl StoreSpec {
    fn policy_fields(&self) -> PolicyFields {
        let (timeout, deadline, retries, max_concurrency) = match self {
            StoreSpec::Dir {
                timeout,
                deadline,
                retries,
                max_concurrency,
                ..
            }
            | StoreSpec::Http {
                timeout,
                deadline,
                retries,
                max_concurrency,
                ..
            }
            | StoreSpec::S3 {
                timeout,
                deadline,
                retries,
                max_concurrency,
                ..
            } => (timeout, deadline, retries, max_concurrency),
        };
        PolicyFields {
            timeout: *timeout,
            deadline: *deadline,
            retries: *retries,
            max_concurrency: *max_concurrency,
        }
    }

    /// The retry policy this spec asks for, defaults filled in.
    pub fn policy(&self) -> RetryPolicy {
        let f = self.policy_fields();
        let d = RetryPolicy::default();
        RetryPolicy {
            timeout: f.timeout.unwrap_or(d.timeout),
            retries: f.retries.unwrap_or(d.retries),
            deadline: f.deadline.unwrap_or(d.deadline),
            max_concurrency: f.max_concurrency.unwrap_or(d.max_concurrency),
            ..d
        }
    }

    /// Check the spec of the store called `name`, without I/O.
    pub fn validate(&self, name: &str) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidSpec {
            store: name.to_string(),
            reason,
            source: None,
        };
        let f = self.policy_fields();
        if f.max_concurrency == Some(0) {
            return Err(invalid("max-concurrency must be at least 1".into()));
        }
        if f.timeout == Some(Duration::ZERO) {
            return Err(invalid("timeout must be more than 0s".into()));
        }
        if f.deadline == Some(Duration::ZERO) {
            return Err(invalid("deadline must be more than 0s".into()));
        }
        match self {
            StoreSpec::Dir { path, .. } => {
                if path.as_os_str().is_empty() {
                    return Err(invalid("path is empty".into()));
                }
            }
            StoreSpec::Http { url, .. } => {
                parse_http_url(name, "url", url)?;
            }
            StoreSpec::S3 {
                bucket,
                endpoint,
                allow_http,
                ..
            } => {
                if bucket.is_empty() {
                    return Err(invalid("bucket is missing".into()));
                }
                if let Some(endpoint) = endpoint {
                    let url = parse_http_url(name, "endpoint", endpoint)?;
                    if url.scheme() == "http" && !allow_http {
                        return Err(invalid(format!(
                            "endpoint {endpoint:?} is plain http: set allow-http = true to permit it"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The S3 connection of an `s3` spec, environment not applied.
    fn s3_config(&self) -> Option<S3Config> {
        match self {
            StoreSpec::S3 {
                endpoint,
                region,
                bucket,
                prefix,
                access_key_id,
                secret_access_key,
                allow_http,
                path_style,
                anonymous,
                ..
            } => Some(S3Config {
                endpoint: endpoint.clone(),
                region: region.clone(),
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
                session_token: None,
                allow_http: *allow_http,
                path_style: *path_style,
                anonymous: *anonymous,
            }),
            _ => None,
        }
    }
}

/// Build the store called `name` from `spec`: validated, the backend wrapped in the policy
/// layer. Does no I/O beyond creating a `dir` store's directory.
pub fn open_store(name: &str, spec: &StoreSpec) -> Result<Arc<dyn Store>, StoreError> {
    spec.validate(name)?;
    let policy = spec.policy();
    let backend: Arc<dyn Store> = match spec {
        StoreSpec::Dir { path, .. } => Arc::new(DirStore::open(path.clone()).map_err(
            |source| StoreError::Io {
                key: path.display().to_string(),
                source,
            },
        )?),
        StoreSpec::Http { url, .. } => Arc::new(RemoteStore::http(name, url, policy.timeout)?),
        StoreSpec::S3 { .. } => {
            let config = spec
                .s3_config()
                .expect("an s3 spec has an s3 config")
                .with_env(|v| std::env::var(v).ok());
            Arc::new(RemoteStore::s3(name, &config, policy.timeout)?)
        }
    };
    Ok(Arc::new(RetryStore::new(backend, policy)))
}

/// One raw object named by URL: the spec of a store holding it, and its key there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub spec: StoreSpec,
    pub key: String,
}

/// Parse the URL of one object: `http(s)://host/dir/file.raw` (a read-only HTTP store on
/// `http(s)://host/dir`, key `file.raw`) or `s3://bucket/dir/file.raw` (an S3 store on
/// `bucket` with prefix `dir`, key `file.raw`; endpoint, region and credentials come from
/// the environment when the store is opened, and `allow-http` is set when `AWS_ENDPOINT_URL`
/// is a plain-http URL). The caller may adjust the spec before [`open_store`].
pub fn parse_object_url(url: &str) -> Result<ObjectUrl, StoreError> {
    parse_object_url_with_env(url, |v| std::env::var(v).ok())
}

fn parse_object_url_with_env(
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ObjectUrl, StoreError> {
    let invalid = |reason: String| StoreError::InvalidSpec {
        store: url.to_string(),
        reason,
        source: None,
    };
    let split = |path: &str| -> Result<(String, String), StoreError> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path.ends_with('/') {
            return Err(invalid(
                "the URL must name an object, not a directory or bucket".into(),
            ));
        }
        let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
        validate_key(file).map_err(|e| match e {
            StoreError::InvalidKey { reason, .. } => {
                invalid(format!("object name {file:?} is not usable: {reason}"))
            }
            other => other,
        })?;
        Ok((dir.to_string(), file.to_string()))
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("s3 URL has no bucket: use s3://BUCKET/KEY".into()));
        }
        let (prefix, key) = split(path)?;
        let allow_http = env("AWS_ENDPOINT_URL").is_some_and(|e| e.starts_with("http://"));
        let spec = StoreSpec::S3 {
            endpoint: None,
            region: None,
            bucket: bucket.to_string(),
            prefix,
            access_key_id: None,
            secret_access_key: None,
            allow_http,
            path_style: true,
            anonymous: false,
            timeout: None,
            deadline: None,
            retries: None,
            max_concurrency: None,
        };
        spec.validate(url)?;
        return Ok(ObjectUrl { spec, key });
    }
    let parsed = parse_http_url(url, "URL", url).map_err(|e| match e {
        StoreError::InvalidSpec { source, reason, .. } if url.contains("://") => {
            StoreError::InvalidSpec {
                store: url.to_string(),
                reason: format!("{reason} (use http://, https:// or s3://)"),
                source,
            }
        }
        _ => {
            invalid("not a URL: use http://HOST/PATH, https://HOST/PATH or s3://BUCKET/KEY".into())
        }
    })?;
    let (dir, key) = split(parsed.path())?;
    let mut base = parsed.clone();
    base.set_path(&dir);
    let spec = StoreSpec::Http {
        url: base.as_str().to_string(),
        timeout: None,
        deadline: None,
        retries: None,
        max_concurrency: None,
    };
    spec.validate(url)?;
    Ok(ObjectUrl { spec, key })
}

/// Open the store holding the object at `url` and return it with the object's key, ready for
/// `head` (its size) and `get_range`.
pub fn open_object_url(url: &str) -> Result<(Arc<dyn Store>, String), StoreError> {
    let object = parse_object_url(url)?;
    let store = open_store(url, &object.spec)?;
    Ok((store, object.key))
}

/// `Option<Duration>` as a human-readable string (`"10s"`, `"1m 30s"`).
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {t:?} ({e}): write it like \"10s\", \"500ms\" or \"2m\""
                ))
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};

    fn parse(toml_text: &str) -> Result<StoreSpec, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn s3_spec_parses_with_defaults() {
        let spec = parse(
            r#"
            type = "s3"
            endpoint = "http://127.0.0.1:9000"
            bucket = "images"
            prefix = "prod"
            allow-http = true
            timeout = "10s"
            max-concurrency = 8
            "#,
        )
        .unwrap();

        let policy = spec.policy();
        assert!(matches!(
            spec,
            StoreSpec::S3 {
                path_style: true,
                anonymous: false,
                ..
            }
        ));
        assert_eq!(policy.timeout, Duration::from_secs(10));
        assert_eq!(policy.max_concurrency, 8);
        assert_eq!(policy.retries, RetryPolicy::default().retries);
        spec.validate("s").unwrap();
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err =
            parse("type = \"http\"\nurl = \"http://127.0.0.1/\"\nbukket = \"x\"\n").unwrap_err();

        assert!(err.to_string().contains("bukket"), "{err}");
    }

    #[test]
    fn unknown_type_is_rejected() {
        let err = parse("type = \"ftp\"\nurl = \"x\"\n").unwrap_err();

        assert!(err.to_string().contains("ftp"), "{err}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let err =
            parse("type = \"http\"\nurl = \"http://127.0.0.1/\"\ntimeout = \"ten\"\n").unwrap_err();

        assert!(err.to_string().contains("\"10s\""), "{err}");
    }

    #[test]
    fn zero_concurrency_is_rejected() {
        let spec =
            parse("type = \"http\"\nurl = \"http://127.0.0.1/\"\nmax-concurrency = 0\n").unwrap();

        let err = spec.validate("web").unwrap_err();

        assert!(err.to_string().contains("max-concurrency"), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn bad_http_url_is_rejected() {
        let spec = parse("type = \"http\"\nurl = \"not a url\"\n").unwrap();

        let err = spec.validate("web").unwrap_err();

        assert!(err.to_string().contains("not a valid URL"), "{err}");
    }

    #[test]
    fn missing_bucket_is_rejected() {
        let err = parse("type = \"s3\"\nregion = \"us-east-1\"\n").unwrap_err();

        assert!(err.to_string().contains("bucket"), "{err}");
    }

    #[test]
    fn spec_round_trips_through_toml() {
        let spec = parse(
            "type = \"http\"\nurl = \"https://images.example/v1/\"\ntimeout = \"1m 30s\"\nretries = 2\n",
        )
        .unwrap();

        let again = parse(&toml::to_string(&spec).unwrap()).unwrap();

        assert_eq!(spec, again);
    }

    #[test]
    fn http_object_url_splits_into_base_and_key() {
        let object = parse_object_url("http://127.0.0.1:8000/images/debian-12.raw").unwrap();

        assert_eq!(object.key, "debian-12.raw");
        assert!(
            matches!(&object.spec, StoreSpec::Http { url, .. } if url == "http://127.0.0.1:8000/images"),
            "{:?}",
            object.spec
        );
    }

    #[test]
    fn s3_object_url_splits_into_bucket_prefix_and_key() {
        let object = parse_object_url_with_env("s3://images/base/debian-12.raw", |v| {
            (v == "AWS_ENDPOINT_URL").then(|| "http://127.0.0.1:5000".to_string())
        })
        .unwrap();

        assert_eq!(object.key, "debian-12.raw");
        match object.spec {
            StoreSpec::S3 {
                bucket,
                prefix,
                allow_http,
                ..
            } => {
                assert_eq!((bucket.as_str(), prefix.as_str()), ("images", "base"));
                assert!(allow_http);
            }
            other => panic!("not an s3 spec: {other:?}"),
        }
    }

    #[test]
    fn object_urls_that_name_no_object_are_rejected() {
        for (url, expect) in [
            ("s3://", "no bucket"),
            ("s3://bucket", "must name an object"),
            ("s3://bucket/dir/", "must name an object"),
            ("http://127.0.0.1/", "must name an object"),
            ("ftp://host/file.raw", "http://"),
            ("/local/file.raw", "not a URL"),
            ("http://127.0.0.1/a b.raw", "not usable"),
        ] {
            let err = parse_object_url(url).unwrap_err();
            assert!(err.to_string().contains(expect), "{url}: {err}");
        }
    }
}
