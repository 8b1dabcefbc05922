//! Volume rows: a volume is a copy-on-write disk over one image (schema version 2).
//!
//! Tables (byte layouts in `docs/catalog.md`):
//! - `volumes`: 16-byte uuid → serde_json of [`VolumeRecord`];
//! - `volume_names`: UTF-8 name → 16-byte uuid, the unique name index.
//!
//! Invariants kept by every write transaction: every row of `volumes` has exactly one entry
//! in `volume_names` and back; a volume that is not `flattened` names an image row that
//! exists (the daemon refuses to expunge an image that volumes still read from).
//!
//! The overlay itself (data, block map, snapshots) lives in `STATE/volumes/<id>/`; the row
//! only says which image is its base and what the volume is called.

use std::fmt;
use std::str::FromStr;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::error::{CatalogError, StorageContext};
use super::{now_secs, Catalog};
use crate::types::ImageId;

/// `volumes`: 16-byte uuid → serde_json of [`VolumeRecord`].
pub(crate) const VOLUMES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("volumes");
/// `volume_names`: UTF-8 name → 16-byte uuid.
pub(crate) const VOLUME_NAMES: TableDefinition<&str, [u8; 16]> =
    TableDefinition::new("volume_names");

/// The identity of a volume (a v4 UUID); also the name of its overlay directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VolumeId(pub uuid::Uuid);

impl VolumeId {
    pub fn random() -> VolumeId {
        VolumeId(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for VolumeId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(VolumeId)
    }
}

/// One volume as the catalog stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    /// The base image (its row may be in the recycle bin).
    pub image_id: ImageId,
    /// The image's name when the volume was created, for display.
    pub image_name: String,
    /// Virtual size in bytes (grows with `resize`).
    pub size: u64,
    /// Bytes of the base image (the image's virtual size).
    pub base_len: u64,
    /// Set once a flatten finished: no block reads from the image any more.
    #[serde(default)]
    pub flattened: bool,
    /// `VOL@SNAP` when made from a snapshot of another volume.
    #[serde(default)]
    pub origin: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

/// Volume and snapshot names: 1 to 64 of `A-Za-z0-9._-`, not starting with `.` or `-`,
/// not a UUID (`@` separates `VOL@SNAP`, `/` export path segments).
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    validate_simple_name("volume", name)
}

/// Snapshot names follow the volume-name rules.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    validate_simple_name("snapshot", name)
}

fn validate_simple_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "invalid {what} name {name:?}: must be 1 to 64 characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "invalid {what} name {name:?}: character {c:?} is not allowed (letters, digits and ._- only)"
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!(
            "invalid {what} name {name:?}: must not start with '.' or '-'"
        ));
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(format!(
            "invalid {what} name {name:?}: a name cannot look like an id"
        ));
    }
    Ok(())
}

/// Migration step 1 → 2: create the volume tables.
pub(crate) fn migrate_v1_to_v2(txn: &WriteTransaction) -> Result<(), CatalogError> {
    create_tables(txn)
}

/// Create the volume tables if missing.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), CatalogError> {
    txn.open_table(VOLUMES).ctx("creating the volume tables")?;
    txn.open_table(VOLUME_NAMES)
        .ctx("creating the volume tables")?;
    Ok(())
}

fn key(id: VolumeId) -> [u8; 16] {
    *id.0.as_bytes()
}

fn decode(k: [u8; 16], bytes: &[u8]) -> Result<VolumeRecord, CatalogError> {
    let rec: VolumeRecord = serde_json::from_slice(bytes).map_err(|e| CatalogError::Corrupt {
        what: format!(
            "volume row {} does not decode",
            VolumeId(uuid::Uuid::from_bytes(k))
        ),
        source: Some(e),
    })?;
    if *rec.id.0.as_bytes() != k {
        return Err(CatalogError::corrupt(format!(
            "volume row {} holds the id {}",
            uuid::Uuid::from_bytes(k),
            rec.id
        )));
    }
    Ok(rec)
}

fn encode(rec: &VolumeRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a VolumeRecord always serializes")
}

impl Catalog {
    /// Insert a new volume row; fails with `VolumeNameTaken` if the name is in use.
    pub fn insert_volume(&self, rec: &VolumeRecord) -> Result<(), CatalogError> {
        validate_volume_name(&rec.name).map_err(CatalogError::Invalid)?;
        let txn = self.db.begin_write().ctx("creating a volume")?;
        {
            let mut names = txn
                .open_table(VOLUME_NAMES)
                .ctx("opening the volume names")?;
            if names
                .get(rec.name.as_str())
                .ctx("reading the volume names")?
                .is_some()
            {
                return Err(CatalogError::VolumeNameTaken(rec.name.clone()));
            }
            names
                .insert(rec.name.as_str(), key(rec.id))
                .ctx("writing the volume names")?;
            let mut vols = txn.open_table(VOLUMES).ctx("opening the volumes")?;
            vols.insert(key(rec.id), encode(rec).as_slice())
                .ctx("writing a volume row")?;
        }
        txn.commit().ctx("creating a volume")?;
        Ok(())
    }

    /// A volume by name or id.
    pub fn get_volume(&self, name_or_id: &str) -> Result<VolumeRecord, CatalogError> {
        let txn = self.db.begin_read().ctx("starting a read transaction")?;
        let vols = txn.open_table(VOLUMES).ctx("opening the volumes")?;
        let id = match name_or_id.parse::<VolumeId>() {
            Ok(id) => id,
            Err(_) => {
                let names = txn
                    .open_table(VOLUME_NAMES)
                    .ctx("opening the volume names")?;
                let found = names
                    .get(name_or_id)
                    .ctx("reading the volume names")?
                    .map(|v| VolumeId(uuid::Uuid::from_bytes(v.value())));
                match found {
                    Some(id) => id,
                    None => return Err(CatalogError::VolumeNotFound(name_or_id.to_owned())),
                }
            }
        };
        let v = vols.get(key(id)).ctx("reading a volume row")?;
        match v {
            Some(v) => decode(key(id), v.value()),
            None => Err(CatalogError::VolumeNotFound(name_or_id.to_owned())),
        }
    }

