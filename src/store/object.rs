//! Remote stores over the `object_store` crate: plain HTTP(S) servers and S3-compatible
//! object stores (AWS S3, Ceph RGW, MinIO).
//!
//! [`RemoteStore`] maps our [`Store`] contract onto an [`ObjectStore`]:
//!
//! - every key lives under the store's prefix (`prefix/key`); keys are checked with
//!   [`validate_key`] before any request;
//! - each call is exactly one attempt: the client's own retries are switched off, because
//!   retry policy lives in [`super::retry`] only;
//! - failures are classified once, here: transport failures, 5xx and 429 are `Unavailable`
//!   (transient), timeouts `Timeout`, 404 `NotFound` (`head` answers `None`), 401/403
//!   `PermissionDenied`, anything else `Io` ([`StoreError::Remote`] keeps the client error as
//!   its source);
//! - `get_range` returns exactly the bytes asked for: a range that ends past the object is
//!   [`StoreError::RangeOutOfBounds`], whatever the server did with it;
//! - a plain HTTP server is read-only: `put`, `list` and `delete` are
//!   [`StoreError::Unsupported`] without sending anything;
//! - `list(prefix)` is a plain string-prefix match, like every store (object stores list by
//!   path segment, so the listing starts at the prefix's parent and filters).
//!
//! No constructor does I/O. S3 credentials come from [`S3Config`] or the usual `AWS_*`
//! environment variables; without either, the store must be declared anonymous: the cloud
//! metadata endpoints are never probed.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::{validate_key, Store, StoreError};
use crate::error::{Classify, ErrorKind};

/// The connection to an S3-compatible object store. `None` fields fall back to the
/// environment ([`S3Config::with_env`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host[:port]` of a non-AWS service (MinIO, Ceph RGW, moto); `None` for AWS.
    pub endpoint: Option<String>,
    /// Defaults to `us-east-1`.
    pub region: Option<String>,
    pub bucket: String,
    /// Keys are stored under `prefix/`; empty for the bucket's root.
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Permit a plain-http endpoint (loopback test servers, a private network).
    pub allow_http: bool,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Send unsigned requests (a public bucket); required when no credentials are given.
    pub anonymous: bool,
}

impl S3Config {
    /// Fill the unset connection fields from the environment: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
    /// `AWS_ENDPOINT_URL`. `env` looks a variable up (`std::env::var` in production).
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> S3Config {
        let fill = |field: &mut Option<String>, names: &[&str]| {
            if field.is_none() {
                *field = names.iter().find_map(|n| env(n)).filter(|v| !v.is_empty());
            }
        };
        fill(&mut self.access_key_id, &["AWS_ACCESS_KEY_ID"]);
        fill(&mut self.secret_access_key, &["AWS_SECRET_ACCESS_KEY"]);
        fill(&mut self.session_token, &["AWS_SESSION_TOKEN"]);
        fill(&mut self.region, &["AWS_REGION", "AWS_DEFAULT_REGION"]);
        fill(&mut self.endpoint, &["AWS_ENDPOINT_URL"]);
        self
    }
}

/// A [`Store`] on a remote object store; see the module docs.
#[derive(Debug)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    /// Joined before every key, without leading or trailing `/`; may be empty.
    prefix: String,
    description: String,
    writable: bool,
}

/// The client settings shared by both kinds: no retries, bounded requests.
fn client_options(timeout: Duration) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout.min(Duration::from_secs(10)))
}

fn no_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

fn invalid(store: &str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidSpec {
        store: store.to_string(),
        reason: reason.into(),
        source: None,
    }
}

/// Check a store prefix (`a/b`, no leading or trailing `/`; empty is fine).
fn check_prefix(store: &str, prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix).map_err(|e| match e {
        StoreError::InvalidKey { reason, .. } => invalid(
            store,
            format!("prefix {prefix:?} is not a valid key path: {reason}"),
        ),
        other => other,
    })
}

