//! The overlay's file I/O, behind two small traits so the crash simulator can stand in for the
//! real file system.
//!
//! [`OverlayFile`] is the minimal positioned I/O one file needs; [`OverlayStorage`] names the
//! files of one overlay (a directory). Policy (ordering of syncs, what may be reused when) lives
//! in the overlay above; backends only do I/O. [`DirStorage`] is the real backend;
//! [`super::sim::SimStorage`] remembers which bytes are durable and can produce the state after
//! a power loss.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys;

/// One file of an overlay.
///
/// Contracts: `read_at` fills the whole buffer; bytes past the end of the file read as zeros
/// (never an error), so callers need not track lengths for sparse data. `write_at` writes all
/// of `buf`, extending the file if needed; it is *not* durable until `sync` returns. `sync`
/// makes every earlier completed `write_at`, `set_len` and `punch` of this file durable (like
/// `fdatasync`); it says nothing about other files.
#[allow(clippy::len_without_is_empty)]
pub trait OverlayFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
    /// The current length (including writes not yet durable).
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocate `offset .. offset+len`; afterwards it reads as zeros. Length is unchanged.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Fill `buf` without blocking if the data is in memory; `None` when it would block or the
    /// backend cannot tell. Bytes must lie inside the file.
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        let _ = (buf, offset);
        None
    }
    /// The file's memory, when it lives on a memory file system: writes may land there
    /// directly (see [`sys::FileMemory`]). Such writes count as `write_at`s for `sync`.
    fn memory(&self) -> Option<&sys::FileMemory> {
        None
    }
}

/// The named files of one overlay. Names are plain file names (`super`, `journal`, ...).
pub trait OverlayStorage: Send + Sync {
    /// Open `name`, creating it empty if `create` and it does not exist. A created file's
    /// directory entry is durable when this returns.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn OverlayFile>>;
    /// Whether `name` exists.
    fn exists(&self, name: &str) -> io::Result<bool>;
}

/// A real file.
pub struct RealFile {
    /// Dropped before `file` (declared first), as its mappings use `file`'s fd.
    memory: Option<sys::FileMemory>,
    file: File,
    /// On tmpfs `RWF_NOWAIT` may be unsupported but reads never block: read directly.
    memory_backed: bool,
}

impl RealFile {
    pub fn new(file: File) -> Self {
        let memory_backed = sys::is_memory_backed(&file);
        RealFile {
            memory: memory_backed.then(|| sys::FileMemory::new(&file)),
            file,
            memory_backed,
        }
    }
}

impl RealFile {
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl OverlayFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        sys::pwrite_all(&self.file, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        match sys::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            // A file system without hole punching: write zeros instead.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn memory(&self) -> Option<&sys::FileMemory> {
        self.memory.as_ref()
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        match sys::pread_nowait(&self.file, buf, offset) {
            Ok(sys::NoWait::Done) => Some(Ok(())),
            Ok(sys::NoWait::Unsupported) if self.memory_backed => Some(self.read_at(buf, offset)),
            Ok(sys::NoWait::WouldBlock | sys::NoWait::Unsupported) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// An overlay stored as files in one directory.
pub struct DirStorage {
    dir: PathBuf,
}

impl DirStorage {
    /// Use `dir`, creating it (and its parents) if missing.
    pub fn create_dir(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(DirStorage {
            dir: dir.to_path_buf(),
        })
    }

    /// Use an existing directory.
    pub fn new(dir: &Path) -> Self {
        DirStorage {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl OverlayStorage for DirStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn OverlayFile>> {
        let path = self.dir.join(name);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(&path)?;
        if create && !existed {
            // Make the new directory entry durable.
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(Arc::new(RealFile::new(file)))
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.dir.join(name).exists())
    }
}
