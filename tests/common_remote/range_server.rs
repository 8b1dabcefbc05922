//! A small HTTP file server with `Range` support, for tests and benchmarks.
//!
//! Serves the files under a root directory: `GET` (whole file, or `Range: bytes=a-b`,
//! `bytes=a-`, `bytes=-n` → 206 with `Content-Range`; unsatisfiable → 416), `HEAD` (200 with
//! `Content-Length`), 404 for anything that is not a file under the root, 405 for other
//! methods. Knobs for the lazy-pulling tests and benchmark: a first-byte latency, a bandwidth
//! cap shared by all responses (like one link), an injected status for the next N requests,
//! and a request counter. Used by `tests/store_backends.rs` and `examples/range_server.rs`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// What the server serves and how it slows down.
#[derive(Debug, Clone)]
pub struct RangeServerConfig {
    pub root: PathBuf,
    /// Waited before answering each request.
    pub latency: Duration,
    /// Bytes per second over all response bodies together; `None`: unlimited.
    pub rate: Option<u64>,
}

impl RangeServerConfig {
    pub fn new(root: impl Into<PathBuf>) -> RangeServerConfig {
        RangeServerConfig {
            root: root.into(),
            latency: Duration::ZERO,
            rate: None,
        }
    }
}

struct Shared {
    config: RangeServerConfig,
    requests: AtomicU64,
    fail_count: AtomicU64,
    fail_status: AtomicU64,
    /// When the shared link is free again (for the bandwidth cap).
    link_free_at: parking_lot::Mutex<Instant>,
}

/// A running server; stopped on drop.
pub struct RangeServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RangeServer {
    /// Serve `config` on `listen` (use `127.0.0.1:0` for a free port) on the current runtime.
    pub async fn start(
        config: RangeServerConfig,
        listen: SocketAddr,
    ) -> std::io::Result<RangeServer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            requests: AtomicU64::new(0),
            fail_count: AtomicU64::new(0),
            fail_status: AtomicU64::new(500),
            link_free_at: parking_lot::Mutex::new(Instant::now()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RangeServer {
            addr,
            shared,
            task: Some(task),
        })
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (all methods, failed ones included).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Answer the next `n` requests with `status` and no body.
    pub fn fail_next(&self, n: u64, status: u16) {
        self.shared
            .fail_status
            .store(status as u64, Ordering::SeqCst);
        self.shared.fail_count.store(n, Ordering::SeqCst);
    }

    /// Wait until the server task ends (for the example binary).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn empty(status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .body(Body::empty())
        .expect("a status-only response is valid")
}

/// The file for a request path, if it is a plain relative path under the root.
fn file_path(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let rel = uri_path.trim_start_matches('/');
    if rel.is_empty() {
        return None;
    }
    let mut path = root.to_path_buf();
    for seg in rel.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || seg.contains('%') || seg.contains('\\') {
            return None;
        }
        path.push(seg);
    }
    Some(path)
}

/// The byte range a `Range` header asks for in a file of `size` bytes.
/// `Ok(None)`: no usable header (serve the whole file); `Err(())`: unsatisfiable.
fn requested_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: answer with the whole file, as RFC 9110 allows
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(last)) if start <= last => (start, last.min(size.saturating_sub(1))),
        (Ok(start), Err(_)) if b.is_empty() => (start, size.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() => {
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if range.0 >= size {
        return Err(());
    }
    Ok(Some(range))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let failing = shared
        .fail_count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        let status = shared.fail_status.load(Ordering::SeqCst) as u16;
        return empty(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    }
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    if method != Method::GET && method != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(path) = file_path(&shared.config.root, uri.path()) else {
        return empty(StatusCode::NOT_FOUND);
    };
    let size = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => m.len(),
        _ => return empty(StatusCode::NOT_FOUND),
    };
    let builder = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    let (status, start, len, builder) = match requested_range(&headers, size) {
        Err(()) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .expect("valid response");
        }
        Ok(None) => (StatusCode::OK, 0, size, builder),
        Ok(Some((first, last))) => (
            StatusCode::PARTIAL_CONTENT,
            first,
            last - first + 1,
            builder.header(
                header::CONTENT_RANGE,
                format!("bytes {first}-{last}/{size}"),
            ),
        ),
    };
    let builder = builder
        .status(status)
        .header(header::CONTENT_LENGTH, HeaderValue::from(len));
    if method == Method::HEAD {
        return builder.body(Body::empty()).expect("valid response");
    }
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return empty(StatusCode::NOT_FOUND),
    };
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return empty(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let body =
        futures::stream::unfold((file, len, shared), |(mut file, left, shared)| async move {
            if left == 0 {
                return None;
            }
            let step = match shared.config.rate {
                Some(rate) => (rate / 100).clamp(4096, 65536),
                None => 65536,
            };
            let mut buf = vec![0u8; left.min(step) as usize];
            let chunk = match file.read_exact(&mut buf).await {
                Ok(_) => buf,
                Err(e) => return Some((Err(e), (file, 0, shared))),
            };
            if let Some(rate) = shared.config.rate {
                let send_at = {
                    let mut free = shared.link_free_at.lock();
                    let begin = (*free).max(Instant::now());
                    *free = begin + Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
                    *free
                };
                tokio::time::sleep_until(send_at).await;
            }
            let n = chunk.len() as u64;
            Some((Ok(Bytes::from(chunk)), (file, left - n, shared)))
        });
    builder
        .body(Body::from_stream(body))
        .expect("valid response")
}
