//! The NBD server: fixed newstyle handshake, transmission phase, on tokio.
//!
//! SIGNATURE STUBS: the NBD work fills them in; the daemon is written against them.

use std::sync::Arc;

use tokio::sync::watch;

use super::ExportRegistry;

/// Serves the exports of a registry to NBD clients.
pub struct NbdServer {
    #[allow(dead_code)]
    registry: Arc<dyn ExportRegistry>,
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Arc<NbdServer> {
        Arc::new(NbdServer { registry })
    }

    /// Accept and serve clients on `listener` until `shutdown` becomes true; then stop
    /// accepting and close open connections.
    pub async fn run_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let _ = (listener, shutdown);
        Ok(())
    }

    /// As [`NbdServer::run_unix`], on TCP.
    pub async fn run_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let _ = (listener, shutdown);
        Ok(())
    }
}
