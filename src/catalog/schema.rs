//! The catalog's tables, their key/value encodings, the schema version and migrations.
//!
//! Byte layouts are described in `docs/catalog.md`. Invariants kept by every write
//! transaction of [`super::Catalog`]:
//!
//! - every row of `images` has exactly one entry in `image_names` (its name), and back;
//! - `image_chunks` has an entry exactly for rows that finished importing;
//! - `chunk_refs[d]` is the number of `image_chunks` entries that contain `d`, and is never 0
//!   (a count that drops to 0 is removed);
//! - `recycle_bin` has an entry exactly for rows with status `deleted`.

use redb::{Database, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::error::{CatalogError, StorageContext};
use super::model::{ImageRecord, ImageStatus};
use crate::types::{Digest, ImageId};

/// `meta`: text key → u64. Holds [`SCHEMA_VERSION_KEY`].
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `images`: 16-byte uuid → serde_json of [`ImageRecord`].
pub(crate) const IMAGES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("images");
/// `image_names`: UTF-8 name → 16-byte uuid. The unique name index.
pub(crate) const IMAGE_NAMES: TableDefinition<&str, [u8; 16]> = TableDefinition::new("image_names");
/// `chunk_refs`: 32-byte blake3 digest → number of images referencing the chunk (≥ 1).
pub(crate) const CHUNK_REFS: TableDefinition<[u8; 32], u64> = TableDefinition::new("chunk_refs");
/// `image_chunks`: 16-byte uuid → the image's distinct digests, 32 bytes each, concatenated.
pub(crate) const IMAGE_CHUNKS: TableDefinition<[u8; 16], &[u8]> =
    TableDefinition::new("image_chunks");
/// `recycle_bin`: 16-byte uuid → serde_json of [`BinEntry`] for rows with status `deleted`.
pub(crate) const RECYCLE_BIN: TableDefinition<[u8; 16], &[u8]> =
    TableDefinition::new("recycle_bin");

/// The key of the schema version in `meta`.
pub(crate) const SCHEMA_VERSION_KEY: &str = "schema_version";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u64 = 2;

/// One migration step: rewrites a catalog of version N into version N+1, inside the open
/// transaction (the caller bumps the version and commits).
pub(crate) type MigrationStep = fn(&WriteTransaction) -> Result<(), CatalogError>;

/// `MIGRATIONS[i]` upgrades version `i + 1` to `i + 2`; its length is `SCHEMA_VERSION - 1`.
pub(crate) const MIGRATIONS: &[MigrationStep] = &[super::volumes::migrate_v1_to_v2];

/// A schema: its version and the steps that lead to it from version 1. Tests build fake ones.
#[derive(Clone, Copy)]
pub(crate) struct Schema {
    pub version: u64,
    pub migrations: &'static [MigrationStep],
}

pub(crate) const CURRENT: Schema = Schema {
    version: SCHEMA_VERSION,
    migrations: MIGRATIONS,
};

/// What the recycle bin remembers of a deleted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BinEntry {
    /// The status `recover` restores.
    pub prior_status: ImageStatus,
    /// Seconds since the Unix epoch.
    pub deleted_at: u64,
}

