//! Deleting chunks and manifests nobody uses any more.
//!
//! - [`delete_unreferenced`]: after an image is expunged from the catalog, delete its
//!   manifest and those of its chunks that no other image (catalog) and no in-flight import
//!   (ledger) uses. Each chunk's check-and-delete runs under the ledger lock.
//! - [`sweep_orphans`]: at start-up, before any import runs, delete every chunk and
//!   manifest the catalog does not know (left by a crash mid-import or mid-expunge). Objects
//!   under `chunks/` whose key is not a well-formed chunk key are left alone.

use std::collections::HashSet;
use std::sync::Arc;

use super::{chunk_key, parse_chunk_key, ChunkLedger, ImageError, IsReferenced};
use crate::store::Store;
use crate::types::Digest;

/// Delete `digests` (chunks of an expunged image) and `manifest_key` from `store`, except
/// chunks the catalog still references or an in-flight import holds. Returns how many
/// chunks were deleted (chunks already missing count as deleted).
///
/// The manifest goes first, so a failure part-way never leaves a manifest pointing at
/// deleted chunks; the remaining chunks are orphans for [`sweep_orphans`].
pub async fn delete_unreferenced(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    manifest_key: &str,
    digests: &[Digest],
) -> Result<u64, ImageError> {
    store.delete(manifest_key).await?;
    let mut deleted = 0;
    for d in digests {
        // Lock per chunk so a long expunge does not stall imports for its whole duration.
        let lock = ledger.lock_for_delete().await;
        if lock.holders(d) == 0 && !is_referenced(d) {
            store.delete(&chunk_key(d)).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Start-up sweep: delete every chunk and manifest in `store` that is not in the given
/// sets (left behind by a crash mid-import or mid-expunge). Returns (chunks, manifests)
/// deleted.
///
/// Must run before any import starts: it does not consult the ledger.
pub async fn sweep_orphans(
    store: Arc<dyn Store>,
    referenced_chunks: &HashSet<Digest>,
    referenced_manifests: &HashSet<String>,
) -> Result<(u64, u64), ImageError> {
    let mut chunks = 0;
    for key in store.list("chunks/").await? {
        match parse_chunk_key(&key) {
            Some(d) if !referenced_chunks.contains(&d) => {
                store.delete(&key).await?;
                chunks += 1;
            }
            Some(_) => {}
            None => tracing::warn!(key, "sweep: ignoring object with a malformed chunk key"),
        }
    }
    let mut manifests = 0;
    for key in store.list("manifests/").await? {
        if !referenced_manifests.contains(&key) {
            store.delete(&key).await?;
            manifests += 1;
        }
    }
    Ok((chunks, manifests))
}
