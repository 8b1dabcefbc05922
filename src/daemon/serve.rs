//! `imgcache serve`: take the state lock, open the daemon, bind the listeners, run until
//! SIGINT/SIGTERM, shut down cleanly.
//!
//! Shutdown order: stop accepting imports and cancel running ones, flip the shutdown watch
//! (NBD servers stop accepting and close their connections; the API server stops accepting
//! and finishes in-flight requests), unmount the FUSE export, wait up to [`SHUTDOWN_GRACE`],
//! remove the socket files, release the lock. A second signal during shutdown exits at once.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::lock::StateLock;
use super::{Daemon, DaemonError};
use crate::config::{Config, FuseMountSetting};
use crate::error::chain as error_chain;
use crate::export::fuse::FuseExport;
use crate::export::nbd::NbdServer;
use crate::export::ExportRegistry;

/// How long shutdown waits for connections and imports to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Mode of the socket files: owner and group only.
const SOCKET_MODE: u32 = 0o660;

/// Run the daemon until a signal stops it. Returns `Ok` after a clean shutdown.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.state_dir)
        .map_err(|source| DaemonError::Io {
            context: format!(
                "cannot create state directory {}",
                config.state_dir.display()
            ),
            source,
        })?;
    let lock = StateLock::acquire(&config.lock_path(), &config.state_dir)?;
    tracing::debug!(lock = %lock.path().display(), "state directory locked");

    // We hold the lock: socket files present now were left by a daemon that died.
    let sockets = SocketFiles(vec![
        config.control_socket.clone(),
        config.nbd_socket.clone(),
    ]);
    for path in &sockets.0 {
        remove_stale_socket(path)?;
    }

    let fd_limit = crate::sys::raise_fd_limit();
    tracing::debug!(fd_limit, "open-file limit");
    let daemon = Daemon::open(&config).await?;

    let control = bind_unix(&config.control_socket, "control")?;
    let nbd_unix = bind_unix(&config.nbd_socket, "NBD")?;
    let nbd_tcp = match config.nbd_tcp {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Io {
                    context: format!("cannot listen for NBD on {addr}"),
                    source,
                })?,
        ),
    };

    let fuse = mount_fuse(
        &config.fuse_mount,
        daemon.clone() as Arc<dyn ExportRegistry>,
    )?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks: JoinSet<(&'static str, std::io::Result<()>)> = JoinSet::new();

    let nbd = NbdServer::with_busy_poll(
        daemon.clone() as Arc<dyn ExportRegistry>,
        config.nbd_busy_poll,
    );
    tasks.spawn({
        let (nbd, rx) = (nbd.clone(), shutdown_rx.clone());
        async move { ("NBD unix listener", nbd.run_unix(nbd_unix, rx).await) }
    });
    if let Some(listener) = nbd_tcp {
        let (nbd, rx) = (nbd.clone(), shutdown_rx.clone());
        tasks.spawn(async move { ("NBD TCP listener", nbd.run_tcp(listener, rx).await) });
    }
    tasks.spawn({
        let (daemon, rx) = (daemon.clone(), shutdown_rx.clone());
        async move {
            let result = crate::api::server::serve(control, daemon, rx).await;
            ("control API", result)
        }
    });

    log_listening(&config);

    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut failure = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            Some(done) = tasks.join_next() => match done {
                Ok((what, Ok(()))) => tracing::debug!("{what} stopped"),
                Ok((what, Err(e))) => {
                    tracing::error!(error = %error_chain(&e), "{what} failed; shutting down");
                    failure = Some(DaemonError::Io { context: format!("{what} failed"), source: e });
                    break;
                }
                Err(e) => {
                    failure = Some(DaemonError::Internal(format!("listener task failed: {e}")));
                    break;
                }
            },
        }
    }

    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(1);
    });

    daemon.begin_shutdown();
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        if let Some(fuse) = fuse {
            match tokio::task::spawn_blocking(move || fuse.unmount()).await {
                Ok(Ok(())) => tracing::debug!("FUSE export unmounted"),
                Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "FUSE unmount failed"),
                Err(e) => tracing::warn!("FUSE unmount task failed: {e}"),
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok((what, Err(e))) = done {
                tracing::warn!(error = %error_chain(&e), "{what} failed while stopping");
            }
        }
        while daemon.imports_running() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "connections still open after {}s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
        tasks.abort_all();
    }
    daemon.close_volumes();
    drop(sockets);
    drop(lock);
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn log_listening(config: &Config) {
    let sock = config.nbd_socket.display();
    tracing::info!(socket = %config.control_socket.display(), "control API listening");
    tracing::info!(socket = %sock, "NBD listening on unix socket");
    match config.nbd_tcp {
        Some(addr) => tracing::info!(address = %addr, "NBD listening on TCP"),
        None => tracing::info!("NBD over TCP is off"),
    }
    tracing::info!(
        "example: qemu-system-x86_64 -drive file=nbd:unix:{sock}:exportname=images/NAME,format=raw,readonly=on"
    );
    tracing::info!("example: nbdinfo 'nbd+unix:///images/NAME?socket={sock}'");
}

/// Mount the FUSE export as configured. The default mount point is skipped with a warning
/// when FUSE is unusable; a configured one must mount.
fn mount_fuse(
    setting: &FuseMountSetting,
    registry: Arc<dyn ExportRegistry>,
) -> Result<Option<FuseExport>, DaemonError> {
    let Some(path) = setting.path() else {
        tracing::info!("FUSE export is off");
        return Ok(None);
    };
    let rt = tokio::runtime::Handle::current();
    let mounted = tokio::task::block_in_place(|| {
        FuseExport::mount(registry, rt, path, crate::export::fuse::DEFAULT_THREADS)
    });
    match mounted {
        Ok(fuse) => {
            tracing::info!(mount = %path.display(), "FUSE export mounted: images/NAME, volumes/NAME");
            Ok(Some(fuse))
        }
        Err(e) if matches!(setting, FuseMountSetting::Default(_)) => {
            tracing::warn!(error = %error_chain(&e),
                "running without the FUSE export (set fuse-mount = \"off\" to silence this)");
            Ok(None)
        }
        Err(e) => Err(DaemonError::Io {
            context: "cannot start the FUSE export".into(),
            source: std::io::Error::other(e),
        }),
    }
}

fn signal_error(source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        context: "cannot install signal handlers".into(),
        source,
    }
}

fn bind_unix(path: &Path, what: &str) -> Result<UnixListener, DaemonError> {
    let io_err = |source| DaemonError::Io {
        context: format!("cannot listen on {what} socket {}", path.display()),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io_err)?;
    Ok(listener)
}

/// Remove a socket file left by a dead daemon; refuse to remove anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), DaemonError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DaemonError::Io {
            context: format!("cannot inspect {}", path.display()),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            tracing::info!(socket = %path.display(), "removing stale socket of an earlier daemon");
            std::fs::remove_file(path).map_err(|source| DaemonError::Io {
                context: format!("cannot remove stale socket {}", path.display()),
                source,
            })
        }
        Ok(_) => Err(DaemonError::InvalidInput(format!(
            "{} exists and is not a socket; remove it or choose another socket path",
            path.display()
        ))),
    }
}

/// Removes the socket files when dropped, whichever way `run` ends.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            // Only our own sockets: never a file someone put there meanwhile.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
