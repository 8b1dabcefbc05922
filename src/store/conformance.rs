//! The behaviour every [`super::Store`] backend must show, as one shared test suite.
//!
//! Each function checks one behaviour against a fresh, empty store. A backend's tests run
//! them all with [`store_conformance_tests!`](crate::store::conformance::store_conformance_tests).

use std::sync::Arc;

use bytes::Bytes;

use super::{Store, StoreError};

/// Generate one `#[tokio::test]` per conformance check; `$make` is an expression giving
/// `(guard, Arc<dyn Store>)` for a fresh empty store (the guard is kept alive for the test).
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store::conformance::store_conformance_tests!(@each $make;
            put_then_get_returns_data,
            get_range_past_end_is_out_of_bounds,
            get_missing_is_not_found,
            head_reports_size_or_none,
            concurrent_puts_of_same_key_never_expose_partial_objects,
            list_is_sorted_and_filtered_by_prefix,
            delete_removes_and_tolerates_missing,
            bad_keys_are_rejected_everywhere
        );
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_guard, store) = $make;
                $crate::store::conformance::$name(store).await;
            }
        )*
    };
}
pub(crate) use store_conformance_tests;

pub async fn put_then_get_returns_data(s: Arc<dyn Store>) {
    s.put("a/b/c", Bytes::from_static(b"hello world"))
        .await
        .unwrap();
    assert_eq!(&s.get("a/b/c").await.unwrap()[..], b"hello world");
    assert_eq!(&s.get_range("a/b/c", 6..11).await.unwrap()[..], b"world");
    assert_eq!(&s.get_range("a/b/c", 3..3).await.unwrap()[..], b"");
}

pub async fn get_range_past_end_is_out_of_bounds(s: Arc<dyn Store>) {
    s.put("k", Bytes::from_static(b"0123")).await.unwrap();
    let e = s.get_range("k", 2..5).await.unwrap_err();
    assert!(
        matches!(e, StoreError::RangeOutOfBounds { size: 4, .. }),
        "{e:?}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let e = s.get_range("k", 3..2).await.unwrap_err();
    assert!(matches!(e, StoreError::RangeOutOfBounds { .. }), "{e:?}");
}

pub async fn get_missing_is_not_found(s: Arc<dyn Store>) {
    let e = s.get("nope").await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { ref key } if key == "nope"));
    let e = s.get_range("x/nope", 0..1).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }));
}

pub async fn head_reports_size_or_none(s: Arc<dyn Store>) {
    assert_eq!(s.head("a/x").await.unwrap(), None);
    s.put("a/x", Bytes::from_static(b"123")).await.unwrap();
    assert_eq!(s.head("a/x").await.unwrap(), Some(3));
    assert_eq!(
        s.head("a").await.unwrap(),
        None,
        "a directory is not an object"
    );
}

pub async fn concurrent_puts_of_same_key_never_expose_partial_objects(s: Arc<dyn Store>) {
    let a = Bytes::from(vec![b'a'; 1 << 20]);
    let b = Bytes::from(vec![b'b'; 1 << 20]);
    s.put("k", a.clone()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let writer = Arc::clone(&s);
        let data = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { writer.put("k", data).await.unwrap() },
        ));
        let reader = Arc::clone(&s);
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let got = reader.get("k").await.unwrap();
            assert!(got == a || got == b, "partial object seen");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub async fn list_is_sorted_and_filtered_by_prefix(s: Arc<dyn Store>) {
    for k in [
        "chunks/ab/2",
        "chunks/ab/1",
        "chunks/ac/1",
        "manifests/m",
        "chunksx",
    ] {
        s.put(k, Bytes::from_static(b"x")).await.unwrap();
    }
    assert_eq!(
        s.list("chunks/").await.unwrap(),
        vec!["chunks/ab/1", "chunks/ab/2", "chunks/ac/1"]
    );
    assert_eq!(
        s.list("chunks/ab").await.unwrap(),
        vec!["chunks/ab/1", "chunks/ab/2"]
    );
    assert_eq!(s.list("chunks").await.unwrap().len(), 4);
    assert_eq!(s.list("").await.unwrap().len(), 5);
    assert!(s.list("nothing/").await.unwrap().is_empty());
}

pub async fn delete_removes_and_tolerates_missing(s: Arc<dyn Store>) {
    s.put("a/k", Bytes::from_static(b"x")).await.unwrap();
    s.delete("a/k").await.unwrap();
    assert_eq!(s.head("a/k").await.unwrap(), None);
    s.delete("a/k").await.unwrap();
    s.delete("never/was").await.unwrap();
}

pub async fn bad_keys_are_rejected_everywhere(s: Arc<dyn Store>) {
    for k in ["", "../x", "a/../b", "/abs", "a//b", "a b", "a/./b", "x~y"] {
        assert!(
            matches!(
                s.put(k, Bytes::new()).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "put {k:?}"
        );
        assert!(
            matches!(s.get(k).await, Err(StoreError::InvalidKey { .. })),
            "{k:?}"
        );
        assert!(
            matches!(s.head(k).await, Err(StoreError::InvalidKey { .. })),
            "{k:?}"
        );
        assert!(
            matches!(s.delete(k).await, Err(StoreError::InvalidKey { .. })),
            "{k:?}"
        );
        assert!(s.local_path(k).is_none());
    }
    assert!(matches!(
        s.list("../").await,
        Err(StoreError::InvalidKey { .. })
    ));
}
