//! Images from volumes: `image create NAME --from-volume VOL[@SNAP]` turns a volume (or one
//! of its snapshots) into a new native image in the local store.
//!
//! The volume is read through its block device, chunk by chunk with the base image's chunk
//! size, by the same pipeline as a file import ([`import_device`]). Chunks the volume did
//! not change hash to the base image's chunks, which the store already holds, so only the
//! changed chunks are written: the new image shares the rest with its base.
//!
//! A snapshot is read through a temporary copy of its overlay blocks (in
//! `STATE/volumes/<random id>/`, removed afterwards; a crash leaves a directory no volume
//! row names, which the start-up sweep removes).
//!
//! Like an add, the new row is inserted `importing` first (reserving the name) and ends
//! committed or removed, with the chunks it wrote deleted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Daemon, DaemonError, LOCAL_STORE};
use crate::catalog::{validate_name, ImageAttributes, ImageRecord, VolumeId};
use crate::config::check_chunk_size;
use crate::device::BlockDevice;
use crate::image::{import_device, ImportOptions, Progress};
use crate::overlay::storage::DirStorage;
use crate::overlay::Overlay;
use crate::types::ImageId;
use crate::volume::VolumeDevice;

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
}

/// A temporary overlay holding a snapshot's copy; removed on drop.
struct TempOverlay {
    dir: PathBuf,
    overlay: Option<Arc<Overlay>>,
}

impl Drop for TempOverlay {
    fn drop(&mut self) {
        if let Some(ov) = self.overlay.take() {
            if let Ok(ov) = Arc::try_unwrap(ov) {
                let _ = ov.close();
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e,
                "cannot remove a snapshot's temporary copy; the next start-up will");
        }
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
    /// Make a new local image whose content is volume (or snapshot) `req.volume` now.
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

        // Resolve the device (and copy the snapshot) under the admin lock, so the volume
        // or snapshot cannot be deleted half-way through.
        let (device, temp): (Arc<dyn BlockDevice>, Option<TempOverlay>) = {
            let _admin = self.volumes.admin.lock().await;
            let dev = self.volume_device(&row).await?;
            match &snap {
                None => (dev, None),
                Some(snap) => {
                    let overlay = dev.overlay().clone();
                    if !overlay.list_snapshots().iter().any(|s| &s.name == snap) {
                        return Err(DaemonError::NotFound(format!(
                            "volume {:?} has no snapshot {snap:?} (see `imgcache volume snapshots {}`)",
                            row.name, row.name
                        )));
                    }
                    let dir = self.volumes.overlay_dir(VolumeId::random())?;
                    let mut temp = TempOverlay {
                        dir: dir.clone(),
                        overlay: None,
                    };
                    let s = snap.clone();
                    let copy = tokio::task::spawn_blocking(move || {
                        let storage = DirStorage::create_dir(&dir)?;
                        Ok::<_, std::io::Error>(overlay.clone_snapshot(&s, Arc::new(storage))?)
                    })
                    .await
                    .map_err(|e| DaemonError::Internal(format!("snapshot copy failed: {e}")))?
                    .map_err(|source| DaemonError::Io {
                        context: format!("cannot read snapshot {snap:?} of volume {:?}", row.name),
                        source,
                    })?;
                    let copy = Arc::new(copy);
                    temp.overlay = Some(copy.clone());
                    let d: Arc<dyn BlockDevice> =
                        Arc::new(VolumeDevice::new(copy, dev.base().clone()));
                    (d, Some(temp))
                }
            }
        };

        let id = ImageId::random();
        let attrs = merge_attributes(base.as_ref(), req.attributes.clone());
        let name = req.name.clone();
        self.catalog_call(move |c| c.insert_importing(id, &name, &attrs, LOCAL_STORE))
            .await?;
        self.imports.lock().insert(id, cancel.clone());

        let this = self.clone();
        let opts = ImportOptions {
            chunk_size,
            expected: None,
            progress: Some(progress),
            cancel,
        };
        let source = req.volume.clone();
        let task = tokio::spawn(async move {
            let result = async {
                let (imported, guard) = import_device(
                    this.store.clone(),
                    this.ledger.clone(),
                    this.is_referenced(),
                    id,
                    device,
                    format!("volume {source}"),
                    opts,
                )
                .await?;
                drop(temp);
                let image = this.commit_import(id, &imported, guard).await?;
                let stored = imported.chunks_total - imported.chunks_hole;
                Ok::<_, DaemonError>(ImageFromVolumeReport {
                    image,
                    source: source.clone(),
                    chunks_total: imported.chunks_total,
                    chunks_new: imported.chunks_new,
                    chunks_hole: imported.chunks_hole,
                    chunks_shared: stored.saturating_sub(imported.chunks_new),
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
}
