//! The control API client (used by the CLI): HTTP/1.1 over the daemon's unix socket.
//!
//! One connection per request; the daemon is local, so connection setup is cheap and no
//! pool is needed. Failures carry an [`ErrorKind`]: the daemon's own (from the error body)
//! or a local one (cannot connect, broken answer).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::types::{
    kind_from_name, AddEvent, AddImageRequest, AddProgress, CacheView, ErrorBody, Health,
    ImageFromVolumeReport, NdjsonDecoder, NdjsonError, PushReport, PushRequest, StoreInfo,
    WarmRequest,
};
use crate::cache::WarmReport;
use crate::catalog::{ImagePatch, ImageRecord, Lifecycle};
use crate::error::{Classify, ErrorKind};

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the imgcache daemon at {}: is `imgcache serve` running?", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused the request; `message` is its own.
    #[error("{message}")]
    Api { kind: ErrorKind, message: String },
    #[error("lost the connection to the imgcache daemon")]
    Http(#[source] hyper::Error),
    #[error("unexpected answer from the imgcache daemon: {0}")]
    Protocol(String),
    #[error(transparent)]
    Stream(#[from] NdjsonError),
}

impl Classify for ClientError {
    fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Connect { .. } => ErrorKind::Unavailable,
            ClientError::Api { kind, .. } => *kind,
            ClientError::Http(_) => ErrorKind::Io,
            ClientError::Protocol(_) | ClientError::Stream(_) => ErrorKind::Internal,
        }
    }
}

/// A client of the daemon listening on one control socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A lifecycle action or expunge, as the API's action path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Lifecycle(Lifecycle),
    Expunge,
    Pin,
    Unpin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Lifecycle(Lifecycle::Disable) => "disable",
            Action::Lifecycle(Lifecycle::Enable) => "enable",
            Action::Lifecycle(Lifecycle::Delete) => "delete",
            Action::Lifecycle(Lifecycle::Recover) => "recover",
            Action::Expunge => "expunge",
            Action::Pin => "pin",
            Action::Unpin => "unpin",
        }
    }
}

