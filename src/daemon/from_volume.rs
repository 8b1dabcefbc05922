//! Images from volumes: `image create NAME --from-volume VOL[@SNAP] [--store STORE]` turns a
//! volume (or one of its snapshots) into a new native image.
//!
//! The volume is read through its block device, chunk by chunk with the base image's chunk
//! size, by the same pipeline as a file import ([`import_device`]). Chunks the volume did
//! not change hash to the base image's chunks, so the new image shares them with its base and
//! only the changed chunks are written.
//!
//! Where the image goes (`Daemon::target_of_image_from_volume`): `--store` when given (any
//! configured store that can be written: `local`, a `dir` or an `s3` store); otherwise the
//! base image's store when the base is a native image in a writable store, so a volume of an
//! image in S3 makes an image in S3 that shares the base's chunks there; otherwise `local`.
//! The base's chunks are not shared when the base is a raw object (`image add --url`: it has
//! no chunks) or lives in a read-only `http` store; the report's `note` says so.
//!
//! In a remote store, the base manifest's chunks are known to be there and are counted as
//! shared without a request; every other chunk is looked up with `head` and uploaded only if
//! missing; the manifest goes last. The row is committed like a registration (the catalog
//! counts references to local chunks only). A failed or interrupted creation removes its row
//! and its manifest, and leaves in the remote store the chunks it uploaded: they are
//! content-addressed, another daemon's image may already use them, and a later attempt finds
//! them with `head` and does not upload them again. A crash between the manifest upload and
//! the commit leaves the manifest too; start-up removes the row and deletes that manifest
//! (best effort, in the background).
//!
//! A snapshot is read in place through a [`SnapshotVolume`] (an
//! [`crate::overlay::SnapshotView`]): nothing is copied; the overlay's blocks are pinned
//! (none is freed or reused) until the image is made, while the volume goes on being written,
//! snapshotted, or has that snapshot deleted.
//!
//! Like an add, the new row is inserted `importing` first (reserving the name) and ends
//! committed or removed, with the chunks it wrote deleted (local store) or kept (remote).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Daemon, DaemonError, LOCAL_STORE};
use crate::catalog::{validate_name, FinishRegister, ImageAttributes, ImageRecord, ImageSource};
use crate::config::check_chunk_size;
use crate::device::BlockDevice;
use crate::image::{import_device, ChunkLedger, ImportOptions, Imported, IsReferenced, Progress};
use crate::overlay::volume::SnapshotVolume;
use crate::overlay::OverlayError;
use crate::store::Store;
use crate::types::{Digest, ImageId};

/// `POST /v1/images` with `volume`: make an image from a volume or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFromVolume {
    pub name: String,
    /// `VOLUME` or `VOLUME@SNAPSHOT` (name or id of the volume).
    pub volume: String,
    /// Bytes; the base image's chunk size when `None` (other sizes share no chunks).
    #[serde(default)]
    pub chunk_size: Option<u64>,
    /// Overrides of the attributes copied from the base image.
    #[serde(default)]
    pub attributes: ImageAttributes,
    /// The store to make the image in; when `None`, the base image's store if the image can
    /// share its chunks there, else `local`.
    #[serde(default)]
    pub store: Option<String>,
}

/// The result of an image made from a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFromVolumeReport {
    pub image: ImageRecord,
    /// `VOLUME` or `VOLUME@SNAPSHOT`, as read.
    pub source: String,
    pub chunks_total: u64,
    /// Chunks written to the store (changed by the volume, or not in the store before).
    pub chunks_new: u64,
    /// All-zero chunks (stored as holes).
    pub chunks_hole: u64,
    /// Non-hole chunks the store already held (shared with the base or other images).
    pub chunks_shared: u64,
    /// The store the image was made in (`local`, or a configured store).
    #[serde(default)]
    pub store: String,
    /// Why no chunks are shared with the base image, when that is so for a reason other
    /// than the content (a raw-object base, a read-only base store).
    #[serde(default)]
    pub note: Option<String>,
}

/// Where an image from a volume goes.
struct Target {
    name: String,
    store: Arc<dyn Store>,
    /// Chunks the target holds for sure: the base's, when the target is its remote store.
    known: Option<Arc<HashSet<Digest>>>,
    note: Option<String>,
}

impl Target {
    fn is_local(&self) -> bool {
        self.name == LOCAL_STORE
    }
}