/// Bring a freshly opened database to `schema`: initialise an empty one, migrate an older one,
/// refuse a newer one. Everything happens in one write transaction, so a crash during a
/// migration leaves the previous version intact.
pub(crate) fn prepare(db: &Database, schema: Schema) -> Result<(), CatalogError> {
    debug_assert_eq!(schema.migrations.len() as u64, schema.version - 1);
    let txn = db.begin_write().ctx("starting the schema check")?;
    let tables: Vec<String> = txn
        .list_tables()
        .ctx("listing tables")?
        .map(|t| t.name().to_owned())
        .collect();
    let found = if tables.iter().any(|t| t == META.name()) {
        let meta = txn.open_table(META).ctx("opening the meta table")?;
        let version = meta
            .get(SCHEMA_VERSION_KEY)
            .ctx("reading the schema version")?
            .map(|v| v.value());
        version
    } else {
        None
    };
    if found.is_none() && !tables.is_empty() {
        return Err(CatalogError::corrupt(
            "the file has tables but no schema version; is it an imgcache catalog?",
        ));
    }
    match found {
        None => {
            tracing::info!(version = schema.version, "initialising a new catalog");
        }
        Some(0) => return Err(CatalogError::corrupt("schema version 0 is not valid")),
        Some(v) if v > schema.version => {
            return Err(CatalogError::SchemaTooNew {
                found: v,
                supported: schema.version,
            })
        }
        Some(v) if v == schema.version => {}
        Some(v) => {
            for (i, step) in schema.migrations.iter().enumerate().skip(v as usize - 1) {
                let from = i as u64 + 1;
                tracing::info!(from, to = from + 1, "migrating the catalog schema");
                step(&txn)?;
            }
        }
    }
    {
        let mut meta = txn.open_table(META).ctx("opening the meta table")?;
        meta.insert(SCHEMA_VERSION_KEY, schema.version)
            .ctx("writing the schema version")?;
        // Create every table now so that read transactions never find one missing.
        txn.open_table(IMAGES).ctx("creating tables")?;
        txn.open_table(IMAGE_NAMES).ctx("creating tables")?;
        txn.open_table(CHUNK_REFS).ctx("creating tables")?;
        txn.open_table(IMAGE_CHUNKS).ctx("creating tables")?;
        txn.open_table(RECYCLE_BIN).ctx("creating tables")?;
        if schema.version >= 2 {
            super::volumes::create_tables(&txn)?;
        }
    }
    txn.commit().ctx("committing the schema")?;
    Ok(())
}

pub(crate) fn id_key(id: ImageId) -> [u8; 16] {
    *id.0.as_bytes()
}

pub(crate) fn id_from_key(key: [u8; 16]) -> ImageId {
    ImageId(uuid::Uuid::from_bytes(key))
}

pub(crate) fn encode_record(rec: &ImageRecord) -> Vec<u8> {
    // Serializing a plain struct of strings, numbers and maps cannot fail.
    serde_json::to_vec(rec).expect("an ImageRecord always serializes")
}

pub(crate) fn decode_record(key: [u8; 16], bytes: &[u8]) -> Result<ImageRecord, CatalogError> {
    let rec: ImageRecord = serde_json::from_slice(bytes).map_err(|e| CatalogError::Corrupt {
        what: format!("image row {} does not decode", id_from_key(key)),
        source: Some(e),
    })?;
    if rec.id != id_from_key(key) {
        return Err(CatalogError::corrupt(format!(
            "image row {} holds the id {}",
            id_from_key(key),
            rec.id
        )));
    }
    Ok(rec)
}

pub(crate) fn encode_bin(entry: &BinEntry) -> Vec<u8> {
    serde_json::to_vec(entry).expect("a BinEntry always serializes")
}

pub(crate) fn decode_bin(id: ImageId, bytes: &[u8]) -> Result<BinEntry, CatalogError> {
    serde_json::from_slice(bytes).map_err(|e| CatalogError::Corrupt {
        what: format!("recycle bin entry of {id} does not decode"),
        source: Some(e),
    })
}

pub(crate) fn encode_digests(digests: &[Digest]) -> Vec<u8> {
    digests.iter().flat_map(|d| d.0).collect()
}

pub(crate) fn decode_digests(id: ImageId, bytes: &[u8]) -> Result<Vec<Digest>, CatalogError> {
    if bytes.len() % 32 != 0 {
        return Err(CatalogError::corrupt(format!(
            "chunk list of image {id} is {} bytes, not a multiple of 32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| Digest(c.try_into().expect("chunks_exact yields 32 bytes")))
        .collect())
}

/// Read one image row from any readable `images` table.
pub(crate) fn read_row(
    images: &impl ReadableTable<[u8; 16], &'static [u8]>,
    id: ImageId,
) -> Result<Option<ImageRecord>, CatalogError> {
    let key = id_key(id);
    match images.get(key).ctx("reading an image row")? {
        Some(v) => decode_record(key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// Every image row, in key order.
pub(crate) fn read_all_rows(
    images: &impl ReadableTable<[u8; 16], &'static [u8]>,
) -> Result<Vec<ImageRecord>, CatalogError> {
    let mut out = Vec::new();
    for item in images.iter().ctx("listing image rows")? {
        let (k, v) = item.ctx("listing image rows")?;
        out.push(decode_record(k.value(), v.value())?);
    }
    Ok(out)
}