impl Client {
    /// A client for `socket`. Does no I/O.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(Method::GET, "/v1/health", None::<&()>).await
    }

    pub async fn list_images(&self, all: bool) -> Result<Vec<ImageRecord>, ClientError> {
        let path = if all {
            "/v1/images?all=true"
        } else {
            "/v1/images"
        };
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn get_image(&self, id_or_name: &str) -> Result<ImageRecord, ClientError> {
        let path = format!("/v1/images/{}", encode_segment(id_or_name));
        self.call(Method::GET, &path, None::<&()>).await
    }

    pub async fn update_image(
        &self,
        id_or_name: &str,
        patch: &ImagePatch,
    ) -> Result<ImageRecord, ClientError> {
        let path = format!("/v1/images/{}", encode_segment(id_or_name));
        self.call(Method::PATCH, &path, Some(patch)).await
    }

    pub async fn image_action(
        &self,
        id_or_name: &str,
        action: Action,
    ) -> Result<ImageRecord, ClientError> {
        let path = format!(
            "/v1/images/{}/{}",
            encode_segment(id_or_name),
            action.as_str()
        );
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// Add an image, calling `on_progress` for every progress line; returns the new image.
    pub async fn add_image(
        &self,
        req: &AddImageRequest,
        on_progress: impl FnMut(AddProgress),
    ) -> Result<ImageRecord, ClientError> {
        match self
            .stream(Method::POST, "/v1/images", Some(req), on_progress)
            .await?
        {
            AddEvent::Image(row) => Ok(*row),
            other => Err(unexpected(&other)),
        }
    }

    /// Make an image from a volume or snapshot (`req.volume`); returns the report.
    pub async fn image_from_volume(
        &self,
        req: &AddImageRequest,
        on_progress: impl FnMut(AddProgress),
    ) -> Result<ImageFromVolumeReport, ClientError> {
        match self
            .stream(Method::POST, "/v1/images", Some(req), on_progress)
            .await?
        {
            AddEvent::FromVolume(report) => Ok(*report),
            other => Err(unexpected(&other)),
        }
    }

    /// Fetch every chunk of a remote image into the cache; returns the warm report.
    pub async fn warm_image(
        &self,
        id_or_name: &str,
        req: &WarmRequest,
        on_progress: impl FnMut(AddProgress),
    ) -> Result<WarmReport, ClientError> {
        let path = format!("/v1/images/{}/warm", encode_segment(id_or_name));
        match self
            .stream(Method::POST, &path, Some(req), on_progress)
            .await?
        {
            AddEvent::Warm(report) => Ok(report),
            other => Err(unexpected(&other)),
        }
    }

    /// Upload a local image to a store; returns the push report.
    pub async fn push_image(
        &self,
        id_or_name: &str,
        req: &PushRequest,
        on_progress: impl FnMut(AddProgress),
    ) -> Result<PushReport, ClientError> {
        let path = format!("/v1/images/{}/push", encode_segment(id_or_name));
        match self
            .stream(Method::POST, &path, Some(req), on_progress)
            .await?
        {
            AddEvent::Push(report) => Ok(report),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list_stores(&self) -> Result<Vec<StoreInfo>, ClientError> {
        self.call(Method::GET, "/v1/stores", None::<&()>).await
    }

    pub async fn cache_status(&self) -> Result<CacheView, ClientError> {
        self.call(Method::GET, "/v1/cache", None::<&()>).await
    }

    /// Send a request answered by an NDJSON progress stream; returns its final event.
    async fn stream(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        mut on_progress: impl FnMut(AddProgress),
    ) -> Result<AddEvent, ClientError> {
        let resp = self.send(method, path, body).await?;
        let resp = check_status(resp).await?;
        let mut body = resp.into_body();
        let mut decoder = NdjsonDecoder::new();
        let mut handle = |ev: AddEvent| -> Option<Result<AddEvent, ClientError>> {
            match ev {
                AddEvent::Progress(p) => {
                    on_progress(p);
                    None
                }
                AddEvent::Error(e) => Some(Err(ClientError::Api {
                    kind: kind_from_name(&e.kind),
                    message: e.message,
                })),
                done => Some(Ok(done)),
            }
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ClientError::Http)?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for ev in decoder.push(data)? {
                if let Some(done) = handle(ev) {
                    return done;
                }
            }
        }
        if let Some(done) = decoder.finish()?.and_then(handle) {
            return done;
        }
        Err(ClientError::Protocol(
            "the progress stream ended without a result (did the daemon stop?)".into(),
        ))
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        let resp = check_status(resp).await?;
        let bytes = read_body(resp).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            // Errors surface through `send_request` and the body; nothing to add here.
            let _ = conn.await;
        });
        let payload = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?,
            ),
            None => Bytes::new(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "imgcache");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(payload))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender.send_request(req).await.map_err(ClientError::Http)
    }
}

fn unexpected(ev: &AddEvent) -> ClientError {
    ClientError::Protocol(format!("unexpected final line {ev:?}"))
}

/// Turn a non-2xx answer into [`ClientError::Api`] using its error body.
async fn check_status(resp: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = read_body(resp).await?;
    Err(error_from_body(status, &bytes))
}

fn error_from_body(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            kind: kind_from_name(&body.error.kind),
            message: body.error.message,
        },
        Err(_) => ClientError::Api {
            kind: ErrorKind::from_http_status(status.as_u16()),
            message: format!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(bytes).trim()
            ),
        },
    }
}

async fn read_body(resp: Response<Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes())
}

/// Percent-encode one path segment (names may hold spaces, `(`, `:`, `+`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_encoding_escapes_reserved_characters() {
        assert_eq!(encode_segment("debian-12"), "debian-12");
        assert_eq!(
            encode_segment("a b/c+(d):é"),
            "a%20b%2Fc%2B%28d%29%3A%C3%A9"
        );
    }

    #[test]
    fn json_error_body_keeps_kind_and_message() {
        let body = br#"{"error":{"kind":"conflict","message":"image is protected"}}"#;
        match error_from_body(StatusCode::CONFLICT, body) {
            ClientError::Api { kind, message } => {
                assert_eq!(kind, ErrorKind::Conflict);
                assert_eq!(message, "image is protected");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_json_error_body_falls_back_to_status() {
        let err = error_from_body(StatusCode::NOT_FOUND, b"nope");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn missing_socket_gives_the_daemon_hint() {
        let err = Client::new("/nonexistent/imgcache.sock")
            .health()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot reach the imgcache daemon at /nonexistent/imgcache.sock: is `imgcache serve` running?"
        );
    }
}
