//! [`Web`]: the test range server on its own runtime, for tests that are not async and need
//! to stop the server at a chosen moment (a store going away).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use super::range_server::{RangeServer, RangeServerConfig};

/// A range server on its own runtime; [`Web::kill`] stops it and every open connection.
pub struct Web {
    rt: Option<tokio::runtime::Runtime>,
    server: Option<RangeServer>,
    pub url: String,
    pub root: PathBuf,
}

impl Web {
    pub fn start(root: &Path) -> Web {
        Web::start_with(RangeServerConfig::new(root))
    }

    /// Serve with `config` (latency, bandwidth cap).
    pub fn start_with(config: RangeServerConfig) -> Web {
        let root = config.root.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(RangeServer::start(config, "127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let url = server.url();
        Web {
            rt: Some(rt),
            server: Some(server),
            url,
            root,
        }
    }

    pub fn requests(&self) -> u64 {
        self.server.as_ref().map_or(0, |s| s.requests())
    }

    /// Stop answering: the listener and all connections go away.
    pub fn kill(&mut self) {
        let _guard = self.rt.as_ref().map(|rt| rt.enter());
        drop(self.server.take());
        drop(_guard);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        self.kill();
    }
}
