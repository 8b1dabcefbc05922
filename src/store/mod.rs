//! Image storage: objects (manifests, chunks) by key.
//!
//! [`Store`] is the minimal I/O every backend implements: ranged get, put, head, list,
//! delete. Policy (retries, timeouts, verification, caching) lives above the backends.
//! Backends: [`dir::DirStore`] (a local directory), [`object::RemoteStore`] (HTTP(S) and
//! S3-compatible object stores), [`mem::MemStore`] (in memory, for tests). Wrappers:
//! [`retry::RetryStore`] (timeouts, retries, concurrency limit, counters: the only place with
//! retry policy) and [`fault::FaultStore`] (fault injection, for tests). [`spec::StoreSpec`]
//! is the configuration of one store and [`spec::open_store`] builds it.
//!
//! Keys are relative, `/`-separated, made of `[A-Za-z0-9._-]` segments, never `..`: see
//! [`validate_key`]. The object layout of an image store is documented in `docs/store-format.md`.

use std::ops::Range;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Classify, ErrorKind};

#[cfg(test)]
pub(crate) mod conformance;
pub mod dir;
pub mod fault;
pub mod mem;
pub mod object;
pub mod retry;
pub mod spec;

/// Errors of store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("range {start}..{end} is outside object {key:?} of {size} bytes")]
    RangeOutOfBounds {
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("i/o error on object {key:?}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} is not supported by store {store}")]
    Unsupported { store: String, op: &'static str },
    #[error("request for object {key:?} failed")]
    Remote {
        key: String,
        /// The classification decided where the failure was seen (status code, transport).
        kind: ErrorKind,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("request for object {key:?} timed out after {after:?}")]
    Timeout {
        key: String,
        after: std::time::Duration,
    },
    #[error("invalid store {store:?}: {reason}")]
    InvalidSpec {
        store: String,
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

impl Classify for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::InvalidKey { .. } | StoreError::RangeOutOfBounds { .. } => {
                ErrorKind::InvalidInput
            }
            StoreError::Io { source, .. } => match ErrorKind::of_io(source) {
                ErrorKind::NotFound => ErrorKind::Io,
                k => k,
            },
            StoreError::Unsupported { .. } => ErrorKind::PermissionDenied,
            StoreError::Remote { kind, .. } => *kind,
            StoreError::Timeout { .. } => ErrorKind::Timeout,
            StoreError::InvalidSpec { .. } => ErrorKind::InvalidInput,
        }
    }
}

/// Object storage holding image manifests and chunks.
///
/// Contract: `put` is atomic (readers see the whole object or none) and durable when it
/// returns; `get_range` returns exactly `range.end - range.start` bytes or fails;
/// `delete` of a missing object succeeds; `list` returns full keys under `prefix`, sorted.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for logs and `store list` (e.g. `dir:/var/lib/imgcache/store`).
    fn describe(&self) -> String;

    /// The bytes `range` of object `key`.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError>;

    /// The whole object `key`.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Store `data` as object `key`, replacing any previous object atomically.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;

    /// The size of object `key`, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// All keys starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Remove object `key`; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Capability: the local file holding object `key`, when the store is a local directory.
    /// Lets the read path `pread` stored chunks directly instead of copying them through
    /// `get_range`.
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let _ = key;
        None
    }
}

/// Check that `key` is a safe relative object key.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, '.' or '..' path segment");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only letters, digits, '.', '_', '-' and '/' are allowed");
        }
    }
    Ok(())
}

/// `Ok` when `range` lies inside an object of `size` bytes, else `RangeOutOfBounds`.
pub fn check_range(key: &str, range: &Range<u64>, size: u64) -> Result<(), StoreError> {
    if range.start > range.end || range.end > size {
        return Err(StoreError::RangeOutOfBounds {
            key: key.to_string(),
            start: range.start,
            end: range.end,
            size,
        });
    }
    Ok(())
}
