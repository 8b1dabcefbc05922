//! In-flight chunk references of imports: what makes dedup race-free.
//!
//! An import may reuse a chunk that already exists in the store instead of writing it again.
//! Meanwhile an expunge (or another import's failure cleanup) may want to delete that very
//! chunk. [`ChunkLedger`] closes the window between "the import saw the chunk exists" and
//! "the import's manifest is committed to the catalog":
//!
//! - An import *holds* a digest in the ledger ([`LedgerGuard::hold`]) **before** it asks the
//!   store whether the chunk exists.
//! - A deleter takes the ledger's lock ([`ChunkLedger::lock_for_delete`]) and, while holding
//!   it, deletes a chunk only if no import holds it and the catalog does not reference it.
//!
//! Holding and the delete check are serialised by the same lock, so either the delete
//! completed before the hold (the import then sees the chunk missing and writes it), or the
//! hold came first (the deleter sees a holder and keeps the chunk).
//!
//! Releasing (dropping a [`LedgerGuard`]) only lowers counts, which can only make a later
//! deleter more permissive, so it does not take the async lock and works from `Drop`.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::types::Digest;

/// Chunk references held by imports that are not committed yet.
#[derive(Default)]
pub struct ChunkLedger {
    /// Serialises "hold a digest" against "check holders, then delete". Held across the
    /// store's async delete, hence an async mutex.
    gate: tokio::sync::Mutex<()>,
    /// Digest → number of guards holding it. Entries with count 0 are removed.
    counts: Mutex<HashMap<Digest, u64>>,
}

impl ChunkLedger {
    pub fn new() -> ChunkLedger {
        ChunkLedger::default()
    }

    /// A guard through which an import holds digests; it releases them when dropped.
    pub fn guard(self: &Arc<Self>) -> LedgerGuard {
        LedgerGuard {
            ledger: Arc::clone(self),
            held: HashSet::new(),
        }
    }

    /// How many in-flight imports hold `digest` right now (a snapshot: only meaningful for
    /// decisions while holding [`ChunkLedger::lock_for_delete`]).
    pub fn holders(&self, digest: &Digest) -> u64 {
        self.counts.lock().get(digest).copied().unwrap_or(0)
    }

    /// Take the ledger's lock for deleting chunks. While the returned lock lives, no import
    /// can start holding a digest, so `holders(d) == 0` stays true until it is dropped.
    pub async fn lock_for_delete(&self) -> DeleteLock<'_> {
        DeleteLock {
            ledger: self,
            _gate: self.gate.lock().await,
        }
    }

    fn release(&self, digest: &Digest) {
        let mut counts = self.counts.lock();
        if let Some(c) = counts.get_mut(digest) {
            *c -= 1;
            if *c == 0 {
                counts.remove(digest);
            }
        }
    }
}

/// The ledger's lock, held while checking and deleting chunks.
pub struct DeleteLock<'a> {
    ledger: &'a ChunkLedger,
    _gate: tokio::sync::MutexGuard<'a, ()>,
}

impl DeleteLock<'_> {
    /// How many in-flight imports hold `digest`; stable while this lock is held, except that
    /// it may decrease.
    pub fn holders(&self, digest: &Digest) -> u64 {
        self.ledger.holders(digest)
    }
}

/// An import's references in the ledger; released on drop.
pub struct LedgerGuard {
    ledger: Arc<ChunkLedger>,
    held: HashSet<Digest>,
}

impl LedgerGuard {
    /// Hold `digest` (idempotent per guard). Call before checking whether the chunk exists.
    pub async fn hold(&mut self, digest: Digest) {
        if self.held.contains(&digest) {
            return;
        }
        let _gate = self.ledger.gate.lock().await;
        *self.ledger.counts.lock().entry(digest).or_insert(0) += 1;
        self.held.insert(digest);
    }

    /// Release this guard's hold on `digest` now (no-op if it does not hold it). Used by
    /// failure cleanup while holding the [`DeleteLock`], so the import's own hold does not
    /// keep its chunk alive.
    pub fn release(&mut self, digest: &Digest) {
        if self.held.remove(digest) {
            self.ledger.release(digest);
        }
    }

    /// Whether this guard holds `digest`.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.held.contains(digest)
    }

    /// Number of distinct digests held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Drop for LedgerGuard {
    fn drop(&mut self) {
        for d in self.held.drain() {
            self.ledger.release(&d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guard_drop_releases_holds() {
        let ledger = Arc::new(ChunkLedger::new());
        let d = Digest::of(b"x");
        let mut a = ledger.guard();
        let mut b = ledger.guard();
        a.hold(d).await;
        a.hold(d).await;
        b.hold(d).await;
        assert_eq!(ledger.holders(&d), 2);
        drop(a);
        assert_eq!(ledger.holders(&d), 1);
        drop(b);
        assert_eq!(ledger.holders(&d), 0);
    }

    #[tokio::test]
    async fn release_drops_only_own_hold() {
        let ledger = Arc::new(ChunkLedger::new());
        let d = Digest::of(b"x");
        let mut a = ledger.guard();
        let mut b = ledger.guard();
        a.hold(d).await;
        b.hold(d).await;
        a.release(&d);
        a.release(&d);
        assert_eq!(ledger.holders(&d), 1);
        assert!(!a.holds(&d));
        assert!(b.holds(&d));
    }

    #[tokio::test]
    async fn hold_waits_for_delete_lock() {
        let ledger = Arc::new(ChunkLedger::new());
        let d = Digest::of(b"x");
        let lock = ledger.lock_for_delete().await;
        let l2 = Arc::clone(&ledger);
        let task = tokio::spawn(async move {
            let mut g = l2.guard();
            g.hold(d).await;
            g
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(lock.holders(&d), 0, "hold must not pass the delete lock");
        drop(lock);
        let g = task.await.unwrap();
        assert_eq!(ledger.holders(&d), 1);
        drop(g);
    }
}