    /// Every volume, sorted by name.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        let txn = self.db.begin_read().ctx("starting a read transaction")?;
        let vols = txn.open_table(VOLUMES).ctx("opening the volumes")?;
        let mut out = Vec::new();
        for item in vols.iter().ctx("listing volumes")? {
            let (k, v) = item.ctx("listing volumes")?;
            out.push(decode(k.value(), v.value())?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Volumes that still read from image `image` (not flattened), sorted by name.
    pub fn volumes_of_image(&self, image: ImageId) -> Result<Vec<VolumeRecord>, CatalogError> {
        let mut v = self.list_volumes()?;
        v.retain(|r| r.image_id == image && !r.flattened);
        Ok(v)
    }

    /// Change a volume row with `f` (its id and name must stay), bumping `updated_at`.
    pub fn update_volume(
        &self,
        id: VolumeId,
        f: impl FnOnce(&mut VolumeRecord),
    ) -> Result<VolumeRecord, CatalogError> {
        let txn = self.db.begin_write().ctx("updating a volume")?;
        let rec = {
            let mut vols = txn.open_table(VOLUMES).ctx("opening the volumes")?;
            let mut rec = match vols.get(key(id)).ctx("reading a volume row")? {
                Some(v) => decode(key(id), v.value())?,
                None => return Err(CatalogError::VolumeNotFound(id.to_string())),
            };
            let (old_id, old_name) = (rec.id, rec.name.clone());
            f(&mut rec);
            rec.id = old_id;
            rec.name = old_name;
            rec.updated_at = now_secs();
            vols.insert(key(id), encode(&rec).as_slice())
                .ctx("writing a volume row")?;
            rec
        };
        txn.commit().ctx("updating a volume")?;
        Ok(rec)
    }

    /// Remove a volume row and its name; returns the row.
    pub fn remove_volume(&self, id: VolumeId) -> Result<VolumeRecord, CatalogError> {
        let txn = self.db.begin_write().ctx("deleting a volume")?;
        let rec = {
            let mut vols = txn.open_table(VOLUMES).ctx("opening the volumes")?;
            let rec = match vols.remove(key(id)).ctx("removing a volume row")? {
                Some(v) => decode(key(id), v.value())?,
                None => return Err(CatalogError::VolumeNotFound(id.to_string())),
            };
            let mut names = txn
                .open_table(VOLUME_NAMES)
                .ctx("opening the volume names")?;
            names
                .remove(rec.name.as_str())
                .ctx("updating the volume names")?;
            rec
        };
        txn.commit().ctx("deleting a volume")?;
        Ok(rec)
    }
}

/// A new volume row (timestamps now).
pub fn new_volume_record(
    name: &str,
    image_id: ImageId,
    image_name: &str,
    size: u64,
    base_len: u64,
    origin: Option<String>,
) -> VolumeRecord {
    let now = now_secs();
    VolumeRecord {
        id: VolumeId::random(),
        name: name.to_string(),
        image_id,
        image_name: image_name.to_string(),
        size,
        base_len,
        flattened: false,
        origin,
        created_at: now,
        updated_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::super::schema::{Schema, META, SCHEMA_VERSION_KEY};
    use super::*;
    use crate::error::{Classify, ErrorKind};

    const V1: Schema = Schema {
        version: 1,
        migrations: &[],
    };

    fn rec(name: &str, image: ImageId) -> VolumeRecord {
        new_volume_record(name, image, "img", 1 << 20, 1 << 20, None)
    }

    #[test]
    fn version_1_catalog_is_migrated_and_gains_volume_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        drop(Catalog::open_with(&path, V1).unwrap());
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            assert!(txn.open_table(VOLUMES).is_err(), "a v1 file has no volumes");
        }

        let cat = Catalog::open(&path).unwrap();
        cat.insert_volume(&rec("vm1", ImageId::random())).unwrap();
        drop(cat);

        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let v = txn
            .open_table(META)
            .unwrap()
            .get(SCHEMA_VERSION_KEY)
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(v, 2);
    }

    #[test]
    fn volume_names_are_unique_and_found_by_name_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let img = ImageId::random();
        let r = rec("vm1", img);
        cat.insert_volume(&r).unwrap();

        let err = cat.insert_volume(&rec("vm1", img)).unwrap_err();

        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(cat.get_volume("vm1").unwrap(), r);
        assert_eq!(cat.get_volume(&r.id.to_string()).unwrap(), r);
        assert_eq!(
            cat.get_volume("nope").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn removed_volume_frees_its_name_and_stops_depending_on_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let img = ImageId::random();
        let a = rec("a", img);
        cat.insert_volume(&a).unwrap();
        cat.insert_volume(&rec("b", img)).unwrap();
        assert_eq!(cat.volumes_of_image(img).unwrap().len(), 2);

        cat.remove_volume(a.id).unwrap();
        cat.update_volume(cat.get_volume("b").unwrap().id, |r| r.flattened = true)
            .unwrap();

        assert!(cat.volumes_of_image(img).unwrap().is_empty());
        cat.insert_volume(&rec("a", img)).unwrap();
        assert_eq!(cat.list_volumes().unwrap().len(), 2);
    }

    #[test]
    fn volume_names_reject_separators() {
        assert!(validate_volume_name("vm-1.data_2").is_ok());
        for bad in ["", "a@b", "a/b", "-x", "a b", &"x".repeat(65)] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
