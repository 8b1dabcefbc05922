//! Lazy pulling, the daemon side: the configured stores, registering images that live in a
//! store or at a URL, pushing local images to a store, warming and pinning, cache status.
//!
//! Images whose bytes are not in the local store are read through the daemon's one
//! [`ChunkCache`], under the image id as cache key: native images with
//! [`Image::open_cached`] (chunks verified by digest), raw objects with
//! [`Image::open_object`]. Registering copies nothing; push copies chunks the target lacks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::{Daemon, DaemonError, LOCAL_STORE};
use crate::cache::{CacheStatus, WarmReport};
use crate::catalog::{
    validate_name, FinishRegister, ImageAttributes, ImageRecord, ImageSource, ImageStatus,
};
use crate::config::check_chunk_size;
use crate::error::chain as error_chain;
use crate::image::{chunk_key, Checksum, Image, ImageError, Manifest, Progress};
use crate::store::spec::{parse_object_url, StoreSpec};
use crate::store::{Store, StoreError};
use crate::types::ImageId;

/// The pseudo store name of raw objects registered by a URL no configured store covers.
pub const URL_STORE: &str = "url";

/// How long `store list` waits for a store to answer its probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Chunk uploads in flight during a push.
const PUSH_PARALLEL: usize = 8;

/// One store the daemon knows.
pub struct StoreEntry {
    pub kind: &'static str,
    pub location: String,
    pub spec: Option<StoreSpec>,
    pub store: Arc<dyn Store>,
}

impl StoreEntry {
    pub fn new(spec: Option<StoreSpec>, store: Arc<dyn Store>, local: &str) -> StoreEntry {
        let (kind, location) = match &spec {
            None => ("dir", local.to_string()),
            Some(StoreSpec::Dir { path, .. }) => ("dir", path.display().to_string()),
            Some(StoreSpec::Http { url, .. }) => ("http", url.clone()),
            Some(StoreSpec::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            }) => {
                let mut loc = format!("s3://{bucket}");
                if !prefix.is_empty() {
                    loc += &format!("/{prefix}");
                }
                if let Some(e) = endpoint {
                    loc += &format!(" at {e}");
                }
                ("s3", loc)
            }
        };
        StoreEntry {
            kind,
            location,
            spec,
            store,
        }
    }
}

/// `GET /v1/stores`: one row per store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    pub name: String,
    /// `dir`, `http` or `s3`.
    pub kind: String,
    pub location: String,
    /// Whether the probe (a `head` of a key that need not exist) got an answer in time.
    pub reachable: bool,
    /// Why not, when not.
    pub error: Option<String>,
}

/// `POST /v1/images/{image}/warm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmRequest {
    /// Pin the image first (it is then never evicted).
    pub pin: bool,
    /// Bytes per second; unlimited when absent.
    pub rate: Option<u64>,
    /// Chunk fetches in flight; the cache's fetch concurrency when absent.
    pub parallel: Option<usize>,
}

/// `POST /v1/images/{image}/push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    pub store: String,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    pub store: String,
    /// The key to register the image with elsewhere (`image add --store --manifest`).
    pub manifest_key: String,
    pub chunks_total: u64,
    pub chunks_uploaded: u64,
    /// Already in the store (found by `head`).
    pub chunks_skipped: u64,
    pub bytes_uploaded: u64,
}

/// How much of one image is cached, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCacheRow {
    /// The image name; the cache key when no catalog row has that id any more.
    pub name: String,
    pub id: String,
    pub cached_bytes: u64,
    /// Bytes with data (holes excluded); `None` when the image has not been opened since
    /// the daemon started (its manifest is not loaded).
    pub total_bytes: Option<u64>,
    pub pinned: bool,
}

/// `GET /v1/cache`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheView {
    #[serde(flatten)]
    pub status: CacheStatus,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub rows: Vec<ImageCacheRow>,
}

