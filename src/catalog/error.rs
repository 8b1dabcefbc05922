//! [`CatalogError`]: the one error type of catalog operations, and its [`Classify`] mapping.

use std::path::PathBuf;

use crate::error::{Classify, ErrorKind};

/// Errors of catalog operations.
///
/// Messages are lower-case, name what was looked up or refused, and never paste in their
/// `#[source]` (walk the chain for that).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No image has this id or name (the text is what was looked up).
    #[error("image {0:?} not found")]
    NotFound(String),
    /// Another image (in any status, including the recycle bin) holds the name.
    #[error("an image named {0:?} exists already")]
    NameTaken(String),
    /// No volume has this name or id.
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    /// Another volume holds the name.
    #[error("a volume named {0:?} exists already")]
    VolumeNameTaken(String),
    /// The caller's input failed validation; the text says what and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the image's current state; the text says why.
    #[error("{0}")]
    Conflict(String),
    /// Kept for callers written against the signature stubs; the catalog never returns it.
    #[error("not implemented yet")]
    Unimplemented,
    /// The database file could not be opened or created.
    #[error("cannot open the catalog database {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// A redb operation failed; `context` says which catalog step it was.
    #[error("catalog storage failed while {context}")]
    Storage {
        context: &'static str,
        #[source]
        source: redb::Error,
    },
    /// The database was written by a newer imgcache with a schema this build does not know.
    #[error(
        "the catalog has schema version {found}, newer than the version {supported} this \
         imgcache supports; run a newer imgcache (downgrading a catalog is not supported)"
    )]
    SchemaTooNew { found: u64, supported: u64 },
    /// Stored bytes do not decode, or the tables disagree with each other.
    #[error("the catalog is corrupt: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<serde_json::Error>,
    },
}

impl CatalogError {
    pub(crate) fn corrupt(what: impl Into<String>) -> CatalogError {
        CatalogError::Corrupt {
            what: what.into(),
            source: None,
        }
    }
}

fn kind_of_redb(err: &redb::Error) -> ErrorKind {
    match err {
        redb::Error::Corrupted(_) => ErrorKind::Corrupt,
        redb::Error::Io(io) => ErrorKind::of_io(io),
        // Another process (another daemon) holds the file.
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => ErrorKind::Conflict,
        redb::Error::ValueTooLarge(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    }
}

impl Classify for CatalogError {
    fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::NotFound(_) => ErrorKind::NotFound,
            CatalogError::NameTaken(_) => ErrorKind::AlreadyExists,
            CatalogError::VolumeNotFound(_) => ErrorKind::NotFound,
            CatalogError::VolumeNameTaken(_) => ErrorKind::AlreadyExists,
            CatalogError::Invalid(_) => ErrorKind::InvalidInput,
            CatalogError::Conflict(_) => ErrorKind::Conflict,
            CatalogError::Unimplemented => ErrorKind::Internal,
            CatalogError::Open { source, .. } | CatalogError::Storage { source, .. } => {
                kind_of_redb(source)
            }
            // The file conflicts with this build; retrying will not help, upgrading will.
            CatalogError::SchemaTooNew { .. } => ErrorKind::Conflict,
            CatalogError::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }
}

/// Attach a catalog step to a redb result: `txn.commit().ctx("committing an import")?`.
pub(crate) trait StorageContext<T> {
    fn ctx(self, context: &'static str) -> Result<T, CatalogError>;
}

impl<T, E: Into<redb::Error>> StorageContext<T> for Result<T, E> {
    fn ctx(self, context: &'static str) -> Result<T, CatalogError> {
        self.map_err(|e| CatalogError::Storage {
            context,
            source: e.into(),
        })
    }
}