/// Parse an `http(s)://` URL with a host, for the store called `store`.
pub(crate) fn parse_http_url(store: &str, what: &str, url: &str) -> Result<url::Url, StoreError> {
    let parsed = url::Url::parse(url).map_err(|e| StoreError::InvalidSpec {
        store: store.to_string(),
        reason: format!("{what} {url:?} is not a valid URL"),
        source: Some(Box::new(e)),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            store,
            format!("{what} {url:?} must start with http:// or https://"),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(store, format!("{what} {url:?} has no host")));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid(
            store,
            format!("{what} {url:?} must not have a query or fragment"),
        ));
    }
    Ok(parsed)
}

impl RemoteStore {
    /// A read-only store on a plain HTTP(S) server: object `key` is `GET url/key`, read with
    /// `Range` requests. `timeout` bounds each request at the client (the policy layer has its
    /// own). The URL's path is the prefix, so its segments must be valid key segments.
    pub fn http(name: &str, url: &str, timeout: Duration) -> Result<RemoteStore, StoreError> {
        let parsed = parse_http_url(name, "url", url)?;
        let prefix = parsed.path().trim_matches('/').to_string();
        check_prefix(name, &prefix)?;
        let mut origin = parsed.clone();
        origin.set_path("");
        let inner = HttpBuilder::new()
            .with_url(origin.as_str())
            .with_retry(no_retries())
            .with_client_options(client_options(timeout).with_allow_http(true))
            .build()
            .map_err(|e| StoreError::InvalidSpec {
                store: name.to_string(),
                reason: format!("cannot build an HTTP client for {url:?}"),
                source: Some(Box::new(e)),
            })?;
        Ok(RemoteStore {
            inner: Arc::new(inner),
            description: format!("http:{}", parsed.as_str().trim_end_matches('/')),
            prefix,
            writable: false,
        })
    }

    /// A store on an S3-compatible service. `config` is used as given: call
    /// [`S3Config::with_env`] first to honour the environment.
    pub fn s3(name: &str, config: &S3Config, timeout: Duration) -> Result<RemoteStore, StoreError> {
        if config.bucket.is_empty() {
            return Err(invalid(name, "bucket is missing"));
        }
        let prefix = config.prefix.trim_matches('/').to_string();
        check_prefix(name, &prefix)?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(config.region.as_deref().unwrap_or("us-east-1"))
            .with_virtual_hosted_style_request(!config.path_style)
            .with_retry(no_retries())
            .with_client_options(client_options(timeout).with_allow_http(config.allow_http));
        if let Some(endpoint) = &config.endpoint {
            let url = parse_http_url(name, "endpoint", endpoint)?;
            if url.scheme() == "http" && !config.allow_http {
                return Err(invalid(
                    name,
                    format!(
                        "endpoint {endpoint:?} is plain http: set allow-http = true to permit it"
                    ),
                ));
            }
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = &config.session_token {
                    builder = builder.with_token(token);
                }
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    name,
                    "access-key-id and secret-access-key must be given together",
                ))
            }
            (None, None) if config.anonymous => builder = builder.with_skip_signature(true),
            (None, None) => {
                return Err(invalid(
                    name,
                    "no credentials: set access-key-id and secret-access-key (or \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or anonymous = true",
                ))
            }
        }
        let inner = builder.build().map_err(|e| StoreError::InvalidSpec {
            store: name.to_string(),
            reason: "cannot build an S3 client".to_string(),
            source: Some(Box::new(e)),
        })?;
        let mut description = format!("s3:{}", config.bucket);
        if !prefix.is_empty() {
            description = format!("{description}/{prefix}");
        }
        if let Some(endpoint) = &config.endpoint {
            description = format!("{description}@{}", endpoint.trim_end_matches('/'));
        }
        Ok(RemoteStore {
            inner: Arc::new(inner),
            prefix,
            description,
            writable: true,
        })
    }

    /// The object path of `key`.
    fn location(&self, key: &str) -> Result<Path, StoreError> {
        validate_key(key)?;
        Ok(self.join(key))
    }

    fn join(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn unsupported(&self, op: &'static str) -> StoreError {
        StoreError::Unsupported {
            store: self.description.clone(),
            op,
        }
    }

    fn error(&self, key: &str, err: object_store::Error) -> StoreError {
        match err {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_string(),
            },
            object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. } => self.unsupported("this operation"),
            err => StoreError::Remote {
                key: key.to_string(),
                kind: classify(&err),
                source: Box::new(err),
            },
        }
    }
}

