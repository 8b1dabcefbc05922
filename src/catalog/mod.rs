//! The embedded catalog (redb): image rows, the unique name index, and chunk references.
//!
//! [`Catalog`] is the one handle; it is `Send + Sync` and every method is a short, blocking
//! redb transaction (writers queue behind each other inside redb; readers never block).
//! Every method that changes more than one table does so in one write transaction, which
//! redb makes atomic and durable on commit: a crash leaves either all of it or none.
//!
//! Tables, encodings and the lifecycle diagram: `docs/catalog.md`. The table invariants are
//! listed in [`schema`] and checked by [`Catalog::verify`].
//!
//! Decisions callers rely on:
//! - names are unique across every status, `deleted` and `importing` included, so
//!   `recover` can never collide and a name is free again only after `expunge`;
//! - lifecycle actions whose target is already reached (`disable` on a disabled image,
//!   `enable` on an active one, `delete` on a deleted one) succeed without changing anything;
//!   `recover` of an image that is not in the recycle bin is a `Conflict`;
//! - a deleted image accepts only a new description;
//! - `chunk_refs` counts committed images (finished imports, any status after that,
//!   recycle bin included) until `expunge`.

use std::collections::HashSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    WriteTransaction,
};

use crate::types::{Digest, ImageId};

mod error;
pub mod model;
mod schema;
pub mod volumes;

pub use error::CatalogError;
pub use model::*;
pub use schema::SCHEMA_VERSION;
pub use volumes::{validate_volume_name, VolumeId, VolumeRecord};

use error::StorageContext;
use schema::{
    decode_bin, decode_digests, encode_bin, encode_digests, encode_record, id_from_key, id_key,
    read_all_rows, read_row, BinEntry, Schema, CHUNK_REFS, IMAGES, IMAGE_CHUNKS, IMAGE_NAMES,
    RECYCLE_BIN,
};

/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Longest version label and owner, in bytes.
pub const MAX_LABEL_LEN: usize = 255;
/// The owner of an image added without one.
pub const DEFAULT_OWNER: &str = "admin";

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

/// What registering an image that lives in another store sets on its row: its chunks are
/// not the local store's, so the catalog counts no references to them.
#[derive(Debug, Clone)]
pub struct FinishRegister {
    pub virtual_size: u64,
    /// Bytes of the image's distinct chunks when known (an image made into a remote store),
    /// else 0.
    pub stored_size: u64,
    pub chunk_size: u32,
    /// Lower-case hex, when the user gave one (unverified).
    pub md5: Option<String>,
    pub sha256: Option<String>,
    pub manifest_key: String,
    pub source: ImageSource,
}

/// The catalog database.
pub struct Catalog {
    db: Database,
}

