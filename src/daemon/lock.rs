//! The state-directory lock: one daemon per state directory.
//!
//! `STATE_DIR/lock` is held with an exclusive `flock` for the daemon's lifetime and contains
//! its pid, so a second daemon can say who holds it. The kernel drops the lock when the
//! process dies, however it dies; the file itself is left in place (removing it would let a
//! third daemon lock a fresh inode while the second still holds the old one).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::DaemonError;

/// Held while the daemon runs; dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

impl StateLock {
    /// Take the lock at `path` (the lock file of `state_dir`) and write our pid into it.
    pub fn acquire(path: &Path, state_dir: &Path) -> Result<StateLock, DaemonError> {
        let io_err = |source| DaemonError::Io {
            context: format!("cannot open lock file {}", path.display()),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(DaemonError::AlreadyRunning {
                    pid: text.trim().parse().ok(),
                    state_dir: state_dir.to_path_buf(),
                });
            }
            return Err(DaemonError::Io {
                context: format!("cannot lock {}", path.display()),
                source: err,
            });
        }
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()
        };
        write_pid(&mut file).map_err(|source| DaemonError::Io {
            context: format!("cannot write pid to {}", path.display()),
            source,
        })?;
        Ok(StateLock {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Leave no stale pid behind; the lock itself goes with the descriptor.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let _held = StateLock::acquire(&path, dir.path()).unwrap();
        let err = StateLock::acquire(&path, dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn lock_is_free_again_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        drop(StateLock::acquire(&path, dir.path()).unwrap());
        assert!(StateLock::acquire(&path, dir.path()).is_ok());
    }
}