/// Attributes of the base image as defaults, overridden by `o`'s set fields. Visibility
/// and protection are not inherited.
fn merge_attributes(base: Option<&ImageRecord>, o: ImageAttributes) -> ImageAttributes {
    let Some(b) = base else { return o };
    ImageAttributes {
        description: o.description.or_else(|| Some(b.description.clone())),
        image_type: o.image_type.or(Some(b.image_type)),
        disk_format: o.disk_format.or(Some(b.disk_format)),
        container_format: o.container_format.or(Some(b.container_format)),
        architecture: o.architecture.or_else(|| Some(b.architecture.clone())),
        os_type: o.os_type.or(Some(b.os_type)),
        firmware: o.firmware.or(Some(b.firmware)),
        virtio: o.virtio.or(Some(b.virtio)),
        min_disk: o.min_disk.or(Some(b.min_disk)),
        min_ram: o.min_ram.or(Some(b.min_ram)),
        visibility: o.visibility,
        protected: o.protected,
        tags: o.tags.or_else(|| Some(b.tags.clone())),
        properties: o.properties.or_else(|| Some(b.properties.clone())),
        version: o.version.or_else(|| Some(b.version.clone())),
        owner: o.owner.or_else(|| Some(b.owner.clone())),
    }
}

impl Daemon {
    /// The store an image made from a volume over `base` goes to (see the module docs).
    async fn target_of_image_from_volume(
        &self,
        requested: Option<&str>,
        base: Option<&ImageRecord>,
    ) -> Result<Target, DaemonError> {
        let writable = |name: &str| -> Result<Arc<dyn Store>, DaemonError> {
            let e = self.stores.get(name).ok_or_else(|| {
                DaemonError::NotFound(format!(
                    "no store named {name:?}: configure it as [stores.{name}] (see `imgcache store list`)"
                ))
            })?;
            if e.kind == "http" {
                return Err(DaemonError::InvalidInput(format!(
                    "store {name:?} is an http store, which is read-only: give a dir or s3 store, or local"
                )));
            }
            Ok(e.store.clone())
        };
        let raw_base = base.filter(|b| !b.source.is_native()).map(|b| {
            format!(
                "the base image {} is a raw object (image add --url): it has no chunks to share",
                b.name
            )
        });
        let (name, note) = match requested {
            Some(name) => (name.to_string(), raw_base),
            None => match base {
                Some(b) if b.source.is_native() && b.store != LOCAL_STORE => {
                    match self.stores.get(&b.store) {
                        Some(e) if e.kind != "http" => (b.store.clone(), None),
                        Some(_) => (
                            LOCAL_STORE.to_string(),
                            Some(format!(
                                "the base image's store {} is read-only (http), so the image is in the local store and shares no chunks with its base",
                                b.store
                            )),
                        ),
                        None => (
                            LOCAL_STORE.to_string(),
                            Some(format!(
                                "the base image's store {} is not configured, so the image is in the local store and shares no chunks with its base",
                                b.store
                            )),
                        ),
                    }
                }
                Some(b) if !b.source.is_native() => (
                    LOCAL_STORE.to_string(),
                    raw_base.map(|n| {
                        n + ", so the image is in the local store with every chunk its own"
                    }),
                ),
                _ => (LOCAL_STORE.to_string(), None),
            },
        };
        let store = writable(&name)?;
        let mut known = None;
        if let Some(b) = base {
            if name != LOCAL_STORE && b.store == name && b.source.is_native() {
                let open = self.images.lock().get(&b.id).cloned();
                let img = match open {
                    Some(img) => img,
                    None => self.open_remote(b).await?,
                };
                let digests: HashSet<Digest> =
                    img.manifest().distinct_digests().into_iter().collect();
                known = Some(Arc::new(digests));
            }
        }
        Ok(Target {
            name,
            store,
            known,
            note,
        })
    }

    /// Make a new image whose content is volume (or snapshot) `req.volume` now, in the store
    /// `target_of_image_from_volume` picks (see the module docs).
    /// Runs to completion (or cleanup) on its own task even if the future is dropped.
    pub async fn image_from_volume(
        self: &Arc<Self>,
        req: ImageFromVolume,
        progress: Progress,
        cancel: Arc<AtomicBool>,
    ) -> Result<ImageFromVolumeReport, DaemonError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        validate_name(&req.name).map_err(DaemonError::InvalidInput)?;
        let (vol, snap) = match req.volume.split_once('@') {
            Some((v, s)) => (v.to_string(), Some(s.to_string())),
            None => (req.volume.clone(), None),
        };
        if vol.is_empty() || snap.as_deref() == Some("") {
            return Err(DaemonError::InvalidInput(format!(
                "invalid volume {:?}: use VOLUME or VOLUME@SNAPSHOT",
                req.volume
            )));
        }
        let v = vol.clone();
        let row = self.catalog_call(move |c| c.get_volume(&v)).await?;
        let image_id = row.image_id.to_string();
        let base = self.catalog_call(move |c| c.get(&image_id)).await.ok();
        let chunk_size = match (req.chunk_size, &base) {
            (Some(n), _) => check_chunk_size(n).map_err(DaemonError::InvalidInput)?,
            (None, Some(b)) => {
                check_chunk_size(u64::from(b.chunk_size)).unwrap_or(self.default_chunk_size)
            }
            (None, None) => self.default_chunk_size,
        };

