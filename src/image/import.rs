//! Importing a raw file into a store: chunking, hashing, dedup, the manifest.
//!
//! [`import_file`] runs a small pipeline so reading, hashing and writing overlap:
//!
//! ```text
//! reader thread ──chunk──► md5 thread
//!               ├─chunk──► sha256 thread
//!               └─chunk──► blake3 thread (zero check + digest) ──► async task: ledger
//!                                                                  hold, head, put
//! ```
//!
//! Channels are bounded, so memory stays at a few chunks per stage. Chunk buffers are
//! `Bytes` shared by every stage (no copies). The async task keeps up to [`PUTS_IN_FLIGHT`]
//! chunk writes running at once. The manifest is written last, after the whole-file
//! checksum was verified: a manifest in the store always describes a complete import.
//!
//! [`import_device`] runs the same pipeline over any [`BlockDevice`] (images from volumes).
//!
//! Empty files are rejected ([`ImageError::EmptyFile`]): a zero-byte disk is never what the
//! user meant and NBD clients handle it badly.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use bytes::Bytes;
use md5::Digest as _;

use super::ledger::LedgerGuard;
use super::manifest::{valid_chunk_size, Manifest};
use super::{
    chunk_key, manifest_key, Checksum, ChunkLedger, ImageError, ImportOptions, Imported,
    IsReferenced,
};
use crate::device::BlockDevice;
use crate::store::{Store, StoreError};
use crate::types::{Digest, ImageId};

/// Chunk writes an import keeps running concurrently.
pub const PUTS_IN_FLIGHT: usize = 4;
/// Chunks buffered between pipeline stages.
const STAGE_DEPTH: usize = 4;

/// Import the raw file at `path` into `store` as image `id`.
///
/// Holds `ledger` references on every chunk it uses until the returned guard is dropped;
/// the caller drops it after committing the catalog row. On any failure (I/O, checksum
/// mismatch, cancel) it deletes the chunks and manifest it created that neither the
/// catalog (`is_referenced`) nor another in-flight import uses, and returns the error.
///
/// If the returned future is dropped before completion, the same cleanup runs on a spawned
/// task (after the chunk writes still in flight have finished). Should the process die
/// first, the start-up sweep ([`super::sweep_orphans`]) removes the leftovers.
pub async fn import_file(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    id: ImageId,
    path: &Path,
    opts: ImportOptions,
) -> Result<(Imported, LedgerGuard), ImageError> {
    let p = path.to_path_buf();
    let (file, size) = join(tokio::task::spawn_blocking(move || open_source(&p))).await??;
    let source = FileSource {
        file,
        path: path.to_path_buf(),
        size,
    };
    import_source(store, ledger, is_referenced, id, source, size, opts).await
}

/// Import the whole content of `device` (a volume, a snapshot view, an image) into `store`
/// as image `id`; `what` names it in errors. Same contract as [`import_file`]: chunks the
/// store already holds (e.g. the unchanged chunks of a volume's base image) are not
/// written again, so [`Imported::chunks_new`] counts only the changed ones.
///
/// The device is read once, front to back; writes racing with the import may or may not
/// be seen (snapshot the volume first for a point-in-time copy).
pub async fn import_device(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    id: ImageId,
    device: Arc<dyn BlockDevice>,
    what: String,
    opts: ImportOptions,
) -> Result<(Imported, LedgerGuard), ImageError> {
    let size = device.size();
    if size == 0 {
        return Err(ImageError::EmptyFile {
            path: PathBuf::from(what),
        });
    }
    let source = DeviceSource {
        device,
        what,
        rt: tokio::runtime::Handle::current(),
    };
    import_source(store, ledger, is_referenced, id, source, size, opts).await
}

