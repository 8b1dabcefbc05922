//! The NBD server: fixed newstyle handshake and transmission phase, on tokio.
//!
//! - [`proto`]: the wire format, pure (no I/O), fuzzed.
//! - [`server`]: one connection: handshake, then the pipelined transmission loop.
//! - [`NbdServer`]: accept loops on unix and TCP listeners, one task per connection.
//!
//! What the server implements of the protocol is written down in `docs/nbd.md`.
//! Exports are read-only unless their device offers [`crate::device::BlockDevice::writable`].
//! A misbehaving client only ever ends its own connection; the server never panics on input.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::ExportRegistry;
use crate::error::{Classify, ErrorKind};

pub mod proto;
pub mod server;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection i/o failed")]
    Io(#[from] std::io::Error),
    #[error("client violated the protocol")]
    Protocol(#[from] proto::ProtoError),
}

impl Classify for NbdError {
    fn kind(&self) -> ErrorKind {
        match self {
            NbdError::Io(e) => ErrorKind::of_io(e),
            NbdError::Protocol(_) => ErrorKind::InvalidInput,
        }
    }
}

/// Socket send buffer asked for: large replies go out in few `write`s, without waiting
/// for the client between them. The kernel caps it at `net.core.wmem_max`.
const SEND_BUFFER: usize = 4 * 1024 * 1024;

fn tune_socket(sock: socket2::SockRef<'_>) {
    if let Err(e) = sock.set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!(
            error = &e as &dyn std::error::Error,
            "nbd: cannot set SO_SNDBUF"
        );
    }
}

/// Serves the exports of a registry to NBD clients.
pub struct NbdServer {
    registry: Arc<dyn ExportRegistry>,
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Arc<NbdServer> {
        Arc::new(NbdServer { registry })
    }

    /// Accept and serve clients on `listener` until `shutdown` becomes true (or its sender
    /// is dropped); then stop accepting and close open connections without waiting for
    /// their in-flight requests. Returns once every connection task has ended. Accept
    /// errors (e.g. out of file descriptors) are logged and retried, never returned. The
    /// socket path is left alone.
    pub async fn run_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let accept = || async {
            let (s, _) = listener.accept().await?;
            tune_socket(socket2::SockRef::from(&s));
            Ok(s.into_split())
        };
        self.accept_loop(accept, shutdown).await
    }

    /// As [`NbdServer::run_unix`], on TCP (with `TCP_NODELAY`).
    pub async fn run_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let accept = || async {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            tune_socket(socket2::SockRef::from(&s));
            Ok(s.into_split())
        };
        self.accept_loop(accept, shutdown).await
    }

    /// Serve one already-connected client on the two halves of its stream until it
    /// disconnects or `shutdown` becomes true. `Err` says why a client was dropped.
    pub async fn serve_connection<R, W>(
        &self,
        rd: R,
        wr: W,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        server::serve(&*self.registry, rd, wr, shutdown).await
    }

    async fn accept_loop<F, Fut, R, W>(
        self: Arc<Self>,
        mut accept: F,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::io::Result<(R, W)>>,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut conns = JoinSet::new();
        let stop = server::wait_shutdown(shutdown.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = accept() => match r {
                    Ok((rd, wr)) => {
                        let me = self.clone();
                        let shutdown = shutdown.clone();
                        conns.spawn(async move {
                            if let Err(e) = me.serve_connection(rd, wr, shutdown).await {
                                tracing::debug!(error = &e as &dyn std::error::Error,
                                    "nbd: connection dropped");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = &e as &dyn std::error::Error, "nbd: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // Connections watch the same shutdown signal and end promptly.
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}