/// The kind of an `object_store` failure.
///
/// `object_store` hides the type carrying a failed response's status, so the status is read
/// from the error's text ("status code: NNN") when no transport error is in the chain.
fn classify(err: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match err {
        E::NotFound { .. } => return ErrorKind::NotFound,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            return ErrorKind::PermissionDenied
        }
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
            return ErrorKind::Conflict
        }
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => {
            return ErrorKind::InvalidInput
        }
        E::JoinError { .. } => return ErrorKind::Internal,
        _ => {}
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return match http.kind() {
                HttpErrorKind::Timeout => ErrorKind::Timeout,
                HttpErrorKind::Connect
                | HttpErrorKind::Request
                | HttpErrorKind::Interrupted
                | HttpErrorKind::Decode => ErrorKind::Unavailable,
                _ => ErrorKind::Io,
            };
        }
        if let Some(status) = status_in(&e.to_string()) {
            return kind_of_status(status);
        }
        current = e.source();
    }
    ErrorKind::Io
}

/// The HTTP status in an `object_store` error message, if it names one.
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// The kind of a failed HTTP response status.
fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        404 | 410 => ErrorKind::NotFound,
        401 | 403 => ErrorKind::PermissionDenied,
        408 => ErrorKind::Timeout,
        429 | 500..=599 => ErrorKind::Unavailable,
        416 => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    }
}

