//! A store in a local directory.
//!
//! [`DirStore`] keeps object `key` in the file `root/key`. Writes go to a temporary file in
//! the same directory, are fsynced, renamed over the final name, and the directory is
//! fsynced: readers see the whole old object or the whole new one, and a returned `put` is
//! durable. Temporary files carry a `~` in their name, which no valid key contains, so
//! `list` never returns them (a crash can leave them behind; [`DirStore::remove_temp_files`]
//! removes them).
//!
//! All file-system work runs on tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Store, StoreError};

/// A [`super::Store`] whose objects are files under a root directory.
pub struct DirStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl DirStore {
    /// Open (creating if needed) the store rooted at `root`.
    pub fn open(root: PathBuf) -> std::io::Result<DirStore> {
        std::fs::create_dir_all(&root)?;
        Ok(DirStore {
            inner: Arc::new(Inner {
                root,
                tmp_counter: AtomicU64::new(0),
            }),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Remove temporary files left behind by writes interrupted by a crash. Call only while
    /// no `put` is running (at start-up). Returns how many were removed.
    pub fn remove_temp_files(&self) -> io::Result<u64> {
        fn walk(dir: &Path, n: &mut u64) -> io::Result<()> {
            for e in fs::read_dir(dir)? {
                let e = e?;
                let ft = e.file_type()?;
                if ft.is_dir() {
                    walk(&e.path(), n)?;
                } else if e.file_name().to_string_lossy().contains('~') {
                    fs::remove_file(e.path())?;
                    *n += 1;
                }
            }
            Ok(())
        }
        let mut n = 0;
        walk(&self.inner.root, &mut n)?;
        Ok(n)
    }

    async fn blocking<T, F>(&self, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &str) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let k = key.to_string();
        match tokio::task::spawn_blocking(move || f(&inner, &k)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Io {
                key: key.to_string(),
                source: io::Error::other(format!("blocking task failed: {e}")),
            }),
        }
    }
}

fn io_err(key: &str, source: io::Error) -> StoreError {
    if source.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound {
            key: key.to_string(),
        }
    } else {
        StoreError::Io {
            key: key.to_string(),
            source,
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let file = File::open(self.path(key)).map_err(|e| io_err(key, e))?;
        let size = file.metadata().map_err(|e| io_err(key, e))?.len();
        super::check_range(key, &range, size)?;
        let len = usize::try_from(range.end - range.start).map_err(|_| StoreError::Io {
            key: key.to_string(),
            source: io::Error::other("range larger than memory"),
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start).map_err(|e| {
            // The file shrank under us: objects are immutable, so this is corruption.
            StoreError::Io {
                key: key.to_string(),
                source: e,
            }
        })?;
        Ok(Bytes::from(buf))
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        fs::read(self.path(key))
            .map(Bytes::from)
            .map_err(|e| io_err(key, e))
    }

    /// Create the parent directories of `key`, fsyncing the parent of each one created.
    fn make_parents(&self, key: &str) -> io::Result<PathBuf> {
        let mut dir = self.root.clone();
        let segs: Vec<&str> = key.split('/').collect();
        for seg in &segs[..segs.len() - 1] {
            let parent = dir.clone();
            dir.push(seg);
            match fs::create_dir(&dir) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let e = |source| StoreError::Io {
            key: key.to_string(),
            source,
        };
        let dir = self.make_parents(key).map_err(e)?;
        let name = key.rsplit('/').next().unwrap_or(key);
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}~{}.{n}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, self.path(key))?;
            sync_dir(&dir)
        };
        write().map_err(|err| {
            let _ = fs::remove_file(&tmp);
            e(err)
        })
    }

    fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path(key)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        // Walk only the deepest directory the prefix names completely.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        fn walk(dir: &Path, key_prefix: &str, want: &str, out: &mut Vec<String>) -> io::Result<()> {
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in rd {
                let e = e?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let key = if key_prefix.is_empty() {
                    name
                } else {
                    format!("{key_prefix}/{name}")
                };
                // Prune subtrees that cannot match.
                let comparable = key.len().min(want.len());
                if key.as_bytes()[..comparable] != want.as_bytes()[..comparable] {
                    continue;
                }
                let ft = e.file_type()?;
                if ft.is_dir() {
                    walk(&e.path(), &key, want, out)?;
                } else if ft.is_file() && key.starts_with(want) && validate_key(&key).is_ok() {
                    out.push(key);
                }
            }
            Ok(())
        }
        walk(&start, dir_part, prefix, &mut out).map_err(|e| io_err(prefix, e))?;
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key, e)),
        }
    }
}

#[async_trait]
impl Store for DirStore {
    fn describe(&self) -> String {
        format!("dir:{}", self.inner.root.display())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        self.blocking(key, move |s, k| s.get_range(k, range)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        self.blocking(key, |s, k| s.get(k)).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        validate_key(key)?;
        self.blocking(key, move |s, k| s.put(k, &data)).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        validate_key(key)?;
        self.blocking(key, |s, k| s.head(k)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !prefix.is_empty() {
            // A prefix may end in '/' or mid-segment; validate it as if completed.
            let probe = format!("{}x", prefix);
            validate_key(&probe).map_err(|_| StoreError::InvalidKey {
                key: prefix.to_string(),
                reason: "invalid key prefix",
            })?;
        }
        self.blocking(prefix, |s, p| s.list(p)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.blocking(key, |s, k| s.delete(k)).await
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        validate_key(key).ok()?;
        Some(self.inner.path(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    super::super::conformance::store_conformance_tests!({
        let (d, s) = store();
        let s: Arc<dyn Store> = Arc::new(s);
        (d, s)
    });

    #[tokio::test]
    async fn bad_keys_have_no_local_path() {
        let (_d, s) = store();
        for k in ["", "../x", "a/../b", "/abs", "a//b", "x~y"] {
            assert!(s.local_path(k).is_none(), "{k:?}");
        }
    }

    fn store() -> (tempfile::TempDir, DirStore) {
        let dir = tempfile::Builder::new()
            .prefix("dirstore-")
            .tempdir_in(test_tmp())
            .unwrap();
        let s = DirStore::open(dir.path().join("root")).unwrap();
        (dir, s)
    }

    fn test_tmp() -> PathBuf {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    }

    #[tokio::test]
    async fn put_replaces_atomically_and_leaves_no_temp_files() {
        let (_d, s) = store();
        s.put("d/k", Bytes::from(vec![1u8; 1000])).await.unwrap();
        s.put("d/k", Bytes::from(vec![2u8; 10])).await.unwrap();
        assert_eq!(&s.get("d/k").await.unwrap()[..], &[2u8; 10]);
        let names: Vec<_> = fs::read_dir(s.root().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k")]);
    }

    #[tokio::test]
    async fn list_skips_temp_files() {
        let (_d, s) = store();
        s.put("a/k", Bytes::from_static(b"x")).await.unwrap();
        fs::write(s.root().join("a/.k~1.2"), b"partial").unwrap();
        assert_eq!(s.list("a/").await.unwrap(), vec!["a/k"]);
        assert_eq!(s.remove_temp_files().unwrap(), 1);
        assert_eq!(s.list("").await.unwrap(), vec!["a/k"]);
    }

    #[tokio::test]
    async fn local_path_points_at_object_file() {
        let (_d, s) = store();
        s.put("m/k", Bytes::from_static(b"abc")).await.unwrap();
        let p = s.local_path("m/k").unwrap();
        assert_eq!(fs::read(p).unwrap(), b"abc");
    }
}