/// Where a `POST /v1/images` takes the image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterFrom {
    /// A native image (manifest + chunks) already in store `store`.
    Manifest { store: String, key: String },
    /// A raw object at `url`, read by range in chunks of `chunk_size`.
    Url {
        url: String,
        chunk_size: Option<u64>,
    },
}

impl Daemon {
    /// Every store with a reachability probe, `local` first, then by name.
    pub async fn list_stores(&self) -> Vec<StoreInfo> {
        let probes = self.stores.iter().map(|(name, e)| async move {
            let probe =
                tokio::time::timeout(PROBE_TIMEOUT, e.store.head("imgcache-probe/reachable")).await;
            let (reachable, error) = match probe {
                Ok(Ok(_)) => (true, None),
                Ok(Err(err)) => (false, Some(error_chain(&err))),
                Err(_) => (
                    false,
                    Some(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
                ),
            };
            StoreInfo {
                name: name.clone(),
                kind: e.kind.to_string(),
                location: e.location.clone(),
                reachable,
                error,
            }
        });
        let mut out = futures::future::join_all(probes).await;
        out.sort_by_key(|s| (s.name != LOCAL_STORE, s.name.clone()));
        out
    }

    fn store_named(&self, name: &str) -> Result<Arc<dyn Store>, DaemonError> {
        match self.stores.get(name) {
            Some(e) => Ok(e.store.clone()),
            None => Err(DaemonError::NotFound(format!(
                "no store named {name:?}: configure it as [stores.{name}] (see `imgcache store list`)"
            ))),
        }
    }

    /// The store serving object `url`: a configured store covering it (its credentials and
    /// policy apply), else one opened from the URL alone (S3 credentials from the AWS
    /// environment variables). Returns (store name, store, key in that store).
    fn resolve_url(&self, url: &str) -> Result<(String, Arc<dyn Store>, String), DaemonError> {
        let object = parse_object_url(url).map_err(store_input)?;
        let (url_dir, key) = match &object.spec {
            StoreSpec::S3 { bucket, prefix, .. } => {
                (format!("s3://{bucket}/{prefix}"), &object.key)
            }
            StoreSpec::Http { url: base, .. } => (base.clone(), &object.key),
            StoreSpec::Dir { .. } => unreachable!("object URLs are http or s3"),
        };
        let full = format!("{}/{key}", url_dir.trim_end_matches('/'));
        for (name, e) in &self.stores {
            let base = match &e.spec {
                Some(StoreSpec::S3 { bucket, prefix, .. }) => {
                    format!("s3://{bucket}/{prefix}")
                }
                Some(StoreSpec::Http { url, .. }) => url.clone(),
                _ => continue,
            };
            let base = format!("{}/", base.trim_end_matches('/'));
            if let Some(rest) = full.strip_prefix(&base) {
                if crate::store::validate_key(rest).is_ok() {
                    return Ok((name.clone(), e.store.clone(), rest.to_string()));
                }
            }
        }
        let mut cache = self.url_stores.lock();
        let store = match cache.get(&url_dir) {
            Some(s) => s.clone(),
            None => {
                let s =
                    crate::store::spec::open_store(URL_STORE, &object.spec).map_err(store_input)?;
                cache.insert(url_dir, s.clone());
                s
            }
        };
        Ok((URL_STORE.to_string(), store, object.key))
    }

    /// Register an image that lives in a store or at a URL, without copying its bytes.
    pub async fn register_image(
        &self,
        name: String,
        from: RegisterFrom,
        checksum: Option<String>,
        attributes: ImageAttributes,
    ) -> Result<ImageRecord, DaemonError> {
        validate_name(&name).map_err(DaemonError::InvalidInput)?;
        let (md5, sha256) = match &checksum {
            None => (None, None),
            Some(text) => match text
                .parse::<Checksum>()
                .map_err(DaemonError::InvalidInput)?
            {
                Checksum::Md5(b) => (Some(hex::encode(b)), None),
                Checksum::Sha256(b) => (None, Some(hex::encode(b))),
            },
        };
        let (store_name, facts) = match from {
            RegisterFrom::Manifest { store, key } => {
                if store == LOCAL_STORE {
                    return Err(DaemonError::InvalidInput(
                        "images of the local store are added with --file; --manifest names a manifest in another store".into(),
                    ));
                }
                crate::store::validate_key(&key).map_err(store_input)?;
                let s = self.store_named(&store)?;
                let bytes = s.get(&key).await.map_err(ImageError::from)?;
                let manifest = Manifest::decode(&bytes).map_err(|source| {
                    DaemonError::Image(ImageError::Manifest {
                        key: key.clone(),
                        source,
                    })
                })?;
                (
                    store,
                    FinishRegister {
                        virtual_size: manifest.size(),
                        stored_size: 0,
                        chunk_size: manifest.chunk_size(),
                        md5,
                        sha256,
                        manifest_key: key,
                        source: ImageSource::Native,
                    },
                )
            }
            RegisterFrom::Url { url, chunk_size } => {
                let chunk_size = match chunk_size {
                    None => crate::config::DEFAULT_OBJECT_CHUNK_SIZE,
                    Some(n) => check_chunk_size(n).map_err(DaemonError::InvalidInput)?,
                };
                let (store_name, store, key) = self.resolve_url(&url)?;
                let size = match store.head(&key).await.map_err(ImageError::from)? {
                    Some(0) => {
                        return Err(DaemonError::InvalidInput(format!(
                            "{url} is empty (an image needs at least one byte)"
                        )))
                    }
                    Some(n) => n,
                    None => {
                        return Err(DaemonError::NotFound(format!("no object at {url}")));
                    }
                };
                (
                    store_name,
                    FinishRegister {
                        virtual_size: size,
                        stored_size: 0,
                        chunk_size,
                        md5,
                        sha256,
                        manifest_key: key,
                        source: ImageSource::Object { url },
                    },
                )
            }
        };
        let id = ImageId::random();
        self.catalog_call(move |c| c.insert_importing(id, &name, &attributes, &store_name))
            .await?;
        match self
            .catalog_call(move |c| c.finish_register(id, &facts))
            .await
        {
            Ok(row) => {
                tracing::info!(image = %row.name, id = %row.id, store = %row.store,
                    size = row.virtual_size, "image registered");
                Ok(row)
            }
            Err(e) => {
                let _ = self.catalog_call(move |c| c.remove_failed_import(id)).await;
                Err(e)
            }
        }
    }

    /// The open handle of a remote image (not of the local store).
    pub(super) async fn open_remote(&self, row: &ImageRecord) -> Result<Arc<Image>, ImageError> {
        let key = row.id.to_string();
        match &row.source {
            ImageSource::Native => {
                let store = self
                    .stores
                    .get(&row.store)
                    .map(|e| e.store.clone())
                    .ok_or_else(|| {
                        ImageError::Internal(format!(
                            "image {} is in store {:?}, which is not configured",
                            row.name, row.store
                        ))
                    })?;
                Image::open_cached(store, &row.manifest_key, &self.cache, &key).await
            }
            ImageSource::Object { url } => {
                let store = if row.store == URL_STORE {
                    self.resolve_url(url)
                        .map_err(|e| ImageError::Internal(error_chain(&e)))?
                        .1
                } else {
                    self.stores
                        .get(&row.store)
                        .map(|e| e.store.clone())
                        .ok_or_else(|| {
                            ImageError::Internal(format!(
                                "image {} is in store {:?}, which is not configured",
                                row.name, row.store
                            ))
                        })?
                };
                Image::open_object(
                    store,
                    &row.manifest_key,
                    row.virtual_size,
                    row.chunk_size,
                    &self.cache,
                    &key,
                )
            }
        }
    }

    /// The handle of a remote image for warm and pin, opened if needed.
    async fn remote_handle(
        &self,
        id_or_name: &str,
    ) -> Result<(ImageRecord, Arc<Image>), DaemonError> {
        let row = self.get_image(id_or_name).await?;
        if is_local(&row) {
            return Err(DaemonError::InvalidInput(format!(
                "image {} is in the local store: it is always fully local, there is nothing to warm or pin",
                row.name
            )));
        }
        if row.status != ImageStatus::Active {
            return Err(DaemonError::Conflict(format!(
                "image {} is {}, not active",
                row.name, row.status
            )));
        }
        if let Some(img) = self.images.lock().get(&row.id) {
            return Ok((row, img.clone()));
        }
        let img = self.open_remote(&row).await?;
        let img = self.images.lock().entry(row.id).or_insert(img).clone();
        Ok((row, img))
    }

    /// Fetch every uncached chunk of a remote image into the cache.
    pub async fn warm_image(
        &self,
        id_or_name: &str,
        req: WarmRequest,
        progress: Progress,
    ) -> Result<WarmReport, DaemonError> {
        let (row, img) = self.remote_handle(id_or_name).await?;
        if req.pin {
            self.set_pinned(&row, true)?;
        }
        let cached = img
            .cached()
            .ok_or_else(|| DaemonError::Internal("a remote image without a cache".into()))?
            .clone();
        let parallel = req
            .parallel
            .unwrap_or(self.cache.config().fetch_concurrency)
            .max(1);
        let started = std::time::Instant::now();
        let report = cached
            .warm(parallel, req.rate, Some(progress))
            .await
            .map_err(|e| DaemonError::Cache(Box::new(e)))?;
        tracing::info!(image = %row.name, fetched = report.fetched_bytes,
            secs = started.elapsed().as_secs_f64(), "image warmed");
        Ok(report)
    }

    /// Pin (never evict) or unpin a remote image's cached chunks.
    pub async fn pin_image(
        &self,
        id_or_name: &str,
        pinned: bool,
    ) -> Result<ImageRecord, DaemonError> {
        let row = self.get_image(id_or_name).await?;
        if is_local(&row) {
            return Err(DaemonError::InvalidInput(format!(
                "image {} is in the local store: it is always fully local, there is nothing to pin",
                row.name
            )));
        }
        self.set_pinned(&row, pinned)?;
        Ok(row)
    }

    fn set_pinned(&self, row: &ImageRecord, pinned: bool) -> Result<(), DaemonError> {
        self.cache
            .set_pinned(&row.id.to_string(), pinned)
            .map_err(|e| DaemonError::Cache(Box::new(e)))
    }

    /// The cache's state, with image names.
    pub async fn cache_view(&self) -> Result<CacheView, DaemonError> {
        let status = self.cache.status();
        let rows = self.catalog_call(|c| c.list(true)).await?;
        let by_id: HashMap<String, &ImageRecord> =
            rows.iter().map(|r| (r.id.to_string(), r)).collect();
        let handles: HashMap<String, Arc<Image>> = self
            .images
            .lock()
            .iter()
            .map(|(id, img)| (id.to_string(), img.clone()))
            .collect();
        let mut out = Vec::new();
        for img in &status.images {
            let row = by_id.get(&img.key);
            // Exact when the image is open: the bytes of its chunks with data.
            let total_bytes = handles.get(&img.key).map(|h| {
                let m = h.manifest();
                (0..m.chunk_count())
                    .filter(|&i| !m.is_hole(i))
                    .map(|i| m.chunk_len(i))
                    .sum::<u64>()
            });
            out.push(ImageCacheRow {
                name: row.map_or_else(|| img.key.clone(), |r| r.name.clone()),
                id: img.key.clone(),
                cached_bytes: img.cached_bytes,
                total_bytes,
                pinned: img.pinned,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        let cfg = self.cache.config();
        Ok(CacheView {
            high_watermark: cfg.high_watermark,
            low_watermark: cfg.low_watermark,
            status,
            rows: out,
        })
    }

    /// Upload a local image's chunks (those the store lacks) and its manifest to `store`.
    pub async fn push_image(
        &self,
        id_or_name: &str,
        store: &str,
        progress: Progress,
    ) -> Result<PushReport, DaemonError> {
        let row = self.get_image(id_or_name).await?;
        if !is_local(&row) {
            return Err(DaemonError::InvalidInput(format!(
                "image {} is not in the local store (it is in {:?}); only local images can be pushed",
                row.name, row.store
            )));
        }
        if row.status != ImageStatus::Active && row.status != ImageStatus::Disabled {
            return Err(DaemonError::Conflict(format!(
                "image {} is {}; push an active or disabled image",
                row.name, row.status
            )));
        }
        if store == LOCAL_STORE {
            return Err(DaemonError::InvalidInput(
                "the image is in the local store already; name another store".into(),
            ));
        }
        let target = self.store_named(store)?;
        let bytes = self
            .store
            .get(&row.manifest_key)
            .await
            .map_err(ImageError::from)?;
        let manifest = Manifest::decode(&bytes).map_err(|source| {
            DaemonError::Image(ImageError::Manifest {
                key: row.manifest_key.clone(),
                source,
            })
        })?;
        // Distinct chunks with their lengths (only the last chunk may be short).
        let mut chunks = BTreeMap::new();
        for i in 0..manifest.chunk_count() {
            if let Some(d) = manifest.chunk(i) {
                chunks.entry(*d).or_insert(manifest.chunk_len(i));
            }
        }
        let total: u64 = chunks.values().sum();
        let done = Arc::new(AtomicU64::new(0));
        let uploaded = Arc::new(AtomicU64::new(0));
        let uploaded_bytes = Arc::new(AtomicU64::new(0));
        progress(0, total);
        futures::stream::iter(chunks.into_iter().map(Ok::<_, DaemonError>))
            .try_for_each_concurrent(PUSH_PARALLEL, |(digest, len)| {
                let (src, dst) = (self.store.clone(), target.clone());
                let (done, uploaded, uploaded_bytes, progress) = (
                    done.clone(),
                    uploaded.clone(),
                    uploaded_bytes.clone(),
                    progress.clone(),
                );
                async move {
                    let key = chunk_key(&digest);
                    if dst.head(&key).await.map_err(ImageError::from)?.is_none() {
                        let data = src.get(&key).await.map_err(ImageError::from)?;
                        dst.put(&key, data).await.map_err(ImageError::from)?;
                        uploaded.fetch_add(1, Ordering::Relaxed);
                        uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    let now = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(now, total);
                    Ok(())
                }
            })
            .await?;
        // The manifest goes last: a store never holds a manifest whose chunks are missing.
        target
            .put(&row.manifest_key, bytes)
            .await
            .map_err(ImageError::from)?;
        let chunks_total = manifest.distinct_digests().len() as u64;
        let chunks_uploaded = uploaded.load(Ordering::Relaxed);
        tracing::info!(image = %row.name, store, chunks_uploaded, "image pushed");
        Ok(PushReport {
            store: store.to_string(),
            manifest_key: row.manifest_key.clone(),
            chunks_total,
            chunks_uploaded,
            chunks_skipped: chunks_total - chunks_uploaded,
            bytes_uploaded: uploaded_bytes.load(Ordering::Relaxed),
        })
    }
}

/// Whether a row's bytes are in the local store (read directly, not through the cache).
pub fn is_local(row: &ImageRecord) -> bool {
    row.store == LOCAL_STORE && row.source.is_native()
}

fn store_input(e: StoreError) -> DaemonError {
    DaemonError::Image(ImageError::Store(e))
}
