//! The control API server: an axum router over a [`Daemon`], served on a unix socket.
//!
//! Every failure answers `{"error":{"kind","message"}}` with the status of the error's
//! [`ErrorKind`], including extractor rejections (malformed JSON, unknown fields, a body over
//! [`MAX_BODY_BYTES`]) and unknown routes. `POST /v1/images` answers 200 with an NDJSON
//! stream (see [`super::types::AddEvent`]); if the client goes away mid-stream the import is
//! cancelled, which the stream notices at its next write (a progress line goes out at least
//! every [`HEARTBEAT`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::types::{
    kind_name, AddEvent, AddImageRequest, AddProgress, ApiError, CacheView, ErrorBody, Health,
    PushRequest, StoreInfo, WarmRequest, MAX_BODY_BYTES,
};
use crate::catalog::{ImagePatch, ImageRecord, Lifecycle};
use crate::daemon::from_volume::ImageFromVolume;
use crate::daemon::lazy::RegisterFrom;
use crate::daemon::{AddImage, Daemon, DaemonError};
use crate::error::chain as error_chain;
use crate::error::{Classify, ErrorKind};

/// Progress lines of an add go out at most this often...
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// ...and at least this often, so a vanished client is noticed.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Serve the API on `listener` until `shutdown` becomes true, then finish in-flight requests.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(daemon))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// The `/v1` routes.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/images", get(list_images).post(add_image))
        .route(
            "/v1/images/{id_or_name}",
            get(show_image).patch(update_image),
        )
        .route("/v1/images/{id_or_name}/warm", post(warm_image))
        .route("/v1/images/{id_or_name}/push", post(push_image))
        .route("/v1/images/{id_or_name}/{action}", post(image_action))
        .merge(super::volumes::routes())
        .route("/v1/stores", get(list_stores))
        .route("/v1/cache", get(cache_status))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(daemon)
}

/// A failed request.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    error: ApiError,
}

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            status: StatusCode::from_u16(kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error: ApiError {
                kind: kind_name(kind).to_string(),
                message: message.into(),
            },
        }
    }

    fn rejection(status: StatusCode, message: String) -> Failure {
        let kind = ErrorKind::from_http_status(status.as_u16());
        Failure {
            status,
            error: ApiError {
                kind: kind_name(kind).to_string(),
                message,
            },
        }
    }
}

impl From<DaemonError> for Failure {
    fn from(e: DaemonError) -> Failure {
        Failure::new(e.kind(), error_chain(&e))
    }
}

impl From<JsonRejection> for Failure {
    fn from(r: JsonRejection) -> Failure {
        // axum answers 422 for well-formed JSON of the wrong shape (unknown or missing
        // fields); to the API that is bad input like any other: 400.
        let status = match r.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        Failure::rejection(status, r.body_text())
    }
}