        let target = self
            .target_of_image_from_volume(req.store.as_deref(), base.as_ref())
            .await?;

        // Resolve the device under the admin lock, so the volume or snapshot cannot be
        // deleted meanwhile; afterwards a snapshot view pins what it reads.
        let device: Arc<dyn BlockDevice> = {
            let _admin = self.volumes.admin.lock().await;
            let dev = self.volume_device(&row).await?;
            match &snap {
                None => dev,
                Some(snap) => {
                    let view = dev.overlay().snapshot_view(snap).map_err(|e| match e {
                        OverlayError::SnapshotNotFound(_) => DaemonError::NotFound(format!(
                            "volume {:?} has no snapshot {snap:?} (see `imgcache volume snapshots {}`)",
                            row.name, row.name
                        )),
                        e => DaemonError::Io {
                            context: format!(
                                "cannot read snapshot {snap:?} of volume {:?}",
                                row.name
                            ),
                            source: e.into(),
                        },
                    })?;
                    Arc::new(SnapshotVolume::new(view, dev.base().clone()))
                }
            }
        };

        let id = ImageId::random();
        let attrs = merge_attributes(base.as_ref(), req.attributes.clone());
        let (name, store_name) = (req.name.clone(), target.name.clone());
        self.catalog_call(move |c| c.insert_importing(id, &name, &attrs, &store_name))
            .await?;
        self.imports.lock().insert(id, cancel.clone());

        let this = self.clone();
        let opts = ImportOptions {
            chunk_size,
            expected: None,
            progress: Some(progress),
            cancel,
            known_present: target.known.clone(),
        };
        // The local store's chunks are reference-counted by the catalog and may be deleted
        // when unused; a remote store's are never deleted by us (see the module docs).
        let (ledger, is_referenced): (Arc<ChunkLedger>, IsReferenced) = if target.is_local() {
            (self.ledger.clone(), self.is_referenced())
        } else {
            (Arc::new(ChunkLedger::new()), Arc::new(|_: &Digest| true))
        };
        let source = req.volume.clone();
        let task = tokio::spawn(async move {
            let result = async {
                let (imported, guard) = import_device(
                    target.store.clone(),
                    ledger,
                    is_referenced,
                    id,
                    device,
                    format!("volume {source}"),
                    opts,
                )
                .await?;
                let image = if target.is_local() {
                    this.commit_import(id, &imported, guard).await?
                } else {
                    drop(guard);
                    this.commit_remote(id, &target, &imported).await?
                };
                let stored = imported.chunks_total - imported.chunks_hole;
                Ok::<_, DaemonError>(ImageFromVolumeReport {
                    image,
                    source: source.clone(),
                    chunks_total: imported.chunks_total,
                    chunks_new: imported.chunks_new,
                    chunks_hole: imported.chunks_hole,
                    chunks_shared: stored.saturating_sub(imported.chunks_new),
                    store: target.name.clone(),
                    note: target.note.clone(),
                })
            }
            .await;
            this.imports.lock().remove(&id);
            if let Err(e) = &result {
                tracing::warn!(image = %req.name, volume = %source, error = %crate::error::chain(e),
                    "image from volume failed");
                if let Err(e) = this.catalog_call(move |c| c.remove_failed_import(id)).await {
                    tracing::error!(id = %id, error = %crate::error::chain(&e),
                        "cannot remove the row of a failed import; the next start-up will");
                }
            } else {
                tracing::info!(image = %req.name, volume = %source, "image created from volume");
            }
            result
        });
        task.await
            .map_err(|e| DaemonError::Internal(format!("image from volume task failed: {e}")))?
    }

    /// Commit an image made in a remote store: active, with its checksums, and no local
    /// chunk references. On failure its manifest is deleted (the chunks stay).
    async fn commit_remote(
        &self,
        id: ImageId,
        target: &Target,
        imported: &Imported,
    ) -> Result<ImageRecord, DaemonError> {
        let facts = FinishRegister {
            virtual_size: imported.virtual_size,
            stored_size: imported.stored_size,
            chunk_size: imported.chunk_size,
            md5: Some(imported.md5.clone()),
            sha256: Some(imported.sha256.clone()),
            manifest_key: imported.manifest_key.clone(),
            source: ImageSource::Native,
        };
        match self
            .catalog_call(move |c| c.finish_register(id, &facts))
            .await
        {
            Ok(row) => {
                tracing::info!(image = %row.name, id = %row.id, store = %row.store,
                    chunks_new = imported.chunks_new, "image made in a remote store");
                Ok(row)
            }
            Err(e) => {
                if let Err(e2) = target.store.delete(&imported.manifest_key).await {
                    tracing::warn!(store = %target.name, key = %imported.manifest_key,
                        error = %crate::error::chain(&e2),
                        "cannot delete the manifest of an uncommitted image; it stays in the store");
                }
                Err(e)
            }
        }
    }
}