async fn import_source(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    id: ImageId,
    source: impl Source,
    size: u64,
    opts: ImportOptions,
) -> Result<(Imported, LedgerGuard), ImageError> {
    if !valid_chunk_size(opts.chunk_size) {
        return Err(ImageError::InvalidChunkSize {
            chunk_size: opts.chunk_size,
        });
    }
    let mut armed = CleanupOnDrop {
        state: Some(ImportState {
            store,
            guard: ledger.guard(),
            created: Vec::new(),
            puts: VecDeque::new(),
            manifest_key: manifest_key(id),
        }),
        ledger: Arc::clone(&ledger),
        is_referenced: Arc::clone(&is_referenced),
    };
    let result = match armed.state.as_mut() {
        Some(state) => run(state, source, size, &opts).await,
        None => unreachable!("state is set above"),
    };
    let Some(mut state) = armed.state.take() else {
        unreachable!("state is taken only here or on drop")
    };
    match result {
        Ok(imported) => Ok((imported, state.guard)),
        Err(err) => {
            if let Err(cleanup_err) = cleanup(&mut state, &ledger, &is_referenced).await {
                tracing::warn!(
                    error = &cleanup_err as &dyn std::error::Error,
                    manifest = %state.manifest_key,
                    "cleanup after failed import left objects behind; the start-up sweep removes them"
                );
            }
            Err(err)
        }
    }
}

type PutTask = tokio::task::JoinHandle<Result<(), StoreError>>;

struct ImportState {
    store: Arc<dyn Store>,
    guard: LedgerGuard,
    /// Chunks this import found missing and wrote (possibly partially, on failure).
    created: Vec<Digest>,
    /// Chunk writes in flight, oldest first. Detached tasks (not aborted on drop), so
    /// cleanup can wait for them before deleting what they write.
    puts: VecDeque<PutTask>,
    manifest_key: String,
}

impl ImportState {
    /// Wait for the oldest in-flight chunk write.
    async fn finish_oldest_put(&mut self) -> Result<(), ImageError> {
        match self.puts.pop_front() {
            None => Ok(()),
            Some(h) => match h.await {
                Ok(r) => r.map_err(ImageError::from),
                Err(e) => Err(ImageError::Internal(format!(
                    "chunk write task failed: {e}"
                ))),
            },
        }
    }
}

/// Runs [`cleanup`] on a spawned task if the import future is dropped mid-way.
struct CleanupOnDrop {
    state: Option<ImportState>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        let (ledger, is_referenced) = (Arc::clone(&self.ledger), Arc::clone(&self.is_referenced));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = cleanup(&mut state, &ledger, &is_referenced).await {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            manifest = %state.manifest_key,
                            "cleanup after abandoned import failed; the start-up sweep removes the leftovers"
                        );
                    }
                });
            }
            Err(_) => tracing::warn!(
                manifest = %state.manifest_key,
                "import abandoned outside a runtime; the start-up sweep removes its chunks"
            ),
        }
    }
}

/// Delete what a failed import created, under the ledger lock, one chunk at a time.
async fn cleanup(
    state: &mut ImportState,
    ledger: &ChunkLedger,
    is_referenced: &IsReferenced,
) -> Result<(), StoreError> {
    // Let in-flight writes land first, or they could recreate a chunk after its delete.
    while let Some(h) = state.puts.pop_front() {
        let _ = h.await;
    }
    state.store.delete(&state.manifest_key).await?;
    for d in std::mem::take(&mut state.created) {
        let lock = ledger.lock_for_delete().await;
        state.guard.release(&d);
        if lock.holders(&d) == 0 && !is_referenced(&d) {
            state.store.delete(&chunk_key(&d)).await?;
        }
    }
    Ok(())
}

/// A chunk on its way through the pipeline.
struct Piece {
    data: Bytes,
}

/// The output of the blake3 stage: `None` digest for an all-zero chunk.
struct Hashed {
    data: Bytes,
    digest: Option<Digest>,
}