impl From<QueryRejection> for Failure {
    fn from(r: QueryRejection) -> Failure {
        Failure::rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for Failure {
    fn from(r: PathRejection) -> Failure {
        Failure::rejection(r.status(), r.body_text())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.error })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list_images(
    State(d): State<Arc<Daemon>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<ImageRecord>> {
    let Query(q) = query?;
    Ok(Json(d.list_images(q.all).await?))
}

async fn show_image(
    State(d): State<Arc<Daemon>>,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<ImageRecord> {
    let Path(key) = key?;
    Ok(Json(d.get_image(&key).await?))
}

async fn update_image(
    State(d): State<Arc<Daemon>>,
    key: Result<Path<String>, PathRejection>,
    patch: Result<Json<ImagePatch>, JsonRejection>,
) -> ApiResult<ImageRecord> {
    let Path(key) = key?;
    let Json(patch) = patch?;
    Ok(Json(d.update_image(&key, patch).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    /// `delete` even if volumes use the image (they keep using it).
    #[serde(default)]
    force: bool,
}

async fn image_action(
    State(d): State<Arc<Daemon>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ActionQuery>, QueryRejection>,
) -> ApiResult<ImageRecord> {
    let Path((key, action)) = path?;
    let Query(q) = query?;
    let action = match action.as_str() {
        "expunge" => return Ok(Json(d.expunge(&key).await?)),
        "pin" => return Ok(Json(d.pin_image(&key, true).await?)),
        "unpin" => return Ok(Json(d.pin_image(&key, false).await?)),
        "disable" => Lifecycle::Disable,
        "enable" => Lifecycle::Enable,
        "delete" => Lifecycle::Delete,
        "recover" => Lifecycle::Recover,
        other => {
            return Err(Failure::new(
                ErrorKind::NotFound,
                format!(
                "unknown image action {other:?}: use disable, enable, delete, recover, expunge, pin, unpin, warm or push"
            ),
            ))
        }
    };
    Ok(Json(d.lifecycle_with(&key, action, q.force).await?))
}

async fn no_route() -> Failure {
    Failure::new(ErrorKind::NotFound, "no such API route (see /v1/health)")
}

async fn method_not_allowed() -> Failure {
    Failure {
        status: StatusCode::METHOD_NOT_ALLOWED,
        error: ApiError {
            kind: kind_name(ErrorKind::InvalidInput).into(),
            message: "method not allowed on this route".into(),
        },
    }
}

async fn add_image(
    State(d): State<Arc<Daemon>>,
    body: Result<Json<AddImageRequest>, JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body?;
    if let Some(volume) = req.volume {
        if req.file.is_some() || req.manifest.is_some() || req.url.is_some() {
            return Err(Failure::new(
                ErrorKind::InvalidInput,
                "a volume cannot be combined with a file, manifest or URL",
            ));
        }
        if req.checksum.is_some() {
            return Err(Failure::new(
                ErrorKind::InvalidInput,
                "a checksum cannot be given for an image from a volume (it is computed)",
            ));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let create = ImageFromVolume {
            name: req.name,
            volume,
            chunk_size: req.chunk_size,
            attributes: req.attributes,
            store: req.store,
        };
        let c = cancel.clone();
        return Ok(progress_stream(cancel, move |progress| async move {
            d.image_from_volume(create, progress, c)
                .await
                .map(|r| AddEvent::FromVolume(Box::new(r)))
        }));
    }
    let from = match (req.store, req.manifest, req.url) {
        (None, None, None) => None,
        (Some(store), Some(key), None) => Some(RegisterFrom::Manifest { store, key }),
        (None, None, Some(url)) => Some(RegisterFrom::Url {
            url,
            chunk_size: req.chunk_size,
        }),
        (Some(_), None, None) | (None, Some(_), None) => {
            return Err(Failure::new(
                ErrorKind::InvalidInput,
                "a store and a manifest go together: give both",
            ))
        }
        _ => {
            return Err(Failure::new(
                ErrorKind::InvalidInput,
                "give a URL or a store and a manifest, not both",
            ))
        }
    };
    if from.is_some() == req.file.is_some() {
        return Err(Failure::new(
            ErrorKind::InvalidInput,
            "give exactly one of file, store + manifest, or url",
        ));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let add = AddImage {
        name: req.name,
        file: req.file,
        from,
        chunk_size: req.chunk_size,
        checksum: req.checksum,
        attributes: req.attributes,
    };
    let c = cancel.clone();
    Ok(progress_stream(cancel, move |progress| async move {
        d.add_image(add, progress, c)
            .await
            .map(|row| AddEvent::Image(Box::new(row)))
    }))
}

/// Run `work` on its own task and answer with its NDJSON progress stream: progress lines,
/// then its final event (or an error line). `cancel` is set if the client goes away.
fn progress_stream<F, Fut>(cancel: Arc<AtomicBool>, work: F) -> Response
where
    F: FnOnce(crate::image::Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<AddEvent, DaemonError>> + Send + 'static,
{
    let (progress_tx, progress_rx) = watch::channel(AddProgress { done: 0, total: 0 });
    let progress = Arc::new(move |done, total| {
        let _ = progress_tx.send(AddProgress { done, total });
    });
    let task = tokio::spawn(async move { work(progress).await });
    let stream = AddStream {
        progress: progress_rx,
        task: Some(task),
        last_sent: None,
        _cancel: CancelOnDrop(cancel),
    };
    let body = Body::from_stream(futures::stream::unfold(stream, AddStream::next_line));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn warm_image(
    State(d): State<Arc<Daemon>>,
    key: Result<Path<String>, PathRejection>,
    body: Result<Json<WarmRequest>, JsonRejection>,
) -> Result<Response, Failure> {
    let Path(key) = key?;
    let Json(req) = body?;
    // Fail fast (before the stream starts) on a bad image.
    d.get_image(&key).await?;
    Ok(progress_stream(
        Arc::new(AtomicBool::new(false)),
        move |progress| async move { d.warm_image(&key, req, progress).await.map(AddEvent::Warm) },
    ))
}

async fn push_image(
    State(d): State<Arc<Daemon>>,
    key: Result<Path<String>, PathRejection>,
    body: Result<Json<PushRequest>, JsonRejection>,
) -> Result<Response, Failure> {
    let Path(key) = key?;
    let Json(req) = body?;
    d.get_image(&key).await?;
    Ok(progress_stream(
        Arc::new(AtomicBool::new(false)),
        move |progress| async move {
            d.push_image(&key, &req.store, progress)
                .await
                .map(AddEvent::Push)
        },
    ))
}

async fn list_stores(State(d): State<Arc<Daemon>>) -> Json<Vec<StoreInfo>> {
    Json(d.list_stores().await)
}

async fn cache_status(State(d): State<Arc<Daemon>>) -> ApiResult<CacheView> {
    Ok(Json(d.cache_view().await?))
}

/// Cancels the import when the response stream is dropped (the client went away). After the
/// final line the import is over and the flag has no effect.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct AddStream {
    progress: watch::Receiver<AddProgress>,
    /// `None` once the final line went out.
    task: Option<JoinHandle<Result<AddEvent, DaemonError>>>,
    last_sent: Option<(AddProgress, tokio::time::Instant)>,
    _cancel: CancelOnDrop,
}

impl AddStream {
    async fn next_line(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        let task = self.task.as_mut()?;
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                joined = &mut *task => {
                    self.task = None;
                    let event = match joined {
                        Ok(Ok(event)) => event,
                        Ok(Err(e)) => AddEvent::Error(Failure::from(e).error),
                        Err(e) => AddEvent::Error(
                            Failure::new(ErrorKind::Internal, format!("import task failed: {e}")).error,
                        ),
                    };
                    return Some((Ok(Bytes::from(event.to_line())), self));
                }
                _ = tick.tick() => {
                    let now = tokio::time::Instant::now();
                    let current = *self.progress.borrow();
                    let due = match self.last_sent {
                        None => true,
                        Some((sent, at)) => sent != current || now - at >= HEARTBEAT,
                    };
                    if due {
                        self.last_sent = Some((current, now));
                        let line = AddEvent::Progress(current).to_line();
                        return Some((Ok(Bytes::from(line)), self));
                    }
                }
            }
        }
    }
}
