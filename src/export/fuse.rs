//! The FUSE front end: every export as a file under one mount point.
//!
//! The tree (layout and semantics are written down in `docs/fuse.md`):
//!
//! ```text
//! MOUNT/images/NAME    read-only devices, mode 0444, kernel page cache kept across opens
//! MOUNT/volumes/NAME   devices with `writable()`, mode 0660, direct I/O (no page cache)
//! ```
//!
//! - [`FuseExport`]: a mounted file system; [`FuseExport::mount`] prepares the mount point
//!   (replacing a stale mount a killed daemon left behind), mounts and starts the worker
//!   threads; [`FuseExport::unmount`] (and drop) unmounts.
//! - `ExportFs`: the [`fuser::Filesystem`]. Directory contents come from
//!   [`ExportRegistry::list`] and every lookup asks [`ExportRegistry::open`], so exports appear
//!   and disappear with the catalog; the kernel caches entries and attributes for [`TTL`].
//!
//! Inodes: 1 is the root, 2 `images`, 3 `volumes`. A file inode is bound to one device handle
//! (`Arc<dyn BlockDevice>`): when a name resolves to another handle (an image deleted and
//! added again) it gets a new inode, so the kernel never mixes the pages of two contents. An
//! inode lives while the kernel holds lookups on it or files are open on it.
//!
//! Threads: fuser runs [`DEFAULT_THREADS`] event loops, each on its own clone of the
//! `/dev/fuse` descriptor. A read is first tried inline with
//! [`BlockDevice::try_read_nowait`]; when that would block (a cache miss, a fetch) the read
//! moves to the tokio runtime with its reply, so a miss never holds up reads of cached data.
//! Writes run inline on the event loop (`Handle::block_on`; volumes write to local storage);
//! flush, trim and zeroing go to the runtime.
//!
//! Invariant: at most one open file of an inode has write access (a second `O_WRONLY` or
//! `O_RDWR` open gets `EBUSY`), so two FUSE writers never interleave on one volume.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::runtime::Handle;

use super::{ExportRegistry, ExportTimes};
use crate::device::{errno_of, BlockDevice, ExtentKind};
use crate::error::{Classify, ErrorKind};

/// The largest read or write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;
/// How long the kernel may cache names and attributes: an export added, disabled or deleted
/// shows within this time.
pub const TTL: Duration = Duration::from_secs(1);
/// Event-loop threads.
pub const DEFAULT_THREADS: usize = 4;

const ROOT_INO: u64 = 1;
/// The fixed directories: export names are `DIR/NAME`.
const DIRS: [(&str, u64); 2] = [("images", 2), ("volumes", 3)];
const FIRST_FILE_INO: u64 = 16;
const DIR_MODE: u16 = 0o755;
const READ_ONLY_MODE: u16 = 0o444;
const WRITABLE_MODE: u16 = 0o660;
/// How long an open for writing waits for the previous writer's release: close(2) returns
/// before the kernel sends RELEASE, so a writer that closes and reopens at once would
/// otherwise race its own release.
const WRITER_RELEASE_WAIT: Duration = Duration::from_millis(500);
/// Marks inode numbers shown in directory listings for exports not yet looked up.
const LISTING_INO_BIT: u64 = 1 << 63;

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("FUSE is not available (cannot open /dev/fuse)")]
    NoDevice(#[source] io::Error),
    #[error("cannot use {} as the FUSE mount point", path.display())]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is already mounted and answering; unmount it or choose another fuse-mount", path.display())]
    InUse { path: PathBuf },
    #[error("cannot mount FUSE on {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount FUSE from {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Classify for FuseError {
    fn kind(&self) -> ErrorKind {
        match self {
            FuseError::NoDevice(_) => ErrorKind::Unavailable,
            FuseError::InUse { .. } => ErrorKind::Conflict,
            FuseError::MountPoint { source, .. }
            | FuseError::Mount { source, .. }
            | FuseError::Unmount { source, .. } => ErrorKind::of_io(source),
        }
    }
}

