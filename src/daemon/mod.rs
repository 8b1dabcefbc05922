//! The daemon: owns the catalog, the local store, the chunk ledger and the open images, and
//! serves them to the NBD front end (as an [`ExportRegistry`]) and to the control API.
//!
//! - [`Daemon`]: the core. Catalog rows become `Arc<Image>` handles only in
//!   [`ExportRegistry::open`]; the data path never looks at the catalog. An image handle is
//!   cached in `images` from its first export open until the image is disabled, deleted or
//!   expunged (connections already open keep their own `Arc`).
//! - [`lock::StateLock`]: one daemon per state directory.
//! - [`serve`](mod@serve): listeners, signals, start-up and shutdown of `imgcache serve`.
//!
//! Invariants: an add inserts an `importing` row first (reserving the name) and always ends
//! with either `finish_import` or `remove_failed_import`; rows left `importing` by a crash and
//! chunks no row references are removed at start-up by [`Daemon::recover`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::ChunkCache;
use crate::catalog::{
    validate_name, Catalog, CatalogError, FinishImport, ImageAttributes, ImagePatch, ImageRecord,
    ImageStatus, Lifecycle,
};
use crate::config::{check_chunk_size, Config};
use crate::error::{Classify, ErrorKind};
use crate::export::{Export, ExportListing, ExportRegistry, ExportTimes};
use crate::image::{
    delete_unreferenced, import_file, sweep_orphans, Checksum, ChunkLedger, Image, ImageError,
    ImportOptions, IsReferenced, Progress,
};
use crate::store::dir::DirStore;
use crate::store::spec::open_store;
use crate::store::Store;
use crate::types::{format_size, ImageId};

pub mod from_volume;
pub mod lazy;
pub mod lock;
pub mod serve;
pub mod volumes;

pub use crate::config::LOCAL_STORE;
use lazy::{is_local, RegisterFrom, StoreEntry};

/// The prefix of image export names: `images/NAME`.
pub const IMAGE_EXPORT_PREFIX: &str = "images/";

