//! The embedded catalog (redb): image rows and chunk reference counts.
//!
//! SIGNATURE STUBS: the catalog work fills in the bodies; the daemon and API are written
//! against these signatures. Keep them (extend, do not break).

use std::collections::HashSet;
use std::path::Path;

use crate::error::{Classify, ErrorKind};
use crate::types::{Digest, ImageId};

pub mod model;

pub use model::*;

/// Errors of catalog operations.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("an image named {0:?} exists already")]
    NameTaken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("not implemented yet")]
    Unimplemented,
}

impl Classify for CatalogError {
    fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::NotFound(_) => ErrorKind::NotFound,
            CatalogError::NameTaken(_) => ErrorKind::AlreadyExists,
            CatalogError::Invalid(_) => ErrorKind::InvalidInput,
            CatalogError::Conflict(_) => ErrorKind::Conflict,
            CatalogError::Unimplemented => ErrorKind::Internal,
        }
    }
}

/// What a finished import sets on its row.
#[derive(Debug, Clone)]
pub struct FinishImport {
    pub virtual_size: u64,
    pub stored_size: u64,
    pub chunk_size: u32,
    pub md5: String,
    pub sha256: String,
    pub manifest_key: String,
}

/// The catalog database.
pub struct Catalog {
    _private: (),
}

impl Catalog {
    /// Open or create the catalog at `path`, migrating an older schema version.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let _ = path;
        Err(CatalogError::Unimplemented)
    }

    /// Build a new row with status `importing` from a name and attributes (validated; defaults
    /// filled in) and insert it. Fails if the name is taken.
    pub fn insert_importing(
        &self,
        id: ImageId,
        name: &str,
        attrs: &ImageAttributes,
        store: &str,
    ) -> Result<ImageRecord, CatalogError> {
        let _ = (id, name, attrs, store);
        Err(CatalogError::Unimplemented)
    }

    /// Mark an importing row active with its content facts, and add one reference to each of
    /// `digests`, in one transaction.
    pub fn finish_import(
        &self,
        id: ImageId,
        facts: &FinishImport,
        digests: &[Digest],
    ) -> Result<ImageRecord, CatalogError> {
        let _ = (id, facts, digests);
        Err(CatalogError::Unimplemented)
    }

    /// Remove the row of a failed import (status importing). Missing row is not an error.
    pub fn remove_failed_import(&self, id: ImageId) -> Result<(), CatalogError> {
        let _ = id;
        Err(CatalogError::Unimplemented)
    }

    /// Look an image up by id (UUID text) or by name.
    pub fn get(&self, id_or_name: &str) -> Result<ImageRecord, CatalogError> {
        let _ = id_or_name;
        Err(CatalogError::Unimplemented)
    }

    /// All images sorted by name; rows with status `deleted` only if `include_deleted`.
    pub fn list(&self, include_deleted: bool) -> Result<Vec<ImageRecord>, CatalogError> {
        let _ = include_deleted;
        Err(CatalogError::Unimplemented)
    }

    /// Apply `patch` (validated; rename keeps names unique), bumping `updated_at`.
    pub fn update(&self, id: ImageId, patch: &ImagePatch) -> Result<ImageRecord, CatalogError> {
        let _ = (id, patch);
        Err(CatalogError::Unimplemented)
    }

    /// Apply a lifecycle action; refuses invalid transitions (deleting a protected image,
    /// enabling a deleted one, ...) with a `Conflict` saying why.
    pub fn transition(&self, id: ImageId, action: Lifecycle) -> Result<ImageRecord, CatalogError> {
        let _ = (id, action);
        Err(CatalogError::Unimplemented)
    }

    /// Remove the row of an image in the recycle bin (status deleted) for good, dropping one
    /// reference from each of its chunks; returns the row and the digests now unreferenced.
    pub fn expunge(&self, id: ImageId) -> Result<(ImageRecord, Vec<Digest>), CatalogError> {
        let _ = id;
        Err(CatalogError::Unimplemented)
    }

    /// Whether any committed image references chunk `digest`.
    pub fn is_referenced(&self, digest: &Digest) -> bool {
        let _ = digest;
        false
    }

    /// Every chunk digest referenced by a committed image.
    pub fn referenced_chunks(&self) -> Result<HashSet<Digest>, CatalogError> {
        Err(CatalogError::Unimplemented)
    }

    /// Every manifest key referenced by a row (any status).
    pub fn referenced_manifests(&self) -> Result<HashSet<String>, CatalogError> {
        Err(CatalogError::Unimplemented)
    }
}
