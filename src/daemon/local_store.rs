//! Turns the opened [`DirStore`] into the daemon's `Arc<dyn Store>`.
//!
//! MERGE NOTE: the `DirStore` signature stub does not implement [`Store`] yet; the store work
//! adds that impl. Until then this picks, at compile time, `Arc::new(store)` when
//! `DirStore: Store` holds and an "unavailable" error otherwise (method resolution prefers the
//! by-value impl, whose bound is checked, over the by-reference fallback). After the merge
//! this whole file can be replaced by `Arc::new(store) as Arc<dyn Store>`.

use std::sync::Arc;

use crate::store::dir::DirStore;
use crate::store::Store;

struct Wrap<T>(T);

#[allow(dead_code)] // used once DirStore implements Store
trait ViaStore {
    fn into_store(self) -> Option<Arc<dyn Store>>;
}

impl<T: Store> ViaStore for Wrap<T> {
    fn into_store(self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.0))
    }
}

trait ViaFallback {
    fn into_store(self) -> Option<Arc<dyn Store>>;
}

impl<T> ViaFallback for &Wrap<T> {
    fn into_store(self) -> Option<Arc<dyn Store>> {
        None
    }
}

/// `store` as a trait object, or `None` while `DirStore` does not implement [`Store`].
#[allow(clippy::needless_borrow, unused_imports)]
pub(super) fn as_dyn_store(store: DirStore) -> Option<Arc<dyn Store>> {
    Wrap(store).into_store()
}