impl Catalog {
    /// Open or create the catalog at `path`, migrating an older schema version.
    ///
    /// Fails with [`CatalogError::SchemaTooNew`] if a newer imgcache wrote the file, and with
    /// [`CatalogError::Open`] if another process holds it. Migrations run in one transaction.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        Catalog::open_with(path, schema::CURRENT)
    }

    fn open_with(path: &Path, schema: Schema) -> Result<Catalog, CatalogError> {
        let db = Database::create(path).map_err(|e| CatalogError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        schema::prepare(&db, schema)?;
        Ok(Catalog { db })
    }

    /// Build a new row with status `importing` from a name and attributes (validated; defaults
    /// filled in) and insert it. Fails if the name is taken.
    ///
    /// Defaults: type system, disk format raw, container bare, architecture x86_64, os linux,
    /// firmware bios, virtio on, visibility private, unprotected, owner [`DEFAULT_OWNER`],
    /// version "", sizes 0, no checksums, manifest key `manifests/<id>`.
    pub fn insert_importing(
        &self,
        id: ImageId,
        name: &str,
        attrs: &ImageAttributes,
        store: &str,
    ) -> Result<ImageRecord, CatalogError> {
        validate_name(name).map_err(CatalogError::Invalid)?;
        if store.is_empty() {
            return Err(CatalogError::Invalid(
                "the store name of an image cannot be empty".into(),
            ));
        }
        let now = now_secs();
        let mut rec = ImageRecord {
            id,
            name: name.to_owned(),
            description: String::new(),
            image_type: ImageType::System,
            disk_format: DiskFormat::Raw,
            container_format: ContainerFormat::Bare,
            virtual_size: 0,
            stored_size: 0,
            chunk_size: 0,
            architecture: "x86_64".into(),
            os_type: OsType::Linux,
            firmware: Firmware::Bios,
            virtio: true,
            min_disk: 0,
            min_ram: 0,
            visibility: Visibility::Private,
            protected: false,
            tags: Default::default(),
            properties: Default::default(),
            version: String::new(),
            owner: DEFAULT_OWNER.into(),
            status: ImageStatus::Importing,
            md5: None,
            sha256: None,
            created_at: now,
            updated_at: now,
            store: store.to_owned(),
            manifest_key: format!("manifests/{id}"),
            source: ImageSource::Native,
        };
        apply_attributes(&mut rec, attrs)?;
        self.write("adding an image", |t| {
            if t.images
                .get(id_key(id))
                .ctx("reading an image row")?
                .is_some()
            {
                return Err(CatalogError::Conflict(format!(
                    "an image with id {id} exists already"
                )));
            }
            t.claim_name(name, id)?;
            t.put(&rec)?;
            Ok(rec)
        })
    }

    /// Mark an importing row active with its content facts, and add one reference to each of
    /// `digests`, in one transaction.
    ///
    /// The row must be `importing` (else `Conflict`). Repeated digests count once.
    pub fn finish_import(
        &self,
        id: ImageId,
        facts: &FinishImport,
        digests: &[Digest],
    ) -> Result<ImageRecord, CatalogError> {
        let mut seen = HashSet::with_capacity(digests.len());
        let distinct: Vec<Digest> = digests
            .iter()
            .copied()
            .filter(|d| seen.insert(*d))
            .collect();
        self.write("finishing an import", |t| {
            let mut rec = t.get(id)?;
            if rec.status != ImageStatus::Importing {
                return Err(CatalogError::Conflict(format!(
                    "cannot finish the import of image {:?}: it is {}, not importing",
                    rec.name, rec.status
                )));
            }
            rec.virtual_size = facts.virtual_size;
            rec.stored_size = facts.stored_size;
            rec.chunk_size = facts.chunk_size;
            rec.md5 = Some(facts.md5.to_ascii_lowercase());
            rec.sha256 = Some(facts.sha256.to_ascii_lowercase());
            rec.manifest_key = facts.manifest_key.clone();
            rec.status = ImageStatus::Active;
            rec.updated_at = now_secs();
            t.put(&rec)?;
            let previous = t
                .chunks
                .insert(id_key(id), encode_digests(&distinct).as_slice())
                .ctx("writing an image's chunk list")?
                .is_some();
            if previous {
                return Err(CatalogError::corrupt(format!(
                    "importing image {id} already has a chunk list"
                )));
            }
            for d in &distinct {
                let count = t.ref_count(d)?;
                t.refs
                    .insert(d.0, count + 1)
                    .ctx("adding a chunk reference")?;
            }
            Ok(rec)
        })
    }

    /// Mark an importing row active as an image whose bytes are in a remote store or object
    /// (registered in place, or made there from a volume): the catalog references no local
    /// chunks for it (its chunk list is empty). The row must be `importing` (else `Conflict`).
    pub fn finish_register(
        &self,
        id: ImageId,
        facts: &FinishRegister,
    ) -> Result<ImageRecord, CatalogError> {
        self.write("finishing a registration", |t| {
            let mut rec = t.get(id)?;
            if rec.status != ImageStatus::Importing {
                return Err(CatalogError::Conflict(format!(
                    "cannot finish the registration of image {:?}: it is {}, not importing",
                    rec.name, rec.status
                )));
            }
            rec.virtual_size = facts.virtual_size;
            rec.stored_size = facts.stored_size;
            rec.chunk_size = facts.chunk_size;
            rec.md5 = facts.md5.as_ref().map(|s| s.to_ascii_lowercase());
            rec.sha256 = facts.sha256.as_ref().map(|s| s.to_ascii_lowercase());
            rec.manifest_key = facts.manifest_key.clone();
            rec.source = facts.source.clone();
            rec.status = ImageStatus::Active;
            rec.updated_at = now_secs();
            t.put(&rec)?;
            let previous = t
                .chunks
                .insert(id_key(id), encode_digests(&[]).as_slice())
                .ctx("writing an image's chunk list")?
                .is_some();
            if previous {
                return Err(CatalogError::corrupt(format!(
                    "registering image {id} already has a chunk list"
                )));
            }
            Ok(rec)
        })
    }

    /// Remove the row of a failed import (status importing). Missing row is not an error.
    ///
    /// A row in any other status is refused with `Conflict`: this never removes a committed
    /// image.
    pub fn remove_failed_import(&self, id: ImageId) -> Result<(), CatalogError> {
        self.write("removing a failed import", |t| {
            let Some(rec) = read_row(&t.images, id)? else {
                return Ok(());
            };
            if rec.status != ImageStatus::Importing {
                return Err(CatalogError::Conflict(format!(
                    "image {:?} is {}, not a failed import; it was not removed",
                    rec.name, rec.status
                )));
            }
            t.remove_row(&rec)?;
            Ok(())
        })
    }

    /// Look an image up by id (UUID text) or by name.
    ///
    /// Text that parses as a UUID is an id (names cannot look like one). `NotFound` carries
    /// the text looked up.
    pub fn get(&self, id_or_name: &str) -> Result<ImageRecord, CatalogError> {
        let txn = self.read()?;
        let images = txn.open_table(IMAGES).ctx("opening the images table")?;
        let id = match id_or_name.parse::<ImageId>() {
            Ok(id) => id,
            Err(_) => {
                let names = txn.open_table(IMAGE_NAMES).ctx("opening the name index")?;
                let found = names
                    .get(id_or_name)
                    .ctx("reading the name index")?
                    .map(|v| id_from_key(v.value()));
                match found {
                    Some(id) => {
                        return read_row(&images, id)?.ok_or_else(|| {
                            CatalogError::corrupt(format!(
                                "the name {id_or_name:?} points to the missing image {id}"
                            ))
                        })
                    }
                    None => return Err(CatalogError::NotFound(id_or_name.to_owned())),
                }
            }
        };
        read_row(&images, id)?.ok_or_else(|| CatalogError::NotFound(id_or_name.to_owned()))
    }

    /// All images sorted by name; rows with status `deleted` only if `include_deleted`.
    pub fn list(&self, include_deleted: bool) -> Result<Vec<ImageRecord>, CatalogError> {
        let mut rows = self.all_rows()?;
        rows.retain(|r| include_deleted || r.status != ImageStatus::Deleted);
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    /// Apply `patch` (validated; rename keeps names unique), bumping `updated_at`.
    ///
    /// Order: rename; attributes (`tags` replaces the whole set, `properties` sets the given
    /// keys); `remove_tags`, `add_tags`; `remove_properties` (applied before the sets, so a key
    /// both removed and set ends up set). A deleted image accepts only `description`.
    pub fn update(&self, id: ImageId, patch: &ImagePatch) -> Result<ImageRecord, CatalogError> {
        self.write("updating an image", |t| {
            let mut rec = t.get(id)?;
            if rec.status == ImageStatus::Deleted && !only_description(patch) {
                return Err(CatalogError::Conflict(format!(
                    "image {:?} is in the recycle bin: only its description can be changed; \
                     recover it first",
                    rec.name
                )));
            }
            if let Some(new_name) = &patch.name {
                validate_name(new_name).map_err(CatalogError::Invalid)?;
                if *new_name != rec.name {
                    t.claim_name(new_name, id)?;
                    t.names
                        .remove(rec.name.as_str())
                        .ctx("updating the name index")?;
                    rec.name = new_name.clone();
                }
            }
            for key in &patch.remove_properties {
                rec.properties.remove(key);
            }
            apply_attributes(&mut rec, &patch.attributes)?;
            for tag in &patch.remove_tags {
                rec.tags.remove(tag);
            }
            for tag in &patch.add_tags {
                validate_tag(tag).map_err(CatalogError::Invalid)?;
                rec.tags.insert(tag.clone());
            }
            rec.updated_at = now_secs();
            t.put(&rec)?;
            Ok(rec)
        })
    }

    /// Apply a lifecycle action; refuses invalid transitions (deleting a protected image,
    /// enabling a deleted one, ...) with a `Conflict` saying why.
    ///
    /// `disable`: active → disabled. `enable`: disabled → active. `delete`: active, disabled
    /// or error → deleted (the prior status is kept in the recycle bin). `recover`: deleted →
    /// the prior status. An action whose target is already the status is a no-op.
    pub fn transition(&self, id: ImageId, action: Lifecycle) -> Result<ImageRecord, CatalogError> {
        self.write("changing an image's status", |t| {
            let mut rec = t.get(id)?;
            let key = id_key(id);
            let prior = match t.bin.get(key).ctx("reading the recycle bin")? {
                Some(v) => Some(decode_bin(id, v.value())?.prior_status),
                None => None,
            };
            let next = match plan_transition(&rec, action, prior)? {
                Plan::NoOp => return Ok(rec),
                Plan::To(next) => next,
            };
            let now = now_secs();
            if next == ImageStatus::Deleted {
                let entry = BinEntry {
                    prior_status: rec.status,
                    deleted_at: now,
                };
                t.bin
                    .insert(key, encode_bin(&entry).as_slice())
                    .ctx("writing the recycle bin")?;
            } else if rec.status == ImageStatus::Deleted {
                t.bin.remove(key).ctx("writing the recycle bin")?;
            }
            rec.status = next;
            rec.updated_at = now;
            t.put(&rec)?;
            Ok(rec)
        })
    }

    /// Remove the row of an image in the recycle bin (status deleted) for good, dropping one
    /// reference from each of its chunks; returns the row and the digests now unreferenced.
    ///
    /// The name becomes free. The returned digests have no count row any more; deleting
    /// their chunks from the store is the caller's job (after checking in-flight imports).
    pub fn expunge(&self, id: ImageId) -> Result<(ImageRecord, Vec<Digest>), CatalogError> {
        self.write("expunging an image", |t| {
            let rec = t.get(id)?;
            if rec.status != ImageStatus::Deleted {
                return Err(CatalogError::Conflict(format!(
                    "image {:?} is not in the recycle bin (status {}); delete it first",
                    rec.name, rec.status
                )));
            }
            t.remove_row(&rec)?;
            t.bin.remove(id_key(id)).ctx("writing the recycle bin")?;
            let digests = match t
                .chunks
                .remove(id_key(id))
                .ctx("removing an image's chunk list")?
            {
                Some(v) => decode_digests(id, v.value())?,
                None => Vec::new(),
            };
            let mut freed = Vec::new();
            for d in digests {
                match t.ref_count(&d)? {
                    0 => {
                        tracing::warn!(image = %id, chunk = %d, "expunged image's chunk had no reference count");
                        freed.push(d);
                    }
                    1 => {
                        t.refs.remove(d.0).ctx("dropping a chunk reference")?;
                        freed.push(d);
                    }
                    n => {
                        t.refs.insert(d.0, n - 1).ctx("dropping a chunk reference")?;
                    }
                }
            }
            Ok((rec, freed))
        })
    }

    /// Whether any committed image references chunk `digest`.
    ///
    /// On a storage error this logs it and answers `true`: a caller deciding whether to delete
    /// a chunk must keep it when the catalog cannot tell.
    pub fn is_referenced(&self, digest: &Digest) -> bool {
        match self.chunk_ref_count(digest) {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::error!(chunk = %digest, error = &e as &dyn std::error::Error, "cannot read a chunk reference count; treating the chunk as referenced");
                true
            }
        }
    }

    /// How many committed images reference chunk `digest` (0: none).
    pub fn chunk_ref_count(&self, digest: &Digest) -> Result<u64, CatalogError> {
        let txn = self.read()?;
        let refs = txn
            .open_table(CHUNK_REFS)
            .ctx("opening the chunk references")?;
        let count = refs
            .get(digest.0)
            .ctx("reading a chunk reference")?
            .map(|v| v.value());
        Ok(count.unwrap_or(0))
    }

    /// Every chunk digest referenced by a committed image.
    pub fn referenced_chunks(&self) -> Result<HashSet<Digest>, CatalogError> {
        let txn = self.read()?;
        let refs = txn
            .open_table(CHUNK_REFS)
            .ctx("opening the chunk references")?;
        let mut out = HashSet::new();
        for item in refs.iter().ctx("listing chunk references")? {
            let (k, _) = item.ctx("listing chunk references")?;
            out.insert(Digest(k.value()));
        }
        Ok(out)
    }

    /// Every manifest key referenced by a row (any status).
    pub fn referenced_manifests(&self) -> Result<HashSet<String>, CatalogError> {
        Ok(self
            .all_rows()?
            .into_iter()
            .map(|r| r.manifest_key)
            .collect())
    }

    /// Rows still in status `importing`: after a crash, imports that never finished. The
    /// daemon removes them at start-up (with [`Catalog::remove_failed_import`]) or resumes them.
    pub fn importing_rows(&self) -> Result<Vec<ImageRecord>, CatalogError> {
        let mut rows = self.all_rows()?;
        rows.retain(|r| r.status == ImageStatus::Importing);
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    /// The distinct chunk digests of a finished import (empty for an image still importing).
    pub fn chunks_of(&self, id: ImageId) -> Result<Vec<Digest>, CatalogError> {
        let txn = self.read()?;
        let chunks = txn
            .open_table(IMAGE_CHUNKS)
            .ctx("opening the chunk lists")?;
        let bytes = chunks
            .get(id_key(id))
            .ctx("reading an image's chunk list")?;
        match bytes {
            Some(v) => decode_digests(id, v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// Check the invariants between the tables (see [`schema`]); `Corrupt` names the first
    /// broken one. Reads everything: for start-up checks and tests, not for hot paths.
    pub fn verify(&self) -> Result<(), CatalogError> {
        let txn = self.read()?;
        let images = txn.open_table(IMAGES).ctx("opening the images table")?;
        let names = txn.open_table(IMAGE_NAMES).ctx("opening the name index")?;
        let chunks = txn
            .open_table(IMAGE_CHUNKS)
            .ctx("opening the chunk lists")?;
        let refs = txn
            .open_table(CHUNK_REFS)
            .ctx("opening the chunk references")?;
        let bin = txn.open_table(RECYCLE_BIN).ctx("opening the recycle bin")?;
        let rows = read_all_rows(&images)?;
        let bad = |what: String| Err(CatalogError::corrupt(what));
        let mut expected_refs = std::collections::HashMap::<Digest, u64>::new();
        for rec in &rows {
            let key = id_key(rec.id);
            let indexed = names
                .get(rec.name.as_str())
                .ctx("reading the name index")?
                .map(|v| id_from_key(v.value()));
            if indexed != Some(rec.id) {
                return bad(format!("the name of image {} is not indexed to it", rec.id));
            }
            let list = chunks.get(key).ctx("reading a chunk list")?;
            match (&list, rec.status) {
                (Some(_), ImageStatus::Importing | ImageStatus::Queued) => {
                    return bad(format!("unfinished image {} has a chunk list", rec.id))
                }
                (None, s) if !matches!(s, ImageStatus::Importing | ImageStatus::Queued) => {
                    return bad(format!("image {} ({s}) has no chunk list", rec.id))
                }
                _ => {}
            }
            if let Some(v) = list {
                for d in decode_digests(rec.id, v.value())? {
                    *expected_refs.entry(d).or_default() += 1;
                }
            }
            let in_bin = bin.get(key).ctx("reading the recycle bin")?.is_some();
            if in_bin != (rec.status == ImageStatus::Deleted) {
                return bad(format!(
                    "image {} ({}) is {}in the recycle bin",
                    rec.id,
                    rec.status,
                    if in_bin { "" } else { "not " }
                ));
            }
        }
        if names.len().ctx("counting names")? != rows.len() as u64 {
            return bad("the name index has entries without an image".into());
        }
        if chunks.len().ctx("counting chunk lists")? > rows.len() as u64
            || bin.len().ctx("counting the recycle bin")? > rows.len() as u64
        {
            return bad("chunk lists or recycle bin entries without an image".into());
        }
        let mut stored = 0u64;
        for item in refs.iter().ctx("listing chunk references")? {
            let (k, v) = item.ctx("listing chunk references")?;
            let d = Digest(k.value());
            stored += 1;
            if expected_refs.get(&d).copied() != Some(v.value()) {
                return bad(format!(
                    "chunk {d} has {} references, its images say {}",
                    v.value(),
                    expected_refs.get(&d).copied().unwrap_or(0)
                ));
            }
        }
        if stored != expected_refs.len() as u64 {
            return bad("referenced chunks are missing a reference count".into());
        }
        Ok(())
    }

    fn all_rows(&self) -> Result<Vec<ImageRecord>, CatalogError> {
        let txn = self.read()?;
        let images = txn.open_table(IMAGES).ctx("opening the images table")?;
        read_all_rows(&images)
    }

    fn read(&self) -> Result<ReadTransaction, CatalogError> {
        self.db.begin_read().ctx("starting a read transaction")
    }

    /// Run `f` on the tables inside one write transaction; commit if it returns `Ok`, abort
    /// (by dropping the transaction) otherwise.
    fn write<T>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let txn = self.db.begin_write().ctx(context)?;
        let out = {
            let mut tables = Tables::open(&txn)?;
            f(&mut tables)?
        };
        txn.commit().ctx(context)?;
        Ok(out)
    }
}

/// The tables opened for writing in one transaction.
struct Tables<'t> {
    images: Table<'t, [u8; 16], &'static [u8]>,
    names: Table<'t, &'static str, [u8; 16]>,
    refs: Table<'t, [u8; 32], u64>,
    chunks: Table<'t, [u8; 16], &'static [u8]>,
    bin: Table<'t, [u8; 16], &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, CatalogError> {
        Ok(Tables {
            images: txn.open_table(IMAGES).ctx("opening the images table")?,
            names: txn.open_table(IMAGE_NAMES).ctx("opening the name index")?,
            refs: txn
                .open_table(CHUNK_REFS)
                .ctx("opening the chunk references")?,
            chunks: txn
                .open_table(IMAGE_CHUNKS)
                .ctx("opening the chunk lists")?,
            bin: txn.open_table(RECYCLE_BIN).ctx("opening the recycle bin")?,
        })
    }

    fn get(&self, id: ImageId) -> Result<ImageRecord, CatalogError> {
        read_row(&self.images, id)?.ok_or_else(|| CatalogError::NotFound(id.to_string()))
    }

    fn put(&mut self, rec: &ImageRecord) -> Result<(), CatalogError> {
        self.images
            .insert(id_key(rec.id), encode_record(rec).as_slice())
            .ctx("writing an image row")?;
        Ok(())
    }

    /// Index `name` to `id`, or fail with `NameTaken` if another image holds it.
    fn claim_name(&mut self, name: &str, id: ImageId) -> Result<(), CatalogError> {
        let holder = self
            .names
            .get(name)
            .ctx("reading the name index")?
            .map(|v| id_from_key(v.value()));
        match holder {
            Some(other) if other != id => Err(CatalogError::NameTaken(name.to_owned())),
            _ => {
                self.names
                    .insert(name, id_key(id))
                    .ctx("writing the name index")?;
                Ok(())
            }
        }
    }

    /// Remove a row and its name (not its chunk list or recycle bin entry).
    fn remove_row(&mut self, rec: &ImageRecord) -> Result<(), CatalogError> {
        self.images
            .remove(id_key(rec.id))
            .ctx("removing an image row")?;
        let holder = self
            .names
            .get(rec.name.as_str())
            .ctx("reading the name index")?
            .map(|v| id_from_key(v.value()));
        if holder == Some(rec.id) {
            self.names
                .remove(rec.name.as_str())
                .ctx("updating the name index")?;
        }
        Ok(())
    }

    fn ref_count(&self, d: &Digest) -> Result<u64, CatalogError> {
        Ok(self
            .refs
            .get(d.0)
            .ctx("reading a chunk reference")?
            .map(|v| v.value())
            .unwrap_or(0))
    }
}

/// What a lifecycle action does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The target status is already reached.
    NoOp,
    To(ImageStatus),
}

