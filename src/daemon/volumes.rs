//! Volumes in the daemon: catalog rows become open [`VolumeDevice`]s (one per volume, shared
//! by every connection), exported read-write as `volumes/NAME`.
//!
//! Layout: `STATE/volumes/<id>/` holds a volume's overlay (`docs/overlay-format.md`).
//! Order of creation: overlay directory first, then the catalog row; of deletion: row
//! first, then the directory. A crash in between leaves a directory without a row, which
//! [`VolumeSet::sweep_orphans`] removes at start-up.
//!
//! Operations that change what a connection sees (revert, delete) are refused while the
//! volume is exported; resize applies to connections opened afterwards.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Daemon, DaemonError};
use crate::catalog::volumes::{new_volume_record, validate_snapshot_name};
use crate::catalog::{validate_volume_name, ImageStatus, VolumeId, VolumeRecord};
use crate::device::BlockDevice;
use crate::error::chain as error_chain;
use crate::export::{Export, ExportListing};
use crate::overlay::storage::DirStorage;
use crate::overlay::{Overlay, SnapshotInfo};
use crate::types::format_size;
use crate::volume::{flatten, FlattenOptions, FlattenProgress, NoBase, VolumeDevice};

/// The prefix of volume export names: `volumes/NAME`.
pub const VOLUME_EXPORT_PREFIX: &str = "volumes/";

/// One open volume.
struct OpenVolume {
    id: VolumeId,
    /// The device new connections get (replaced on resize and at the end of a flatten; old
    /// connections keep theirs, which shares the same overlay).
    device: Mutex<Arc<VolumeDevice>>,
    flatten: Mutex<Option<FlattenState>>,
}

struct FlattenState {
    progress: Arc<FlattenProgress>,
    running: bool,
    error: Option<String>,
}

/// The daemon's open volumes and where their overlays live.
#[derive(Default)]
pub struct VolumeSet {
    dir: OnceLock<PathBuf>,
    open: Mutex<HashMap<VolumeId, Arc<OpenVolume>>>,
    /// Serialises management operations (create, delete, resize, snapshot, revert).
    pub(super) admin: tokio::sync::Mutex<()>,
}

/// How a volume is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Base image (name or id); exactly one of `image` and `snapshot`.
    #[serde(default)]
    pub image: Option<String>,
    /// `VOL@SNAP`: a copy of that snapshot.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Bytes; the image's virtual size (or the snapshot's size) when `None`.
    #[serde(default)]
    pub size: Option<u64>,
}

/// A flatten in progress or finished, as `volume show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenInfo {
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub error: Option<String>,
}

/// A volume row plus live facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    #[serde(flatten)]
    pub record: VolumeRecord,
    /// Bytes the overlay holds (the volume's own data and its snapshots').
    pub allocated_bytes: u64,
    pub snapshots: Vec<String>,
    /// Status of the base image now (`deleted` when force-deleted; `expunged` when gone).
    pub image_status: String,
    /// Open NBD connections (exports) of the volume.
    pub connections: u64,
    pub flatten: Option<FlattenInfo>,
    /// The store the volume's unwritten blocks are read from (its image's: `local`, or a
    /// remote store read through the cache); `None` once flattened, when the volume and its
    /// snapshots need neither the image nor any store.
    #[serde(default)]
    pub base_store: Option<String>,
}

fn invalid(msg: impl Into<String>) -> DaemonError {
    DaemonError::InvalidInput(msg.into())
}

fn conflict(msg: String) -> DaemonError {
    DaemonError::Catalog(crate::catalog::CatalogError::Conflict(msg))
}