#[async_trait]
impl Store for RemoteStore {
    fn describe(&self) -> String {
        self.description.clone()
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let location = self.location(key)?;
        let want = range.end.saturating_sub(range.start);
        // HTTP cannot ask for an empty range: such a request only needs the bounds check.
        let refusal = if want == 0 {
            None
        } else {
            match self.inner.get_range(&location, range.clone()).await {
                Ok(data) if data.len() as u64 == want => return Ok(data),
                Ok(_) => None,
                Err(e) => match self.error(key, e) {
                    err if matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::Io) => {
                        Some(err)
                    }
                    err => return Err(err),
                },
            }
        };
        // An empty range, a short answer or a refusal (416 and the like): servers differ in
        // how they treat a range past the end, so the object's size decides.
        let size = self.head(key).await?.ok_or_else(|| StoreError::NotFound {
            key: key.to_string(),
        })?;
        super::check_range(key, &range, size)?;
        match refusal {
            Some(err) => Err(err),
            None if want == 0 => Ok(Bytes::new()),
            None => Err(StoreError::Remote {
                key: key.to_string(),
                kind: ErrorKind::Unavailable,
                source: format!("short response to a {want}-byte range inside the object").into(),
            }),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let location = self.location(key)?;
        let result = self
            .inner
            .get(&location)
            .await
            .map_err(|e| self.error(key, e))?;
        result.bytes().await.map_err(|e| self.error(key, e))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let location = self.location(key)?;
        if !self.writable {
            return Err(self.unsupported("put"));
        }
        self.inner
            .put(&location, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let location = self.location(key)?;
        match self.inner.head(&location).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !self.writable {
            return Err(self.unsupported("list"));
        }
        // Object stores list whole path segments: start at the prefix's parent, then filter.
        let parent = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        let listing = if parent.is_empty() && self.prefix.is_empty() {
            self.inner.list(None)
        } else if parent.is_empty() {
            self.inner.list(Some(&Path::from(self.prefix.as_str())))
        } else {
            self.inner.list(Some(&self.join(parent)))
        };
        let metas: Vec<_> = listing
            .try_collect()
            .await
            .map_err(|e| self.error(prefix, e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut keys: Vec<String> = metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                let key = full.strip_prefix(strip.as_str())?;
                key.starts_with(prefix).then(|| key.to_string())
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let location = self.location(key)?;
        if !self.writable {
            return Err(self.unsupported("delete"));
        }
        match self.inner.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(config: S3Config) -> Result<RemoteStore, StoreError> {
        RemoteStore::s3("t", &config, Duration::from_secs(5))
    }

    fn creds() -> S3Config {
        S3Config {
            bucket: "images".into(),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Config::default()
        }
    }

    #[test]
    fn status_is_read_from_the_error_text() {
        let text = "Error performing GET http://x in 1ms - Server returned non-2xx status code: \
                    503 Service Unavailable: slow down";

        assert_eq!(status_in(text), Some(503));
        assert_eq!(kind_of_status(503), ErrorKind::Unavailable);
        assert_eq!(kind_of_status(429), ErrorKind::Unavailable);
        assert_eq!(kind_of_status(403), ErrorKind::PermissionDenied);
    }

    #[test]
    fn s3_without_bucket_is_rejected() {
        let err = s3(S3Config {
            bucket: String::new(),
            ..creds()
        })
        .unwrap_err();

        assert!(err.to_string().contains("bucket is missing"), "{err}");
    }

    #[test]
    fn s3_plain_http_endpoint_needs_allow_http() {
        let err = s3(S3Config {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..creds()
        })
        .unwrap_err();

        assert!(err.to_string().contains("allow-http"), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn s3_without_credentials_must_be_anonymous() {
        let bare = S3Config {
            bucket: "b".into(),
            ..S3Config::default()
        };

        let err = s3(bare.clone()).unwrap_err();
        let anonymous = s3(S3Config {
            anonymous: true,
            ..bare
        });

        assert!(err.to_string().contains("no credentials"), "{err}");
        assert!(anonymous.is_ok());
    }

    #[test]
    fn env_fills_only_unset_fields() {
        let config = S3Config {
            region: Some("eu-west-1".into()),
            ..creds()
        }
        .with_env(|name| match name {
            "AWS_REGION" => Some("us-west-2".into()),
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:1".into()),
            "AWS_ACCESS_KEY_ID" => Some("env-id".into()),
            _ => None,
        });

        assert_eq!(config.region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(config.access_key_id.as_deref(), Some("id"));
    }

    #[test]
    fn http_url_path_becomes_the_prefix() {
        let store = RemoteStore::http(
            "t",
            "http://127.0.0.1:8080/images/v1/",
            Duration::from_secs(1),
        )
        .unwrap();

        assert_eq!(store.prefix, "images/v1");
        assert_eq!(store.join("a/b").as_ref(), "images/v1/a/b");
        assert_eq!(store.describe(), "http:http://127.0.0.1:8080/images/v1");
    }

    #[test]
    fn http_url_with_bad_scheme_is_rejected() {
        let err = RemoteStore::http("t", "ftp://host/x", Duration::from_secs(1)).unwrap_err();

        assert!(err.to_string().contains("http:// or https://"), "{err}");
    }

    #[tokio::test]
    async fn http_store_refuses_writes_without_a_request() {
        // Port 9 (discard) on loopback: nothing may be sent, so nothing needs to listen.
        let store = RemoteStore::http("t", "http://127.0.0.1:9/", Duration::from_secs(1)).unwrap();

        let put = store.put("k", Bytes::new()).await.unwrap_err();
        let list = store.list("").await.unwrap_err();
        let delete = store.delete("k").await.unwrap_err();

        for err in [put, list, delete] {
            assert!(matches!(err, StoreError::Unsupported { .. }), "{err:?}");
        }
    }
}