async fn run(
    state: &mut ImportState,
    source: impl Source,
    size: u64,
    opts: &ImportOptions,
) -> Result<Imported, ImageError> {
    let chunk_size = opts.chunk_size;

    let (md5_tx, md5_rx) = sync_channel::<Piece>(STAGE_DEPTH);
    let (sha_tx, sha_rx) = sync_channel::<Piece>(STAGE_DEPTH);
    let (b3_tx, b3_rx) = sync_channel::<Piece>(STAGE_DEPTH);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Hashed>(STAGE_DEPTH);

    let reader = {
        let cancel = Arc::clone(&opts.cancel);
        tokio::task::spawn_blocking(move || {
            read_chunks(source, size, chunk_size, &cancel, [md5_tx, sha_tx, b3_tx])
        })
    };
    let md5_task = tokio::task::spawn_blocking(move || hash_all(md5_rx, md5::Md5::new()));
    let sha_task = tokio::task::spawn_blocking(move || hash_all(sha_rx, sha2::Sha256::new()));
    let b3_task = tokio::task::spawn_blocking(move || {
        while let Ok(piece) = b3_rx.recv() {
            let digest = (!is_all_zero(&piece.data)).then(|| Digest::of(&piece.data));
            if out_tx
                .blocking_send(Hashed {
                    data: piece.data,
                    digest,
                })
                .is_err()
            {
                break;
            }
        }
    });

    let mut manifest = Manifest::new_holes(size, chunk_size);
    let mut index = 0u64;
    let mut done = 0u64;
    let mut chunks_hole = 0u64;
    let mut stored_size = 0u64;
    let consume = async {
        while let Some(h) = out_rx.recv().await {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(ImageError::Cancelled);
            }
            let len = h.data.len() as u64;
            if index >= manifest.chunk_count() {
                // The reader verifies the size; this is only a guard against a logic error.
                return Err(ImageError::Internal(
                    "more chunks than the file size allows".into(),
                ));
            }
            match h.digest {
                None => chunks_hole += 1,
                Some(d) => {
                    manifest.set_data(index, d);
                    if !state.guard.holds(&d) {
                        stored_size += len;
                        // Hold before looking: see ledger.rs.
                        state.guard.hold(d).await;
                        let key = chunk_key(&d);
                        let known = opts.known_present.as_ref().is_some_and(|k| k.contains(&d));
                        if !known && state.store.head(&key).await?.is_none() {
                            state.created.push(d);
                            while state.puts.len() >= PUTS_IN_FLIGHT {
                                state.finish_oldest_put().await?;
                            }
                            let store = Arc::clone(&state.store);
                            state.puts.push_back(tokio::spawn(async move {
                                store.put(&key, h.data).await
                            }));
                        }
                    }
                }
            }
            index += 1;
            done += len;
            if let Some(progress) = &opts.progress {
                progress(done, size);
            }
        }
        while !state.puts.is_empty() {
            state.finish_oldest_put().await?;
        }
        Ok(())
    }
    .await;
    // Stop the pipeline (if we failed early) and collect every stage before deciding.
    drop(out_rx);
    let read_result = join(reader).await;
    let _ = join(b3_task).await;
    let md5 = hex::encode(join(md5_task).await?);
    let sha256 = hex::encode(join(sha_task).await?);
    read_result??;
    consume?;
    if index != manifest.chunk_count() {
        return Err(ImageError::Internal(format!(
            "pipeline produced {index} chunks, expected {}",
            manifest.chunk_count()
        )));
    }

    if let Some(expected) = &opts.expected {
        let actual = match expected {
            Checksum::Md5(_) => format!("md5:{md5}"),
            Checksum::Sha256(_) => format!("sha256:{sha256}"),
        };
        let expected = expected.to_string();
        if actual != expected {
            return Err(ImageError::ChecksumMismatch { expected, actual });
        }
    }
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(ImageError::Cancelled);
    }

    state
        .store
        .put(&state.manifest_key, Bytes::from(manifest.encode()))
        .await?;
    let digests = manifest.distinct_digests();
    Ok(Imported {
        manifest_key: state.manifest_key.clone(),
        virtual_size: size,
        stored_size,
        chunk_size,
        md5,
        sha256,
        chunks_total: manifest.chunk_count(),
        chunks_hole,
        chunks_new: state.created.len() as u64,
        digests,
    })
}

async fn join<T>(h: tokio::task::JoinHandle<T>) -> Result<T, ImageError> {
    h.await
        .map_err(|e| ImageError::Internal(format!("import task failed: {e}")))
}

