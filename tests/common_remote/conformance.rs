//! The conformance suite every [`Store`] backend runs: the trait's whole contract, one
//! behaviour per check, with the key and the expectation in every failure message.
//!
//! [`read_write`] needs a writable, empty store. [`read_only`] needs a store that already
//! holds [`fixtures`] (an HTTP server serving a directory, say) and checks reads only.
#![allow(dead_code)]

use bytes::Bytes;
use imgcache::error::{Classify, ErrorKind};
use imgcache::store::{Store, StoreError};

/// Objects the read-only suite expects: a small object, an empty one, a multi-chunk one.
pub fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small.txt", b"hello, store".to_vec()),
        ("empty", Vec::new()),
        (
            "images/disk.raw",
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ]
}

/// Every check, on an empty writable store.
pub async fn read_write(store: &dyn Store) {
    let name = store.describe();
    for (key, data) in fixtures() {
        store
            .put(key, Bytes::from(data))
            .await
            .unwrap_or_else(|e| panic!("{name}: put {key}: {e:?}"));
    }
    read_only(store).await;
    put_replaces_whole_object(store).await;
    list_is_sorted_and_matches_string_prefixes(store).await;
    delete_is_idempotent(store).await;
}

/// The reading checks, on a store holding [`fixtures`].
pub async fn read_only(store: &dyn Store) {
    get_returns_whole_object(store).await;
    get_range_returns_exact_bytes(store).await;
    get_range_past_end_is_out_of_bounds(store).await;
    head_reports_size_or_none(store).await;
    missing_object_is_not_found(store).await;
    invalid_keys_are_rejected(store).await;
}

async fn get_returns_whole_object(store: &dyn Store) {
    for (key, data) in fixtures() {
        let got = store
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
        assert_eq!(got.len(), data.len(), "get {key}: length");
        assert!(got[..] == data[..], "get {key}: content differs");
    }
}

async fn get_range_returns_exact_bytes(store: &dyn Store) {
    let data = fixtures().remove(2).1;
    let size = data.len() as u64;
    for range in [
        0..1,
        0..size,
        1..2,
        4096..70_000,
        size - 1..size,
        100..100,
        size..size,
    ] {
        let got = store
            .get_range("images/disk.raw", range.clone())
            .await
            .unwrap_or_else(|e| panic!("get_range {range:?}: {e:?}"));
        assert!(
            got[..] == data[range.start as usize..range.end as usize],
            "get_range {range:?}: wrong bytes ({} returned)",
            got.len()
        );
    }
}

async fn get_range_past_end_is_out_of_bounds(store: &dyn Store) {
    for range in [0..13, 12..13, 20..30] {
        let err = store
            .get_range("small.txt", range.clone())
            .await
            .expect_err("a range past the end must fail");
        assert!(
            matches!(err, StoreError::RangeOutOfBounds { size: 12, .. }),
            "get_range {range:?} of a 12-byte object: {err:?}"
        );
    }
}

async fn head_reports_size_or_none(store: &dyn Store) {
    for (key, data) in fixtures() {
        let size = store
            .head(key)
            .await
            .unwrap_or_else(|e| panic!("head {key}: {e:?}"));
        assert_eq!(size, Some(data.len() as u64), "head {key}");
    }
    let missing = store
        .head("no/such/object")
        .await
        .expect("head of a missing object");
    assert_eq!(missing, None);
}

async fn missing_object_is_not_found(store: &dyn Store) {
    let get = store
        .get("no-such-object")
        .await
        .expect_err("get of a missing object");
    let range = store
        .get_range("no-such-object", 0..4)
        .await
        .expect_err("get_range of a missing object");
    for err in [get, range] {
        assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
}

async fn invalid_keys_are_rejected(store: &dyn Store) {
    for key in ["", "../etc/passwd", "a//b", "/abs", "sp ace"] {
        let err = store.get(key).await.expect_err("an invalid key must fail");
        assert!(
            matches!(err, StoreError::InvalidKey { .. }),
            "key {key:?}: {err:?}"
        );
    }
}

async fn put_replaces_whole_object(store: &dyn Store) {
    store
        .put("replace/me", Bytes::from_static(b"first version, long"))
        .await
        .unwrap();
    store
        .put("replace/me", Bytes::from_static(b"second"))
        .await
        .unwrap();

    assert_eq!(&store.get("replace/me").await.unwrap()[..], b"second");
    assert_eq!(store.head("replace/me").await.unwrap(), Some(6));
}

async fn list_is_sorted_and_matches_string_prefixes(store: &dyn Store) {
    for key in [
        "list/b/2", "list/a", "list/b/1", "list/ab", "listing", "other/x",
    ] {
        store.put(key, Bytes::from_static(b"x")).await.unwrap();
    }

    let under_dir = store.list("list/").await.unwrap();
    let partial = store.list("list/a").await.unwrap();
    let nested = store.list("list/b/").await.unwrap();
    let none = store.list("nothing-here/").await.unwrap();
    let all = store.list("").await.unwrap();

    assert_eq!(under_dir, ["list/a", "list/ab", "list/b/1", "list/b/2"]);
    assert_eq!(partial, ["list/a", "list/ab"]);
    assert_eq!(nested, ["list/b/1", "list/b/2"]);
    assert!(none.is_empty(), "{none:?}");
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "list(\"\") is sorted");
    assert!(all.contains(&"listing".to_string()) && all.contains(&"other/x".to_string()));
}

async fn delete_is_idempotent(store: &dyn Store) {
    store
        .put("gone/soon", Bytes::from_static(b"x"))
        .await
        .unwrap();

    store.delete("gone/soon").await.expect("delete");
    store
        .delete("gone/soon")
        .await
        .expect("delete of a deleted object");
    store
        .delete("never/existed")
        .await
        .expect("delete of a missing object");

    assert_eq!(store.head("gone/soon").await.unwrap(), None);
    assert!(matches!(
        store.get("gone/soon").await,
        Err(StoreError::NotFound { .. })
    ));
}