/// Decide a lifecycle action from the row alone (`prior`: the recycle bin's saved status).
fn plan_transition(
    rec: &ImageRecord,
    action: Lifecycle,
    prior: Option<ImageStatus>,
) -> Result<Plan, CatalogError> {
    use ImageStatus as S;
    let name = &rec.name;
    let status = rec.status;
    let refuse = |why: String| Err(CatalogError::Conflict(why));
    let in_bin_hint = if status == S::Deleted {
        "; it is in the recycle bin, recover it first"
    } else {
        ""
    };
    match action {
        Lifecycle::Disable => match status {
            S::Active => Ok(Plan::To(S::Disabled)),
            S::Disabled => Ok(Plan::NoOp),
            _ => refuse(format!(
                "cannot disable image {name:?}: it is {status}, and only an active image can be \
                 disabled{in_bin_hint}"
            )),
        },
        Lifecycle::Enable => match status {
            S::Disabled => Ok(Plan::To(S::Active)),
            S::Active => Ok(Plan::NoOp),
            _ => refuse(format!(
                "cannot enable image {name:?}: it is {status}, and only a disabled image can be \
                 enabled{in_bin_hint}"
            )),
        },
        Lifecycle::Delete => match status {
            S::Deleted => Ok(Plan::NoOp),
            S::Active | S::Disabled | S::Error if rec.protected => refuse(format!(
                "image {name} is protected; unprotect it first with `imgcache image set {} \
                 --unprotected`",
                shell_quote(name)
            )),
            S::Active | S::Disabled | S::Error => Ok(Plan::To(S::Deleted)),
            S::Importing | S::Queued => refuse(format!(
                "cannot delete image {name:?}: it is {status}; wait for the import to finish or \
                 fail"
            )),
        },
        Lifecycle::Recover => match status {
            S::Deleted => {
                let to = match prior {
                    Some(p @ (S::Active | S::Disabled | S::Error)) => p,
                    other => {
                        tracing::warn!(image = %rec.id, prior = ?other, "deleted image has no usable prior status; recovering it as active");
                        S::Active
                    }
                };
                Ok(Plan::To(to))
            }
            _ => refuse(format!(
                "cannot recover image {name:?}: it is {status}, not in the recycle bin"
            )),
        },
    }
}

