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
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWrite;
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
    busy_poll: Duration,
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Arc<NbdServer> {
        Self::with_busy_poll(registry, Duration::ZERO)
    }

    /// As [`NbdServer::new`], with busy polling: after answering a batch of small requests,
    /// a connection accepted by `run_unix`/`run_tcp` polls its socket for up to `busy_poll`
    /// before sleeping. That saves a sleep and wake-up per batch for clients in a tight
    /// request loop (benchmarks, guests doing small random reads at high queue depth), at
    /// the price of up to `busy_poll` of CPU per batch. Zero (the default) disables it.
    pub fn with_busy_poll(
        registry: Arc<dyn ExportRegistry>,
        busy_poll: Duration,
    ) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            registry,
            busy_poll,
        })
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
            let fd = s.as_raw_fd();
            Ok((s.into_split(), fd))
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
            let fd = s.as_raw_fd();
            Ok((s.into_split(), fd))
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
        R: server::ReadStream,
        W: AsyncWrite + Unpin,
    {
        server::serve(&*self.registry, rd, wr, shutdown, None).await
    }

    async fn accept_loop<F, Fut, R, W>(
        self: Arc<Self>,
        mut accept: F,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::io::Result<((R, W), RawFd)>>,
        R: server::ReadStream + 'static,
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
                    Ok(((rd, wr), fd)) => {
                        let me = self.clone();
                        let shutdown = shutdown.clone();
                        conns.spawn(async move {
                            // `fd` belongs to the halves, which live until `serve` returns.
                            let spin = (!me.busy_poll.is_zero()).then_some((fd, me.busy_poll));
                            let r = server::serve(&*me.registry, rd, wr, shutdown, spin).await;
                            if let Err(e) = r {
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