/// Errors of daemon operations.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("chunk cache error")]
    Cache(#[source] Box<crate::cache::CacheError>),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another imgcache daemon{} is using {}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), state_dir.display())]
    AlreadyRunning {
        pid: Option<u32>,
        state_dir: PathBuf,
    },
    /// A start-up step failed.
    #[error("{context}")]
    Startup {
        context: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for DaemonError {
    fn kind(&self) -> ErrorKind {
        match self {
            DaemonError::Catalog(e) => e.kind(),
            DaemonError::Image(e) => e.kind(),
            DaemonError::Config(e) => e.kind(),
            DaemonError::InvalidInput(_) => ErrorKind::InvalidInput,
            DaemonError::NotFound(_) => ErrorKind::NotFound,
            DaemonError::Conflict(_) => ErrorKind::Conflict,
            DaemonError::Cache(e) => e.kind(),
            DaemonError::Io { source, .. } => ErrorKind::of_io(source),
            DaemonError::AlreadyRunning { .. } => ErrorKind::Conflict,
            DaemonError::Startup { source, .. } => source.kind(),
            DaemonError::ShuttingDown => ErrorKind::Unavailable,
            DaemonError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// What to import (`POST /v1/images`, already parsed).
#[derive(Debug, Clone)]
pub struct AddImage {
    pub name: String,
    /// Absolute path on this host (an import), or `None` with `from` set (a registration).
    pub file: Option<PathBuf>,
    /// Register an image that stays in a store or at a URL.
    pub from: Option<RegisterFrom>,
    /// Bytes; the configured default when `None`.
    pub chunk_size: Option<u64>,
    /// `md5:HEX` or `sha256:HEX`.
    pub checksum: Option<String>,
    pub attributes: ImageAttributes,
}

/// What [`Daemon::recover`] cleaned up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    pub interrupted_imports: u64,
    pub orphan_chunks: u64,
    pub orphan_manifests: u64,
}

/// The daemon core.
pub struct Daemon {
    catalog: Arc<Catalog>,
    /// The local store (`local`).
    store: Arc<dyn Store>,
    /// Every store by name, `local` included.
    stores: std::collections::BTreeMap<String, StoreEntry>,
    /// Stores opened for `--url` objects no configured store covers, by URL directory.
    url_stores: Mutex<HashMap<String, Arc<dyn Store>>>,
    /// The chunk cache of every image not in the local store.
    cache: ChunkCache,
    ledger: Arc<ChunkLedger>,
    /// Open image handles, by id.
    images: Mutex<HashMap<ImageId, Arc<Image>>>,
    /// Cancel flags of running imports, so shutdown can stop them.
    imports: Mutex<HashMap<ImageId, Arc<AtomicBool>>>,
    /// Set at shutdown: no new imports.
    closing: AtomicBool,
    default_chunk_size: u32,
    /// Open volumes and where their overlays live.
    volumes: volumes::VolumeSet,
}

impl Daemon {
    /// A daemon over an open catalog, local store, other stores and cache. Does no I/O.
    pub fn new(
        catalog: Catalog,
        store: Arc<dyn Store>,
        mut stores: std::collections::BTreeMap<String, StoreEntry>,
        cache: ChunkCache,
        default_chunk_size: u32,
    ) -> Daemon {
        stores.insert(
            LOCAL_STORE.to_string(),
            StoreEntry::new(None, store.clone(), &store.describe()),
        );
        Daemon {
            catalog: Arc::new(catalog),
            store,
            stores,
            url_stores: Mutex::new(HashMap::new()),
            cache,
            ledger: Arc::new(ChunkLedger::default()),
            images: Mutex::new(HashMap::new()),
            imports: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            default_chunk_size,
            volumes: volumes::VolumeSet::default(),
        }
    }

    /// Open the catalog and the local store of `config`'s state directory and run start-up
    /// recovery. The caller holds the state lock.
    pub async fn open(config: &Config) -> Result<Arc<Daemon>, DaemonError> {
        let catalog_path = config.catalog_path();
        let context = format!("cannot open the catalog {}", catalog_path.display());
        let catalog = tokio::task::spawn_blocking(move || Catalog::open(&catalog_path))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .map_err(|e| DaemonError::Startup {
                context,
                source: Box::new(e.into()),
            })?;
        let store_dir = config.store_dir();
        let store = DirStore::open(store_dir.clone()).map_err(|source| DaemonError::Io {
            context: format!("cannot open the local store at {}", store_dir.display()),
            source,
        })?;
        let store: Arc<dyn Store> = Arc::new(store);
        let mut stores = std::collections::BTreeMap::new();
        for (name, spec) in &config.stores {
            let s = open_store(name, spec).map_err(|e| DaemonError::Startup {
                context: format!("cannot open store {name:?}"),
                source: Box::new(DaemonError::Image(ImageError::Store(e))),
            })?;
            stores.insert(name.clone(), StoreEntry::new(Some(spec.clone()), s, ""));
        }
        let cache_cfg = config.cache.clone();
        let cache_dir = cache_cfg.dir.clone();
        let cache = tokio::task::spawn_blocking(move || ChunkCache::open(cache_cfg))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .map_err(|e| DaemonError::Startup {
                context: format!("cannot open the chunk cache in {}", cache_dir.display()),
                source: Box::new(DaemonError::Cache(Box::new(e))),
            })?;
        tracing::info!(dir = %cache_dir.display(), max = %format_size(config.cache.max_bytes),
            used = %format_size(cache.used_bytes()), stores = config.stores.len(), "chunk cache open");
        let daemon = Arc::new(Daemon::new(
            catalog,
            store,
            stores,
            cache,
            config.default_chunk_size,
        ));
        daemon.volumes.set_dir(config.state_dir.join("volumes"));
        let r = daemon.recover().await.map_err(|e| DaemonError::Startup {
            context: "start-up recovery failed".into(),
            source: Box::new(e),
        })?;
        if r != Recovery::default() {
            tracing::info!(
                interrupted_imports = r.interrupted_imports,
                orphan_chunks = r.orphan_chunks,
                orphan_manifests = r.orphan_manifests,
                "start-up recovery cleaned up after an earlier crash"
            );
        }
        Ok(daemon)
    }

    /// Remove rows a crash left `importing`, then delete chunks and manifests no row references.
    pub async fn recover(&self) -> Result<Recovery, DaemonError> {
        let mut report = Recovery::default();
        for row in self.catalog_call(|c| c.list(true)).await? {
            if row.status == ImageStatus::Importing {
                tracing::warn!(image = %row.name, id = %row.id, "removing import interrupted by a crash");
                let id = row.id;
                self.catalog_call(move |c| c.remove_failed_import(id))
                    .await?;
                report.interrupted_imports += 1;
                self.forget_remote_manifest(&row);
            }
        }
        let (chunks, manifests) = self
            .catalog_call(|c| Ok((c.referenced_chunks()?, c.referenced_manifests()?)))
            .await?;
        let (orphan_chunks, orphan_manifests) =
            sweep_orphans(self.store.clone(), &chunks, &manifests).await?;
        report.orphan_chunks = orphan_chunks;
        report.orphan_manifests = orphan_manifests;
        let volumes = self.catalog_call(|c| c.list_volumes()).await?;
        self.volumes.sweep_orphans(&volumes);
        Ok(report)
    }

    /// After an image made in a remote store was interrupted by a crash: delete the
    /// manifest it may have uploaded (`manifests/<its id>`, a key no one else uses), in the
    /// background and best effort, so an unreachable store does not hold up start-up. Its
    /// chunks stay (see `from_volume`).
    fn forget_remote_manifest(&self, row: &ImageRecord) {
        if row.store == LOCAL_STORE || !row.source.is_native() {
            return;
        }
        let key = crate::image::manifest_key(row.id);
        if row.manifest_key != key {
            return;
        }
        let Some(entry) = self.stores.get(&row.store).filter(|e| e.kind != "http") else {
            return;
        };
        let (store, name) = (entry.store.clone(), row.store.clone());
        tokio::spawn(async move {
            match store.delete(&key).await {
                Ok(()) => tracing::info!(store = %name, key = %key,
                    "deleted the manifest of an interrupted image creation"),
                Err(e) => {
                    tracing::warn!(store = %name, key = %key, error = %crate::error::chain(&e),
                    "cannot delete the manifest of an interrupted image creation; it stays in the store")
                }
            }
        });
    }

    /// Images sorted by name; deleted ones (the recycle bin) only with `all`.
    pub async fn list_images(&self, all: bool) -> Result<Vec<ImageRecord>, DaemonError> {
        self.catalog_call(move |c| c.list(all)).await
    }

    /// One image by id or name.
    pub async fn get_image(&self, id_or_name: &str) -> Result<ImageRecord, DaemonError> {
        let key = id_or_name.to_string();
        self.catalog_call(move |c| c.get(&key)).await
    }

    /// Apply `patch` to an image.
    pub async fn update_image(
        &self,
        id_or_name: &str,
        patch: ImagePatch,
    ) -> Result<ImageRecord, DaemonError> {
        let id = self.get_image(id_or_name).await?.id;
        self.catalog_call(move |c| c.update(id, &patch)).await
    }

    /// Disable, enable, delete or recover an image.
    pub async fn lifecycle(
        &self,
        id_or_name: &str,
        action: Lifecycle,
    ) -> Result<ImageRecord, DaemonError> {
        self.lifecycle_with(id_or_name, action, false).await
    }

    /// Like [`Daemon::lifecycle`]; `force` lets `delete` move an image that volumes still
    /// read from to the recycle bin (hidden for new volumes, still serving existing ones).
    pub async fn lifecycle_with(
        &self,
        id_or_name: &str,
        action: Lifecycle,
        force: bool,
    ) -> Result<ImageRecord, DaemonError> {
        let image = self.get_image(id_or_name).await?;
        let id = image.id;
        if action == Lifecycle::Delete && !force && image.status != ImageStatus::Deleted {
            self.check_image_unused(
                id,
                &image.name,
                "delete them first, or use --force to hide the image while they keep using it",
            )
            .await?;
        }
        let row = self.catalog_call(move |c| c.transition(id, action)).await?;
        if row.status != ImageStatus::Active {
            self.images.lock().remove(&id);
        }
        Ok(row)
    }

    /// Remove a deleted image for good and delete its chunks no other image uses.
    pub async fn expunge(&self, id_or_name: &str) -> Result<ImageRecord, DaemonError> {
        let image = self.get_image(id_or_name).await?;
        let id = image.id;
        self.check_image_unused(id, &image.name, "delete or flatten them first")
            .await?;
        let (row, digests) = self.catalog_call(move |c| c.expunge(id)).await?;
        self.images.lock().remove(&id);
        if let Err(e) = self.cache.remove_image(&id.to_string()) {
            tracing::warn!(image = %row.name, error = %crate::error::chain(&e),
                "cannot drop the image's cached chunks; eviction will");
        }
        if !is_local(&row) {
            // Its bytes live in another store, which this daemon does not own.
            tracing::info!(image = %row.name, "expunged image");
            return Ok(row);
        }
        // The row is gone: a failure here leaves orphans, which the next start-up sweeps.
        match delete_unreferenced(
            self.store.clone(),
            self.ledger.clone(),
            self.is_referenced(),
            &row.manifest_key,
            &digests,
        )
        .await
        {
            Ok(n) => tracing::info!(image = %row.name, chunks_deleted = n, "expunged image"),
            Err(e) => tracing::warn!(image = %row.name, error = %crate::error::chain(&e),
                "expunged image; its chunks stay until the next start-up sweep"),
        }
        Ok(row)
    }

    /// Import `req.file` as a new image. Runs to completion (or cleanup) on its own task
    /// even if the returned future is dropped; set `cancel` to stop it. `progress` is called
    /// with (bytes done, bytes total).
    pub async fn add_image(
        self: &Arc<Self>,
        req: AddImage,
        progress: Progress,
        cancel: Arc<AtomicBool>,
    ) -> Result<ImageRecord, DaemonError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        validate_name(&req.name).map_err(DaemonError::InvalidInput)?;
        let file = match (&req.file, &req.from) {
            (Some(file), None) => file.clone(),
            (None, Some(from)) => {
                return self
                    .register_image(
                        req.name.clone(),
                        from.clone(),
                        req.checksum.clone(),
                        req.attributes.clone(),
                    )
                    .await;
            }
            _ => {
                return Err(DaemonError::InvalidInput(
                    "give exactly one of a file, a store and manifest, or a URL".into(),
                ))
            }
        };
        if !file.is_absolute() {
            return Err(DaemonError::InvalidInput(format!(
                "file path {} is not absolute",
                file.display()
            )));
        }
        let chunk_size = match req.chunk_size {
            None => self.default_chunk_size,
            Some(n) => check_chunk_size(n).map_err(DaemonError::InvalidInput)?,
        };
        let expected = match &req.checksum {
            None => None,
            Some(text) => Some(
                text.parse::<Checksum>()
                    .map_err(DaemonError::InvalidInput)?,
            ),
        };
        let meta = tokio::fs::metadata(&file)
            .await
            .map_err(|source| DaemonError::Io {
                context: format!("cannot open {}", file.display()),
                source,
            })?;
        if !meta.is_file() {
            return Err(DaemonError::InvalidInput(format!(
                "{} is not a regular file",
                file.display()
            )));
        }

        let id = ImageId::random();
        let (name, attrs) = (req.name.clone(), req.attributes.clone());
        self.catalog_call(move |c| c.insert_importing(id, &name, &attrs, LOCAL_STORE))
            .await?;
        self.imports.lock().insert(id, cancel.clone());

        let this = self.clone();
        let opts = ImportOptions {
            chunk_size,
            expected,
            progress: Some(progress),
            cancel,
            known_present: None,
        };
        let task = tokio::spawn(async move {
            let result = this.run_import(id, &file, opts).await;
            this.imports.lock().remove(&id);
            if let Err(e) = &result {
                tracing::warn!(image = %req.name, error = %crate::error::chain(e), "import failed");
                if let Err(e) = this.catalog_call(move |c| c.remove_failed_import(id)).await {
                    tracing::error!(id = %id, error = %crate::error::chain(&e),
                        "cannot remove the row of a failed import; the next start-up will");
                }
            }
            result
        });
        task.await
            .map_err(|e| DaemonError::Internal(format!("import task failed: {e}")))?
    }

    async fn run_import(
        &self,
        id: ImageId,
        file: &std::path::Path,
        opts: ImportOptions,
    ) -> Result<ImageRecord, DaemonError> {
        let (imported, guard) = import_file(
            self.store.clone(),
            self.ledger.clone(),
            self.is_referenced(),
            id,
            file,
            opts,
        )
        .await?;
        self.commit_import(id, &imported, guard).await
    }

    /// Commit a finished import to its `importing` row; on failure delete what it wrote.
    async fn commit_import(
        &self,
        id: ImageId,
        imported: &crate::image::Imported,
        guard: crate::image::LedgerGuard,
    ) -> Result<ImageRecord, DaemonError> {
        let facts = FinishImport {
            virtual_size: imported.virtual_size,
            stored_size: imported.stored_size,
            chunk_size: imported.chunk_size,
            md5: imported.md5.clone(),
            sha256: imported.sha256.clone(),
            manifest_key: imported.manifest_key.clone(),
        };
        let digests = imported.digests.clone();
        let committed = {
            // Released at the end of this block: the catalog references the chunks now (or
            // never will), so the ledger may let go.
            let _guard = guard;
            self.catalog_call(move |c| c.finish_import(id, &facts, &digests))
                .await
        };
        match committed {
            Ok(row) => {
                tracing::info!(image = %row.name, id = %row.id, size = row.virtual_size,
                    chunks_new = imported.chunks_new, "image added");
                Ok(row)
            }
            Err(e) => {
                if let Err(e2) = delete_unreferenced(
                    self.store.clone(),
                    self.ledger.clone(),
                    self.is_referenced(),
                    &imported.manifest_key,
                    &imported.digests,
                )
                .await
                {
                    tracing::warn!(error = %crate::error::chain(&e2),
                        "cannot delete the chunks of an uncommitted import; the next start-up will");
                }
                Err(e)
            }
        }
    }

    /// Stop accepting imports and cancel the running ones.
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for cancel in self.imports.lock().values() {
            cancel.store(true, Ordering::SeqCst);
        }
    }

    /// How many imports are running.
    pub fn imports_running(&self) -> usize {
        self.imports.lock().len()
    }

    fn is_referenced(&self) -> IsReferenced {
        let catalog = self.catalog.clone();
        Arc::new(move |d| catalog.is_referenced(d))
    }

    /// Run a catalog operation off the async runtime (redb commits fsync).
    async fn catalog_call<T, F>(&self, f: F) -> Result<T, DaemonError>
    where
        T: Send + 'static,
        F: FnOnce(&Catalog) -> Result<T, CatalogError> + Send + 'static,
    {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || f(&catalog))
            .await
            .map_err(|e| DaemonError::Internal(format!("catalog task failed: {e}")))?
            .map_err(DaemonError::from)
    }

    /// The open handle of image `row`, opening it on first use.
    fn image_handle(&self, row: &ImageRecord) -> Result<Arc<Image>, ImageError> {
        if let Some(img) = self.images.lock().get(&row.id) {
            return Ok(img.clone());
        }
        let img = if is_local(row) {
            block_on_async(Image::open(self.store.clone(), &row.manifest_key))?
        } else {
            block_on_async(self.open_remote(row))?
        };
        // Another connection may have opened it meanwhile; keep the first.
        Ok(self.images.lock().entry(row.id).or_insert(img).clone())
    }
}

/// "NAME (SIZE, format raw, x86_64)".
pub fn export_description(row: &ImageRecord) -> String {
    format!(
        "{} ({}, format {}, {})",
        row.name,
        format_size(row.virtual_size),
        row.disk_format,
        row.architecture
    )
}

impl ExportRegistry for Daemon {
    fn list(&self) -> Vec<ExportListing> {
        match self.catalog.list(false) {
            Ok(rows) => {
                let mut out: Vec<ExportListing> = rows
                    .iter()
                    .filter(|r| r.status == ImageStatus::Active)
                    .map(|r| ExportListing {
                        name: format!("{IMAGE_EXPORT_PREFIX}{}", r.name),
                        description: export_description(r),
                    })
                    .collect();
                out.extend(self.volume_listings());
                out.sort_by(|a, b| a.name.cmp(&b.name));
                out
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot list exports");
                Vec::new()
            }
        }
    }

    fn times(&self, name: &str) -> Option<ExportTimes> {
        let image_name = name.strip_prefix(IMAGE_EXPORT_PREFIX)?;
        let row = self.catalog.get(image_name).ok()?;
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        (row.name == image_name).then(|| ExportTimes {
            created: at(row.created_at),
            modified: at(row.updated_at),
        })
    }

    fn open(&self, name: &str) -> Option<Export> {
        if name.starts_with(volumes::VOLUME_EXPORT_PREFIX) {
            return self.open_volume_export(name);
        }
        let image_name = name.strip_prefix(IMAGE_EXPORT_PREFIX)?;
        // Only names: an id would make two export names for one image.
        validate_name(image_name).ok()?;
        let row = match self.catalog.get(image_name) {
            Ok(row) if row.name == image_name && row.status == ImageStatus::Active => row,
            Ok(_) => return None,
            Err(e) => {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!(export = name, error = %crate::error::chain(&e), "catalog lookup failed");
                }
                return None;
            }
        };
        match self.image_handle(&row) {
            Ok(device) => Some(Export {
                name: name.to_string(),
                description: export_description(&row),
                device,
            }),
            Err(e) => {
                tracing::error!(export = name, error = %crate::error::chain(&e), "cannot open image");
                None
            }
        }
    }
}

/// Run `fut` to completion from synchronous code called on a tokio worker thread
/// ([`ExportRegistry::open`] is synchronous but opening an image is async).
fn block_on_async<F: std::future::Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        // A current-thread runtime cannot block in place: run on a helper thread.
        Ok(h) => std::thread::scope(|s| s.spawn(|| h.block_on(fut)).join())
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(_) => futures::executor::block_on(fut),
    }
}