/// A mounted FUSE export. Unmounted by [`FuseExport::unmount`] or on drop.
pub struct FuseExport {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl FuseExport {
    /// Mount the exports of `registry` on `mountpoint` (created if missing; a stale mount of
    /// a dead daemon there is detached first). Device futures run on `runtime`.
    pub fn mount(
        registry: Arc<dyn ExportRegistry>,
        runtime: Handle,
        mountpoint: &Path,
        threads: usize,
    ) -> Result<FuseExport, FuseError> {
        check_device()?;
        prepare_mountpoint(mountpoint)?;
        let fs = ExportFs::new(registry, runtime);
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("imgcache".into()),
            MountOption::Subtype("imgcache".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        // Root serves other users (qemu as its own user) with the modes doing the checks;
        // an unprivileged daemon mounts through fusermount3, which allows only its owner.
        config.acl = if is_root() {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        let mount_err = |source| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        let session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_err)?;
        let session = session.spawn().map_err(mount_err)?;
        Ok(FuseExport {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount and wait for the worker threads. When files are still open under the mount,
    /// it is detached instead (it disappears from the tree now; open files see `ENOTCONN`
    /// once the daemon exits) and the threads are left to end with the process.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(mount = %self.mountpoint.display(),
                    "files are still open under the FUSE mount; detaching it");
                detach(&self.mountpoint).map_err(|source| FuseError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
            Err(source) => Err(FuseError::Unmount {
                path: self.mountpoint.clone(),
                source,
            }),
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(error = %crate::error::chain(&e), "FUSE unmount failed");
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `/dev/fuse` can be opened (module loaded, device node present, permitted).
pub fn check_device() -> Result<(), FuseError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(FuseError::NoDevice)
}

/// Make `path` ready to mount on: create it if missing; if a FUSE daemon died with it
/// mounted (every access fails with `ENOTCONN`), detach that dead mount; refuse a live mount.
pub fn prepare_mountpoint(path: &Path) -> Result<(), FuseError> {
    let err = |source| FuseError::MountPoint {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::info!(mount = %path.display(),
                "replacing a stale FUSE mount left by a daemon that died");
            detach(path).map_err(err)?;
            // Several dead mounts may be stacked there; the next one shows the same way.
            return prepare_mountpoint(path);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .map_err(err);
        }
        Err(e) => return Err(err(e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )))
        }
        Ok(_) => {}
    }
    if is_mount_point(path).map_err(err)? {
        // The kernel answers stat of the root from its attribute cache for up to TTL after
        // the daemon died; a name never looked up before must ask the daemon.
        if dead_fuse_mount(path) {
            tracing::info!(mount = %path.display(),
                "replacing a stale FUSE mount left by a daemon that died");
            detach(path).map_err(err)?;
            return prepare_mountpoint(path);
        }
        return Err(FuseError::InUse {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether the mount at `path` belongs to a FUSE daemon that died: a lookup of a fresh name
/// (never cached) fails with `ENOTCONN`.
fn dead_fuse_mount(path: &Path) -> bool {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let probe = path.join(format!(".imgcache-probe-{}-{nanos}", std::process::id()));
    std::fs::symlink_metadata(probe).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Whether `path` (a directory) is the root of a mount.
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let here = std::fs::metadata(path)?;
    let parent = std::fs::metadata(path.join(".."))?;
    Ok(here.dev() != parent.dev() || here.ino() == parent.ino())
}

/// Lazily unmount `path` (`umount2(MNT_DETACH)`; `fusermount3 -uz` when not root).
pub fn detach(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; umount2 only
    // reads it.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    for helper in ["fusermount3", "fusermount"] {
        let out = std::process::Command::new(helper)
            .args(["-u", "-z", "--"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                return Ok(());
            }
        }
    }
    Err(err)
}

/// A file inode: one export name bound to one device handle.
struct Node {
    name: String,
    device: Arc<dyn BlockDevice>,
    times: ExportTimes,
    /// Lookups the kernel holds (`forget` gives them back).
    lookups: u64,
    /// Open files.
    opens: u64,
    /// Whether an open file has write access.
    writer: bool,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: String,
}

struct Tree {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<String, u64>,
    next_ino: u64,
    /// Open directories: their entries as listed at `opendir`.
    dirs: HashMap<u64, Vec<DirEntry>>,
}

impl Tree {
    /// Drop `ino` if nothing refers to it any more.
    fn maybe_drop(&mut self, ino: u64) {
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        if node.lookups == 0 && node.opens == 0 {
            let node = self.nodes.remove(&ino).expect("present");
            if self.by_name.get(&node.name) == Some(&ino) {
                self.by_name.remove(&node.name);
            }
        }
    }
}

/// One open file.
struct OpenFile {
    ino: u64,
    device: Arc<dyn BlockDevice>,
    write: bool,
}

/// The file system served to the kernel.
struct ExportFs {
    registry: Arc<dyn ExportRegistry>,
    rt: Handle,
    tree: Mutex<Tree>,
    /// Signalled when a writer releases its file.
    writer_released: Condvar,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    started: SystemTime,
    uid: u32,
    gid: u32,
}

thread_local! {
    /// Each event loop's read buffer, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(err: &io::Error) -> Errno {
    Errno::from_i32(errno_of(err))
}

fn dir_of(ino: u64) -> Option<&'static str> {
    DIRS.iter().find(|(_, i)| *i == ino).map(|(d, _)| *d)
}

impl ExportFs {
    fn new(registry: Arc<dyn ExportRegistry>, rt: Handle) -> ExportFs {
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ExportFs {
            registry,
            rt,
            tree: Mutex::new(Tree {
                nodes: HashMap::new(),
                by_name: HashMap::new(),
                next_ino: FIRST_FILE_INO,
                dirs: HashMap::new(),
            }),
            writer_released: Condvar::new(),
            files: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            started: SystemTime::now(),
            uid,
            gid,
        }
    }

    fn dir_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: DIR_MODE,
            nlink: if ino == ROOT_INO {
                2 + DIRS.len() as u32
            } else {
                2
            },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, node: &Node) -> FileAttr {
        let size = node.device.size();
        let perm = if node.device.writable().is_some() {
            WRITABLE_MODE
        } else {
            READ_ONLY_MODE
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.times.modified,
            mtime: node.times.modified,
            ctime: node.times.modified,
            crtime: node.times.created,
            kind: FileType::RegularFile,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: MAX_IO,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT_INO || dir_of(ino).is_some() {
            return Some(self.dir_attr(ino));
        }
        let tree = self.tree.lock();
        tree.nodes.get(&ino).map(|n| self.file_attr(ino, n))
    }

    /// Resolve export `name` through the registry and take one lookup on its inode.
    fn lookup_export(&self, name: &str) -> Option<FileAttr> {
        let (export, times) = {
            // The registry may run async code (opening an image) on this thread.
            let _rt = self.rt.enter();
            let export = self.registry.open(name)?;
            let times = self.registry.times(name).unwrap_or(ExportTimes {
                created: self.started,
                modified: self.started,
            });
            (export, times)
        };
        let mut tree = self.tree.lock();
        let existing = tree.by_name.get(name).copied().filter(|ino| {
            tree.nodes
                .get(ino)
                .is_some_and(|n| Arc::ptr_eq(&n.device, &export.device))
        });
        let ino = match existing {
            Some(ino) => ino,
            None => {
                let ino = tree.next_ino;
                tree.next_ino += 1;
                tree.nodes.insert(
                    ino,
                    Node {
                        name: name.to_string(),
                        device: export.device,
                        times,
                        lookups: 0,
                        opens: 0,
                        writer: false,
                    },
                );
                tree.by_name.insert(name.to_string(), ino);
                ino
            }
        };
        let node = tree.nodes.get_mut(&ino).expect("inserted above");
        node.times = times;
        node.lookups += 1;
        let node = &tree.nodes[&ino];
        Some(self.file_attr(ino, node))
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<OpenFile>> {
        self.files.read().get(&fh.0).cloned()
    }

    fn entries(&self, ino: u64) -> Option<Vec<DirEntry>> {
        let dot = |ino, name: &str| DirEntry {
            ino,
            kind: FileType::Directory,
            name: name.to_string(),
        };
        if ino == ROOT_INO {
            let mut out = vec![dot(ROOT_INO, "."), dot(ROOT_INO, "..")];
            out.extend(DIRS.iter().map(|(d, i)| dot(*i, d)));
            return Some(out);
        }
        let dir = dir_of(ino)?;
        let mut out = vec![dot(ino, "."), dot(ROOT_INO, "..")];
        let listing = {
            let _rt = self.rt.enter();
            self.registry.list()
        };
        let tree = self.tree.lock();
        for export in listing {
            let Some(name) = export
                .name
                .strip_prefix(dir)
                .and_then(|r| r.strip_prefix('/'))
            else {
                continue;
            };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            // Listings carry inode numbers only as hints; lookups bind the real ones.
            let ino = tree
                .by_name
                .get(&export.name)
                .copied()
                .unwrap_or_else(|| listing_ino(&export.name));
            out.push(DirEntry {
                ino,
                kind: FileType::RegularFile,
                name: name.to_string(),
            });
        }
        Some(out)
    }
}

/// A stable inode number hint for an export not looked up yet.
fn listing_ino(name: &str) -> u64 {
    let hash = blake3::hash(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(b) | LISTING_INO_BIT
}

impl fuser::Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Each on its own: an old kernel lacking one still gets the others.
        for cap in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(capability = ?cap, "FUSE capability not offered by the kernel");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        if parent.0 == ROOT_INO {
            return match DIRS.iter().find(|(d, _)| *d == name) {
                Some((_, ino)) => reply.entry(&TTL, &self.dir_attr(*ino), Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let Some(dir) = dir_of(parent.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        match self.lookup_export(&format!("{dir}/{name}")) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut tree = self.tree.lock();
        if let Some(node) = tree.nodes.get_mut(&ino.0) {
            node.lookups = node.lookups.saturating_sub(nlookup);
            tree.maybe_drop(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Owner, mode and size are fixed; time changes (touch) are accepted and not kept.
        if mode.is_some_and(|m| m as u16 & 0o7777 != attr.perm)
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
            || size.is_some_and(|s| s != attr.size)
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let mut tree = self.tree.lock();
        if write {
            let deadline = std::time::Instant::now() + WRITER_RELEASE_WAIT;
            while tree.nodes.get(&ino.0).is_some_and(|n| n.writer) {
                if self
                    .writer_released
                    .wait_until(&mut tree, deadline)
                    .timed_out()
                {
                    break;
                }
            }
        }
        let Some(node) = tree.nodes.get_mut(&ino.0) else {
            return reply.error(if dir_of(ino.0).is_some() || ino.0 == ROOT_INO {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
        };
        let writable = node.device.writable().is_some();
        if write {
            if !writable {
                return reply.error(Errno::EROFS);
            }
            if node.writer {
                return reply.error(Errno::EBUSY);
            }
            node.writer = true;
        }
        node.opens += 1;
        let file = Arc::new(OpenFile {
            ino: ino.0,
            device: node.device.clone(),
            write,
        });
        drop(tree);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.write().insert(fh, file);
        // O_TRUNC is ignored, as on a block device. Writable devices bypass the page cache
        // so every front end sees the same bytes; read-only contents never change for one
        // inode, so their cached pages stay valid across opens.
        let open_flags = if writable {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), open_flags)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let dev_size = file.device.size();
        if offset >= dev_size || size == 0 {
            return reply.data(&[]);
        }
        let len = (dev_size - offset).min(u64::from(size)) as usize;
        // Cached data is answered inline, straight from this loop's buffer.
        let pending = READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match file.device.try_read_nowait(offset, &mut buf[..len]) {
                Some(Ok(())) => {
                    reply.data(&buf[..len]);
                    None
                }
                Some(Err(e)) => {
                    reply.error(errno(&e));
                    None
                }
                None => Some(reply),
            }
        });
        // A miss waits on the runtime, not on this loop.
        if let Some(reply) = pending {
            self.rt.spawn(async move {
                let mut buf = vec![0u8; len];
                match file.device.read(offset, &mut buf).await {
                    Ok(()) => reply.data(&buf),
                    Err(e) => reply.error(errno(&e)),
                }
            });
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let Some(dev) = file.device.writable().filter(|_| file.write) else {
            return reply.error(Errno::EBADF);
        };
        let dev_size = file.device.size();
        if data.is_empty() {
            return reply.written(0);
        }
        if offset >= dev_size {
            return reply.error(Errno::ENOSPC);
        }
        // A write crossing the end is cut short there, as on a block device.
        let n = (dev_size - offset).min(data.len() as u64) as usize;
        let fua = flags.0 & libc::O_DSYNC != 0;
        let result = self.rt.block_on(dev.write(offset, &data[..n], fua));
        match result {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing is buffered here; durability is fsync's job.
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.files.write().remove(&fh.0) {
            let mut tree = self.tree.lock();
            if let Some(node) = tree.nodes.get_mut(&file.ino) {
                node.opens = node.opens.saturating_sub(1);
                if file.write {
                    node.writer = false;
                    self.writer_released.notify_all();
                }
                tree.maybe_drop(file.ino);
            }
        }
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        if file.device.writable().is_none() {
            return reply.ok();
        }
        self.rt.spawn(async move {
            let dev = file.device.writable().expect("checked above");
            match dev.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        if file.device.writable().is_none() || !file.write {
            return reply.error(Errno::EBADF);
        }
        let op = match fallocate_op(mode, offset, length, file.device.size()) {
            Ok(Some(op)) => op,
            Ok(None) => return reply.ok(),
            Err(e) => return reply.error(e),
        };
        self.rt.spawn(async move {
            let dev = file.device.writable().expect("checked above");
            let result = match op {
                FallocOp::Trim { offset, len } => dev.trim(offset, len, false).await,
                FallocOp::Zero { offset, len } => dev.write_zeroes(offset, len, false, false).await,
            };
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        match seek_data_hole(&*file.device, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(entries) = self.entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.tree.lock().dirs.insert(fh, entries);
        reply.opened(FileHandle(fh), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let tree = self.tree.lock();
        let Some(entries) = tree.dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        drop(tree);
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.tree.lock().dirs.remove(&fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; the kernel checks modes otherwise.
        reply.ok()
    }

    // No extended attributes, ioctls or server-side copies: ENOSYS makes the kernel stop
    // asking (and fall back to read/write for copies).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS)
    }
}

/// What a `fallocate` call asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FallocOp {
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// Translate `fallocate(mode, offset, length)` on a device of `size` bytes.
///
/// `PUNCH_HOLE|KEEP_SIZE` trims, `ZERO_RANGE` writes zeros, both clipped to the size;
/// plain allocation inside the size succeeds without doing anything (nothing is reserved);
/// anything that would grow the file fails with `ENOSPC`, other modes with `EOPNOTSUPP`.
/// `Ok(None)`: nothing to do.
fn fallocate_op(mode: i32, offset: u64, length: u64, size: u64) -> Result<Option<FallocOp>, Errno> {
    const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
    let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
    if length == 0 {
        return Err(Errno::EINVAL);
    }
    let grows = end > size;
    let clipped = (offset < size).then(|| (offset, end.min(size) - offset));
    match mode {
        m if m == PUNCH | KEEP => Ok(clipped.map(|(offset, len)| FallocOp::Trim { offset, len })),
        m if m == ZERO || m == ZERO | KEEP => {
            if grows && m & KEEP == 0 {
                return Err(Errno::ENOSPC);
            }
            Ok(clipped.map(|(offset, len)| FallocOp::Zero { offset, len }))
        }
        0 | KEEP => {
            if grows && mode & KEEP == 0 {
                Err(Errno::ENOSPC)
            } else {
                Ok(None)
            }
        }
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)` from the device's extents.
fn seek_data_hole(dev: &dyn BlockDevice, offset: i64, whence: i32) -> Result<i64, Errno> {
    let want = match whence {
        libc::SEEK_DATA => ExtentKind::Data,
        libc::SEEK_HOLE => ExtentKind::Hole,
        _ => return Err(Errno::EINVAL),
    };
    let size = dev.size();
    let start = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
    if start >= size {
        return Err(Errno::ENXIO);
    }
    let mut pos = start;
    while pos < size {
        let extents = dev.extents(pos, size - pos, 256);
        let Some(last) = extents.last() else {
            break;
        };
        if let Some(e) = extents.iter().find(|e| e.kind == want) {
            return Ok(e.offset.max(start) as i64);
        }
        let next = last.offset + last.len;
        if next <= pos {
            break;
        }
        pos = next;
    }
    match want {
        ExtentKind::Data => Err(Errno::ENXIO),
        // The end of the device is a hole, as lseek(2) defines it.
        ExtentKind::Hole => Ok(size as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mem::MemDevice;

    const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

    #[test]
    fn punch_hole_past_the_end_is_clipped_to_the_size() {
        let op = fallocate_op(PUNCH | KEEP, 100, 1000, 600).unwrap();
        assert_eq!(
            op,
            Some(FallocOp::Trim {
                offset: 100,
                len: 500
            })
        );
        assert_eq!(fallocate_op(PUNCH | KEEP, 700, 10, 600).unwrap(), None);
    }

    #[test]
    fn zero_range_that_would_grow_the_file_is_enospc() {
        assert_eq!(fallocate_op(ZERO, 500, 200, 600), Err(Errno::ENOSPC));
        assert_eq!(
            fallocate_op(ZERO | KEEP, 500, 200, 600).unwrap(),
            Some(FallocOp::Zero {
                offset: 500,
                len: 100
            })
        );
    }

    #[test]
    fn plain_allocation_inside_the_size_does_nothing() {
        assert_eq!(fallocate_op(0, 0, 600, 600).unwrap(), None);
        assert_eq!(fallocate_op(0, 0, 601, 600), Err(Errno::ENOSPC));
        assert_eq!(fallocate_op(PUNCH, 0, 1, 600), Err(Errno::EOPNOTSUPP));
        assert_eq!(fallocate_op(KEEP, 0, 0, 600), Err(Errno::EINVAL));
    }

    #[test]
    fn seek_data_and_hole_follow_extents() {
        let dev = MemDevice::new(vec![1u8; 4096 * 4]).with_hole(4096..8192);
        assert_eq!(seek_data_hole(&dev, 0, libc::SEEK_HOLE), Ok(4096));
        assert_eq!(seek_data_hole(&dev, 4096, libc::SEEK_DATA), Ok(8192));
        assert_eq!(seek_data_hole(&dev, 8192, libc::SEEK_HOLE), Ok(16384));
        assert_eq!(
            seek_data_hole(&dev, 16384, libc::SEEK_DATA),
            Err(Errno::ENXIO)
        );
        assert_eq!(seek_data_hole(&dev, 0, libc::SEEK_SET), Err(Errno::EINVAL));
    }
}