/// Validate every attribute present in `a` and apply it to `rec`.
fn apply_attributes(rec: &mut ImageRecord, a: &ImageAttributes) -> Result<(), CatalogError> {
    let invalid = CatalogError::Invalid;
    if let Some(v) = &a.description {
        validate_text("description", v, MAX_DESCRIPTION_LEN).map_err(invalid)?;
        rec.description = v.clone();
    }
    if let Some(v) = a.image_type {
        rec.image_type = v;
    }
    if let Some(v) = a.disk_format {
        rec.disk_format = v;
    }
    if let Some(v) = a.container_format {
        rec.container_format = v;
    }
    if let Some(v) = &a.architecture {
        validate_architecture(v).map_err(invalid)?;
        rec.architecture = v.clone();
    }
    if let Some(v) = a.os_type {
        rec.os_type = v;
    }
    if let Some(v) = a.firmware {
        rec.firmware = v;
    }
    if let Some(v) = a.virtio {
        rec.virtio = v;
    }
    if let Some(v) = a.min_disk {
        rec.min_disk = v;
    }
    if let Some(v) = a.min_ram {
        rec.min_ram = v;
    }
    if let Some(v) = a.visibility {
        rec.visibility = v;
    }
    if let Some(v) = a.protected {
        rec.protected = v;
    }
    if let Some(tags) = &a.tags {
        for t in tags {
            validate_tag(t).map_err(invalid)?;
        }
        rec.tags = tags.clone();
    }
    if let Some(props) = &a.properties {
        for (k, v) in props {
            validate_property(k, v).map_err(invalid)?;
        }
        rec.properties
            .extend(props.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(v) = &a.version {
        validate_text("version", v, MAX_LABEL_LEN).map_err(invalid)?;
        rec.version = v.clone();
    }
    if let Some(v) = &a.owner {
        validate_text("owner", v, MAX_LABEL_LEN).map_err(invalid)?;
        rec.owner = v.clone();
    }
    Ok(())
}

/// Whether `patch` changes nothing but the description (all a deleted image accepts).
fn only_description(patch: &ImagePatch) -> bool {
    let others = ImageAttributes {
        description: None,
        ..patch.attributes.clone()
    };
    patch.name.is_none()
        && others == ImageAttributes::default()
        && patch.add_tags.is_empty()
        && patch.remove_tags.is_empty()
        && patch.remove_properties.is_empty()
}

/// `name` as one shell word, for commands quoted in error messages.
fn shell_quote(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c))
    {
        name.to_owned()
    } else {
        format!("'{name}'")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