/// Open `path`, check it is a regular file or block device, and return it with its size.
fn open_source(path: &Path) -> Result<(File, u64), ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        Some("a directory")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_fifo() {
        Some("a fifo")
    } else if ft.is_socket() {
        Some("a socket")
    } else if !(ft.is_file() || ft.is_block_device()) {
        Some("not a regular file")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(ImageError::NotAFile {
            path: path.to_path_buf(),
            what,
        });
    }
    let mut file = File::open(path).map_err(read_err)?;
    let size = if ft.is_block_device() {
        file.seek(SeekFrom::End(0)).map_err(read_err)?
    } else {
        file.metadata().map_err(read_err)?.len()
    };
    if size == 0 {
        return Err(ImageError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if ft.is_block_device() {
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    }
    Ok((file, size))
}

/// Where an import's bytes come from. Used from one blocking thread, front to back.
trait Source: Send + 'static {
    /// Before the first read.
    fn start(&mut self) {}
    /// Fill `buf` with the bytes at `offset` (offsets only grow, by `buf.len()`).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// After the last chunk at `size`: check nothing follows.
    fn finish(&mut self, size: u64) -> Result<(), ImageError>;
}

/// A regular file or block device, read sequentially.
struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Source for FileSource {
    fn start(&mut self) {
        advise_sequential(&self.file);
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let got = read_full(&mut self.file, buf).map_err(|source| ImageError::Read {
            path: self.path.clone(),
            source,
        })?;
        if got < buf.len() {
            return Err(ImageError::FileChanged {
                path: self.path.clone(),
                expected: self.size,
                actual: offset + got as u64,
            });
        }
        Ok(())
    }

    fn finish(&mut self, size: u64) -> Result<(), ImageError> {
        let mut probe = [0u8; 1];
        let n = read_full(&mut self.file, &mut probe).map_err(|source| ImageError::Read {
            path: self.path.clone(),
            source,
        })?;
        if n != 0 {
            return Err(ImageError::FileChanged {
                path: self.path.clone(),
                expected: size,
                actual: size + 1,
            });
        }
        Ok(())
    }
}

/// A block device (its size is fixed for the handle's lifetime).
struct DeviceSource {
    device: Arc<dyn BlockDevice>,
    what: String,
    rt: tokio::runtime::Handle,
}

impl Source for DeviceSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let r = match self.device.try_read_nowait(offset, buf) {
            Some(r) => r,
            None => self.rt.block_on(self.device.read(offset, buf)),
        };
        r.map_err(|source| ImageError::DeviceRead {
            what: self.what.clone(),
            source,
        })
    }

    fn finish(&mut self, _size: u64) -> Result<(), ImageError> {
        Ok(())
    }
}

/// The reader stage: read `size` bytes in `chunk_size` pieces and fan each out.
fn read_chunks(
    mut source: impl Source,
    size: u64,
    chunk_size: u32,
    cancel: &AtomicBool,
    outs: [SyncSender<Piece>; 3],
) -> Result<(), ImageError> {
    source.start();
    let mut offset = 0u64;
    while offset < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(ImageError::Cancelled);
        }
        let len = (size - offset).min(u64::from(chunk_size)) as usize;
        let mut buf = vec![0u8; len];
        source.read_at(offset, &mut buf)?;
        offset += len as u64;
        let data = Bytes::from(buf);
        for out in &outs {
            if out.send(Piece { data: data.clone() }).is_err() {
                // A later stage stopped; it reports why.
                return Ok(());
            }
        }
    }
    source.finish(size)
}

fn advise_sequential(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; `file` keeps the fd open.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// Read until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn hash_all<H: md5::Digest>(rx: Receiver<Piece>, mut h: H) -> Vec<u8> {
    while let Ok(p) = rx.recv() {
        h.update(&p.data);
    }
    h.finalize().to_vec()
}

/// Whether every byte of `data` is zero (vectorised OR per 4 KiB block, early exit).
pub fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_all_zero_finds_any_set_byte() {
        let mut v = vec![0u8; 3 * 4096 + 5];
        assert!(is_all_zero(&v));
        for i in [0, 7, 4095, 4096, 3 * 4096 + 4] {
            v[i] = 1;
            assert!(!is_all_zero(&v), "{i}");
            v[i] = 0;
        }
        assert!(is_all_zero(&[]));
    }
}
