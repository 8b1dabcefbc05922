//! An in-memory store, for tests.
//!
//! [`MemStore`] keeps objects in a sorted map behind a lock. It honours the whole [`Store`]
//! contract (atomic put, exact ranges, sorted listing, idempotent delete), so it is the
//! reference the conformance suite and the fault-injecting wrapper build on. Nothing is
//! durable: the objects live as long as the value.

use std::collections::BTreeMap;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;

use super::{validate_key, Store, StoreError};

/// A [`Store`] whose objects live in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    objects: RwLock<BTreeMap<String, Bytes>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// How many objects the store holds.
    pub fn len(&self) -> usize {
        self.objects.read().len()
    }

    /// Whether the store holds no object.
    pub fn is_empty(&self) -> bool {
        self.objects.read().is_empty()
    }
}

/// The bytes `range` of `data`, or `RangeOutOfBounds` when the range is not inside it.
///
/// Shared by the stores that hold whole objects in memory (this one, the fault store).
pub(crate) fn slice_range(key: &str, data: &Bytes, range: Range<u64>) -> Result<Bytes, StoreError> {
    let size = data.len() as u64;
    super::check_range(key, &range, size)?;
    Ok(data.slice(range.start as usize..range.end as usize))
}

#[async_trait]
impl Store for MemStore {
    fn describe(&self) -> String {
        "mem".to_string()
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let data = self.get(key).await?;
        slice_range(key, &data, range)
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        self.objects
            .read()
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                key: key.to_string(),
            })
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        validate_key(key)?;
        self.objects.write().insert(key.to_string(), data);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        validate_key(key)?;
        Ok(self.objects.read().get(key).map(|d| d.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let objects = self.objects.read();
        Ok(objects
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.objects.write().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};

    #[tokio::test]
    async fn get_range_past_end_returns_range_out_of_bounds() {
        let store = MemStore::new();
        store.put("a", Bytes::from_static(b"hello")).await.unwrap();

        let err = store.get_range("a", 3..6).await.unwrap_err();

        assert!(matches!(err, StoreError::RangeOutOfBounds { size: 5, .. }));
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn list_stops_at_the_end_of_the_prefix() {
        let store = MemStore::new();
        for k in ["a/1", "a/2", "ab", "b"] {
            store.put(k, Bytes::new()).await.unwrap();
        }

        let keys = store.list("a/").await.unwrap();

        assert_eq!(keys, ["a/1", "a/2"]);
    }
}