fn overlay_err(context: String) -> impl FnOnce(crate::overlay::OverlayError) -> DaemonError {
    move |e| DaemonError::Io {
        context,
        source: e.into(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DaemonError::Internal(format!("volume task failed: {e}")))?
}

impl VolumeSet {
    /// Set where overlays live (`STATE/volumes`). Once, at start-up.
    pub fn set_dir(&self, dir: PathBuf) {
        let _ = self.dir.set(dir);
    }

    fn dir(&self) -> Result<&PathBuf, DaemonError> {
        self.dir
            .get()
            .ok_or_else(|| DaemonError::Internal("the daemon has no volume directory".into()))
    }

    pub(super) fn overlay_dir(&self, id: VolumeId) -> Result<PathBuf, DaemonError> {
        Ok(self.dir()?.join(id.to_string()))
    }

    /// Remove overlay directories no volume row names (a crash between the two steps of a
    /// create or delete). Returns how many.
    pub fn sweep_orphans(&self, rows: &[VolumeRecord]) -> u64 {
        let Ok(dir) = self.dir() else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let known = name
                .parse::<VolumeId>()
                .is_ok_and(|id| rows.iter().any(|r| r.id == id));
            if !known && e.path().is_dir() {
                tracing::warn!(dir = %e.path().display(), "removing the overlay of a volume that was never committed");
                if std::fs::remove_dir_all(e.path()).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }
}

impl Daemon {
    /// Open (or find open) the volume of `row`: its overlay over the shared image handle.
    fn volume_handle(&self, row: &VolumeRecord) -> Result<Arc<OpenVolume>, DaemonError> {
        if let Some(v) = self.volumes.open.lock().get(&row.id) {
            return Ok(v.clone());
        }
        let dir = self.volumes.overlay_dir(row.id)?;
        let overlay = Arc::new(Overlay::open_dir(&dir).map_err(overlay_err(format!(
            "cannot open the overlay of volume {:?}",
            row.name
        )))?);
        let base = self.volume_base(row)?;
        let v = Arc::new(OpenVolume {
            id: row.id,
            device: Mutex::new(Arc::new(VolumeDevice::new(overlay, base))),
            flatten: Mutex::new(None),
        });
        Ok(self.volumes.open.lock().entry(row.id).or_insert(v).clone())
    }

    /// The base device of a volume: the image's shared handle, or nothing once flattened.
    fn volume_base(&self, row: &VolumeRecord) -> Result<Arc<dyn BlockDevice>, DaemonError> {
        if row.flattened {
            return Ok(Arc::new(NoBase { len: row.base_len }));
        }
        let image =
            self.catalog
                .get(&row.image_id.to_string())
                .map_err(|e| DaemonError::Startup {
                    context: format!(
                        "volume {:?} cannot find its image {} ({})",
                        row.name, row.image_name, row.image_id
                    ),
                    source: Box::new(e.into()),
                })?;
        let img = self.image_handle(&image)?;
        Ok(img)
    }

    /// The volume's open device, opening it from a blocking context if needed.
    async fn open_volume(&self, row: &VolumeRecord) -> Result<Arc<OpenVolume>, DaemonError> {
        if let Some(v) = self.volumes.open.lock().get(&row.id) {
            return Ok(v.clone());
        }
        // Opening replays the journal and writes a checkpoint: blocking work.
        block_on_blocking(|| self.volume_handle(row))
    }

    /// Create a volume: from an image in O(1) (an empty overlay), or as a copy of a snapshot.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeInfo, DaemonError> {
        validate_volume_name(&req.name).map_err(DaemonError::InvalidInput)?;
        let _admin = self.volumes.admin.lock().await;
        let id = VolumeId::random();
        let dir = self.volumes.overlay_dir(id)?;
        let record = match (&req.image, &req.snapshot) {
            (Some(image), None) => {
                let image = image.clone();
                let img = self.catalog_call(move |c| c.get(&image)).await?;
                if img.status != ImageStatus::Active {
                    return Err(conflict(format!(
                        "image {:?} is {}; volumes can only be made from active images",
                        img.name, img.status
                    )));
                }
                let base_len = img.virtual_size;
                let size = req.size.unwrap_or(base_len);
                if size < base_len {
                    return Err(invalid(format!(
                        "size {} is smaller than image {:?} ({}); give at least {base_len} bytes",
                        format_size(size),
                        img.name,
                        format_size(base_len)
                    )));
                }
                if size < img.min_disk {
                    return Err(invalid(format!(
                        "size {} is below the minimum disk size of image {:?} ({}); give at least {} bytes",
                        format_size(size),
                        img.name,
                        format_size(img.min_disk),
                        img.min_disk
                    )));
                }
                let d = dir.clone();
                blocking(move || {
                    Overlay::create_dir(&d, size, base_len)
                        .map(drop)
                        .map_err(overlay_err("cannot create the volume's overlay".into()))
                })
                .await?;
                new_volume_record(&req.name, img.id, &img.name, size, base_len, None)
            }
            (None, Some(spec)) => {
                let (vol, snap) = spec.split_once('@').ok_or_else(|| {
                    invalid(format!("invalid snapshot {spec:?}: use VOLUME@SNAPSHOT"))
                })?;
                let vol_s = vol.to_string();
                let src = self.catalog_call(move |c| c.get_volume(&vol_s)).await?;
                let open = self.open_volume(&src).await?;
                let overlay = open.device.lock().overlay().clone();
                let (snap_s, d) = (snap.to_string(), dir.clone());
                let size = blocking(move || {
                    let storage = DirStorage::create_dir(&d).map_err(|source| DaemonError::Io {
                        context: "cannot create the volume's overlay directory".into(),
                        source,
                    })?;
                    let ov = overlay
                        .clone_snapshot(&snap_s, Arc::new(storage))
                        .map_err(overlay_err(format!("cannot copy snapshot {snap_s:?}")))?;
                    let size = ov.size();
                    ov.close()
                        .map_err(overlay_err("cannot close the new overlay".into()))?;
                    Ok(size)
                })
                .await
                .inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(&dir);
                })?;
                if let Some(want) = req.size {
                    if want != size {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(invalid(
                            "--size cannot be combined with --snapshot; resize the new volume afterwards",
                        ));
                    }
                }
                let mut rec = new_volume_record(
                    &req.name,
                    src.image_id,
                    &src.image_name,
                    size,
                    src.base_len,
                    Some(spec.clone()),
                );
                rec.flattened = src.flattened;
                rec
            }
            _ => return Err(invalid("give exactly one of --image and --snapshot")),
        };
        let mut record = record;
        record.id = id;
        let rec = record.clone();
        if let Err(e) = self.catalog_call(move |c| c.insert_volume(&rec)).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(volume = %record.name, id = %record.id, image = %record.image_name, size = record.size, "volume created");
        self.volume_info(record).await
    }

    /// The device new connections of volume `row` get (opening the volume if needed).
    pub(super) async fn volume_device(
        &self,
        row: &VolumeRecord,
    ) -> Result<Arc<VolumeDevice>, DaemonError> {
        let open = self.open_volume(row).await?;
        let dev = open.device.lock().clone();
        Ok(dev)
    }

    /// Every volume, sorted by name.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, DaemonError> {
        let rows = self.catalog_call(|c| c.list_volumes()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.volume_info(r).await?);
        }
        Ok(out)
    }

    /// One volume by name or id.
    pub async fn get_volume(&self, name: &str) -> Result<VolumeInfo, DaemonError> {
        let row = self.volume_row(name).await?;
        self.volume_info(row).await
    }

    async fn volume_row(&self, name: &str) -> Result<VolumeRecord, DaemonError> {
        let key = name.to_string();
        self.catalog_call(move |c| c.get_volume(&key)).await
    }

    async fn volume_info(&self, record: VolumeRecord) -> Result<VolumeInfo, DaemonError> {
        let image_id = record.image_id.to_string();
        let (image_status, image_store) = match self.catalog_call(move |c| c.get(&image_id)).await {
            Ok(r) => (r.status.to_string(), Some(r.store)),
            Err(_) => ("expunged".to_string(), None),
        };
        let base_store = if record.flattened { None } else { image_store };
        let open = self.volumes.open.lock().get(&record.id).cloned();
        let (allocated_bytes, snapshots, connections, flatten) = match &open {
            Some(v) => {
                let dev = v.device.lock().clone();
                let ov = dev.overlay();
                let snaps = ov.list_snapshots().into_iter().map(|s| s.name).collect();
                // One reference is ours, one the set's; the rest are connections (old
                // devices kept by connections after a resize are not counted).
                let conns = Arc::strong_count(&dev).saturating_sub(2) as u64;
                let fl = v.flatten.lock().as_ref().map(|f| FlattenInfo {
                    running: f.running,
                    done_bytes: f.progress.done.load(Ordering::Relaxed),
                    total_bytes: f.progress.total.load(Ordering::Relaxed),
                    error: f.error.clone(),
                });
                (ov.allocated_bytes(), snaps, conns, fl)
            }
            None => {
                // Not open: read the overlay's metadata without keeping it open.
                let dir = self.volumes.overlay_dir(record.id)?;
                let r = blocking(move || {
                    let ov = Overlay::open_dir(&dir)
                        .map_err(overlay_err("cannot open the volume's overlay".into()))?;
                    let out = (
                        ov.allocated_bytes(),
                        ov.list_snapshots().into_iter().map(|s| s.name).collect(),
                    );
                    ov.close()
                        .map_err(overlay_err("cannot close the volume's overlay".into()))?;
                    Ok(out)
                })
                .await;
                match r {
                    Ok((a, s)) => (a, s, 0, None),
                    Err(e) => {
                        tracing::warn!(volume = %record.name, error = %error_chain(&e), "cannot read the overlay");
                        (0, Vec::new(), 0, None)
                    }
                }
            }
        };
        Ok(VolumeInfo {
            record,
            allocated_bytes,
            snapshots,
            image_status,
            connections,
            flatten,
            base_store,
        })
    }

    /// Delete a volume and its overlay (and snapshots). Refused while it is exported.
    pub async fn delete_volume(&self, name: &str) -> Result<VolumeRecord, DaemonError> {
        let _admin = self.volumes.admin.lock().await;
        let row = self.volume_row(name).await?;
        let already = self.volumes.open.lock().get(&row.id).cloned();
        if let Some(v) = already {
            let conns = Arc::strong_count(&v.device.lock().clone()).saturating_sub(2);
            if conns > 0 {
                return Err(conflict(format!(
                    "volume {:?} is in use by {conns} NBD connection(s); disconnect them first",
                    row.name
                )));
            }
            if let Some(f) = v.flatten.lock().as_ref() {
                f.progress.cancel.store(true, Ordering::Relaxed);
            }
        }
        let id = row.id;
        let removed = self.catalog_call(move |c| c.remove_volume(id)).await?;
        self.volumes.open.lock().remove(&id);
        let dir = self.volumes.overlay_dir(id)?;
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a deleted volume's overlay; the next start-up will");
        }
        tracing::info!(volume = %removed.name, "volume deleted");
        Ok(removed)
    }

    /// Grow a volume; the new tail reads zeros. New connections see the new size.
    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, DaemonError> {
        let _admin = self.volumes.admin.lock().await;
        let row = self.volume_row(name).await?;
        if size < row.size {
            return Err(invalid(format!(
                "cannot shrink volume {:?} from {} to {}: volumes only grow",
                row.name,
                format_size(row.size),
                format_size(size)
            )));
        }
        let v = self.open_volume(&row).await?;
        let dev = v.device.lock().clone();
        let ov = dev.overlay().clone();
        blocking(move || {
            ov.resize(size)
                .map_err(overlay_err("cannot resize the overlay".into()))
        })
        .await?;
        *v.device.lock() = Arc::new(VolumeDevice::new(dev.overlay().clone(), dev.base().clone()));
        let id = row.id;
        let rec = self
            .catalog_call(move |c| c.update_volume(id, |r| r.size = size))
            .await?;
        self.volume_info(rec).await
    }

    /// Take snapshot `snap` of a volume (metadata only; durable when it returns).
    pub async fn snapshot_volume(&self, name: &str, snap: &str) -> Result<VolumeInfo, DaemonError> {
        validate_snapshot_name(snap).map_err(DaemonError::InvalidInput)?;
        let _admin = self.volumes.admin.lock().await;
        let row = self.volume_row(name).await?;
        let v = self.open_volume(&row).await?;
        let ov = v.device.lock().overlay().clone();
        let s = snap.to_string();
        blocking(move || {
            ov.snapshot(&s)
                .map_err(overlay_err(format!("cannot take snapshot {s:?}")))
        })
        .await?;
        self.volume_info(row).await
    }

    /// The snapshots of a volume.
    pub async fn volume_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, DaemonError> {
        let row = self.volume_row(name).await?;
        let v = self.open_volume(&row).await?;
        let ov = v.device.lock().overlay().clone();
        Ok(ov.list_snapshots())
    }

    /// Delete snapshot `snap` of a volume.
    pub async fn delete_volume_snapshot(
        &self,
        name: &str,
        snap: &str,
    ) -> Result<VolumeInfo, DaemonError> {
        let _admin = self.volumes.admin.lock().await;
        let row = self.volume_row(name).await?;
        let v = self.open_volume(&row).await?;
        let ov = v.device.lock().overlay().clone();
        let s = snap.to_string();
        blocking(move || {
            ov.delete_snapshot(&s)
                .map_err(overlay_err(format!("cannot delete snapshot {s:?}")))
        })
        .await?;
        self.volume_info(row).await
    }

    /// Make the volume's content that of snapshot `snap` again. Refused while exported.
    pub async fn revert_volume(&self, name: &str, snap: &str) -> Result<VolumeInfo, DaemonError> {
        let _admin = self.volumes.admin.lock().await;
        let row = self.volume_row(name).await?;
        let v = self.open_volume(&row).await?;
        let dev = v.device.lock().clone();
        let conns = Arc::strong_count(&dev).saturating_sub(2);
        if conns > 0 {
            return Err(conflict(format!(
                "volume {:?} is in use by {conns} NBD connection(s); disconnect them before reverting",
                row.name
            )));
        }
        let ov = dev.overlay().clone();
        let s = snap.to_string();
        let size = blocking(move || {
            ov.revert(&s)
                .map_err(overlay_err(format!("cannot revert to snapshot {s:?}")))?;
            Ok(ov.size())
        })
        .await?;
        *v.device.lock() = Arc::new(VolumeDevice::new(dev.overlay().clone(), dev.base().clone()));
        let id = row.id;
        let rec = self
            .catalog_call(move |c| c.update_volume(id, |r| r.size = size))
            .await?;
        self.volume_info(rec).await
    }

    /// Start flattening a volume in the background (`rate`: bytes/s, 0 unlimited).
    pub async fn flatten_volume(
        self: &Arc<Self>,
        name: &str,
        rate: u64,
    ) -> Result<VolumeInfo, DaemonError> {
        let row = self.volume_row(name).await?;
        if row.flattened {
            return self.volume_info(row).await;
        }
        let v = self.open_volume(&row).await?;
        let progress = Arc::new(FlattenProgress::default());
        {
            let mut fl = v.flatten.lock();
            if fl.as_ref().is_some_and(|f| f.running) {
                return Err(conflict(format!(
                    "volume {:?} is being flattened already",
                    row.name
                )));
            }
            *fl = Some(FlattenState {
                progress: progress.clone(),
                running: true,
                error: None,
            });
        }
        let this = self.clone();
        let (vol, name) = (v.clone(), row.name.clone());
        tokio::spawn(async move {
            let dev = vol.device.lock().clone();
            let opts = FlattenOptions {
                rate,
                ..FlattenOptions::default()
            };
            let result = flatten(dev.clone(), opts, progress).await;
            let error = match result {
                Ok(true) => {
                    let id = vol.id;
                    match this
                        .catalog_call(move |c| c.update_volume(id, |r| r.flattened = true))
                        .await
                    {
                        Ok(rec) => {
                            // New connections no longer touch the image.
                            *vol.device.lock() = Arc::new(VolumeDevice::new(
                                dev.overlay().clone(),
                                Arc::new(NoBase { len: rec.base_len }),
                            ));
                            tracing::info!(volume = %name, "volume flattened");
                            None
                        }
                        Err(e) => Some(error_chain(&e)),
                    }
                }
                Ok(false) => Some("cancelled".to_string()),
                Err(e) => Some(error_chain(&e)),
            };
            if let Some(e) = &error {
                tracing::warn!(volume = %name, error = %e, "flatten stopped");
            }
            if let Some(f) = vol.flatten.lock().as_mut() {
                f.running = false;
                f.error = error;
            }
        });
        self.volume_info(row).await
    }

    /// Volumes that read from image `image_id` (not flattened).
    pub async fn volumes_of_image(
        &self,
        image_id: crate::types::ImageId,
    ) -> Result<Vec<VolumeRecord>, DaemonError> {
        self.catalog_call(move |c| c.volumes_of_image(image_id))
            .await
    }

    /// Refuse to delete (without `force`) or expunge an image volumes still read from.
    pub(crate) async fn check_image_unused(
        &self,
        image_id: crate::types::ImageId,
        image_name: &str,
        what: &str,
    ) -> Result<(), DaemonError> {
        let deps = self.volumes_of_image(image_id).await?;
        if deps.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = deps.iter().map(|r| r.name.as_str()).collect();
        Err(conflict(format!(
            "image {image_name:?} is used by volume(s) {}; {what}",
            names.join(", ")
        )))
    }

    /// Flush and close every open volume (at shutdown, after connections closed).
    pub fn close_volumes(&self) {
        let open: Vec<Arc<OpenVolume>> = self.volumes.open.lock().drain().map(|(_, v)| v).collect();
        for v in open {
            if let Some(f) = v.flatten.lock().as_ref() {
                f.progress.cancel.store(true, Ordering::Relaxed);
            }
            let dev = v.device.lock().clone();
            if let Err(e) = dev.overlay().flush() {
                tracing::warn!(volume = %v.id, error = %error_chain(&e), "cannot flush a volume at shutdown");
            }
        }
    }

    /// Export listings of every volume.
    pub(crate) fn volume_listings(&self) -> Vec<ExportListing> {
        match self.catalog.list_volumes() {
            Ok(rows) => rows
                .iter()
                .map(|r| ExportListing {
                    name: format!("{VOLUME_EXPORT_PREFIX}{}", r.name),
                    description: volume_description(r),
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot list volumes");
                Vec::new()
            }
        }
    }

    /// Open export `volumes/NAME`.
    pub(crate) fn open_volume_export(&self, name: &str) -> Option<Export> {
        let vol = name.strip_prefix(VOLUME_EXPORT_PREFIX)?;
        validate_volume_name(vol).ok()?;
        let row = match self.catalog.get_volume(vol) {
            Ok(r) if r.name == vol => r,
            Ok(_) => return None,
            Err(e) => {
                if crate::error::Classify::kind(&e) != crate::error::ErrorKind::NotFound {
                    tracing::warn!(export = name, error = %error_chain(&e), "catalog lookup failed");
                }
                return None;
            }
        };
        let already = self.volumes.open.lock().get(&row.id).cloned();
        let open = if let Some(v) = already {
            Ok(v)
        } else {
            block_on_blocking(|| self.volume_handle(&row))
        };
        match open {
            Ok(v) => {
                let device: Arc<dyn BlockDevice> = v.device.lock().clone();
                Some(Export {
                    name: name.to_string(),
                    description: volume_description(&row),
                    device,
                })
            }
            Err(e) => {
                tracing::error!(export = name, error = %error_chain(&e), "cannot open volume");
                None
            }
        }
    }
}

/// "NAME (SIZE volume of IMAGE)".
fn volume_description(r: &VolumeRecord) -> String {
    format!(
        "{} ({} volume of {})",
        r.name,
        format_size(r.size),
        r.image_name
    )
}

/// Run blocking `f` from synchronous code that may be on a tokio worker.
fn block_on_blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| s.spawn(f).join())
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(_) => f(),
    }
}
