//! Every store backend against the shared conformance suite, and the remote backends'
//! failure behaviour against real servers: a moto S3 server and an HTTP range server, both
//! started by the test on loopback.

mod common_remote;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common_remote::conformance;
use common_remote::moto::Moto;
use common_remote::range_server::{RangeServer, RangeServerConfig};
use imgcache::error::{Classify, ErrorKind};
use imgcache::store::dir::DirStore;
use imgcache::store::mem::MemStore;
use imgcache::store::object::{RemoteStore, S3Config};
use imgcache::store::retry::{RetryPolicy, RetryStore};
use imgcache::store::spec::{open_store, parse_object_url, StoreSpec};
use imgcache::store::{Store, StoreError};

fn s3_spec(moto: &Moto, bucket: &str, prefix: &str) -> StoreSpec {
    toml::from_str(&format!(
        r#"
        type = "s3"
        endpoint = "{}"
        region = "us-east-1"
        bucket = "{bucket}"
        prefix = "{prefix}"
        access-key-id = "testing"
        secret-access-key = "testing"
        allow-http = true
        timeout = "10s"
        retries = 2
        "#,
        moto.endpoint()
    ))
    .expect("valid s3 spec")
}

fn http_spec(url: &str, extra: &str) -> StoreSpec {
    toml::from_str(&format!("type = \"http\"\nurl = \"{url}\"\n{extra}")).expect("valid http spec")
}

/// A directory holding the conformance fixtures, and a range server serving it.
async fn serve_fixtures(
    config: impl FnOnce(&mut RangeServerConfig),
) -> (tempfile::TempDir, RangeServer) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pub");
    for (key, data) in conformance::fixtures() {
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let mut cfg = RangeServerConfig::new(dir.path());
    config(&mut cfg);
    let server = RangeServer::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (dir, server)
}

#[tokio::test]
async fn mem_store_passes_conformance() {
    conformance::read_write(&MemStore::new()).await;
}

#[tokio::test]
async fn retry_wrapped_store_passes_conformance() {
    let store = RetryStore::new(Arc::new(MemStore::new()), RetryPolicy::default());

    conformance::read_write(&store).await;
}

#[tokio::test]
async fn dir_store_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();

    conformance::read_write(&DirStore::open(dir.path().join("store")).unwrap()).await;
}

#[tokio::test]
async fn dir_store_from_spec_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let spec: StoreSpec = toml::from_str(&format!(
        "type = \"dir\"\npath = {:?}\n",
        dir.path().join("s")
    ))
    .unwrap();
    let store = open_store("near", &spec).unwrap();

    conformance::read_write(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_conformance() {
    let moto = Moto::start();
    moto.create_bucket("conformance");
    let store = open_store("s3", &s3_spec(&moto, "conformance", "")).unwrap();

    conformance::read_write(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_with_prefix_passes_conformance_and_keeps_keys_under_it() {
    let moto = Moto::start();
    moto.create_bucket("prefixed");
    let store = open_store("s3", &s3_spec(&moto, "prefixed", "site/a")).unwrap();
    let bucket_root = open_store("root", &s3_spec(&moto, "prefixed", "")).unwrap();
    bucket_root
        .put("outside", Bytes::from_static(b"x"))
        .await
        .unwrap();

    conformance::read_write(&*store).await;

    let everything = bucket_root.list("").await.unwrap();
    assert!(
        everything.contains(&"site/a/small.txt".to_string()),
        "{everything:?}"
    );
    assert!(everything
        .iter()
        .all(|k| k.starts_with("site/a/") || k == "outside"));
    assert!(!store
        .list("")
        .await
        .unwrap()
        .contains(&"outside".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_object_url_opens_store_and_key() {
    let moto = Moto::start();
    moto.create_bucket("raw");
    let writer = open_store("w", &s3_spec(&moto, "raw", "base")).unwrap();
    writer
        .put("disk.raw", Bytes::from(vec![7u8; 5000]))
        .await
        .unwrap();
    let mut object = parse_object_url("s3://raw/base/disk.raw").unwrap();
    if let StoreSpec::S3 {
        endpoint,
        access_key_id,
        secret_access_key,
        allow_http,
        ..
    } = &mut object.spec
    {
        *endpoint = Some(moto.endpoint());
        *access_key_id = Some("testing".into());
        *secret_access_key = Some("testing".into());
        *allow_http = true;
    }

    let store = open_store("raw", &object.spec).unwrap();

    assert_eq!(object.key, "disk.raw");
    assert_eq!(store.head(&object.key).await.unwrap(), Some(5000));
    assert_eq!(
        &store.get_range(&object.key, 4990..5000).await.unwrap()[..],
        &[7u8; 10]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_missing_bucket_is_not_transient() {
    let moto = Moto::start();
    let store = open_store("s3", &s3_spec(&moto, "no-such-bucket", "")).unwrap();

    let err = store.get("k").await.unwrap_err();
    let put = store.put("k", Bytes::from_static(b"x")).await.unwrap_err();

    assert!(!err.kind().is_transient(), "{err:?}");
    assert!(!put.kind().is_transient(), "{put:?}");
}

#[tokio::test]
async fn http_store_passes_read_only_conformance() {
    let (_dir, server) = serve_fixtures(|_| {}).await;
    let store = open_store("web", &http_spec(&format!("{}/pub/", server.url()), "")).unwrap();

    conformance::read_only(&*store).await;
}

#[tokio::test]
async fn http_store_refuses_writes() {
    let (_dir, server) = serve_fixtures(|_| {}).await;
    let store = open_store("web", &http_spec(&format!("{}/pub", server.url()), "")).unwrap();
    let before = server.requests();

    let put = store.put("x", Bytes::new()).await.unwrap_err();
    let list = store.list("").await.unwrap_err();
    let delete = store.delete("small.txt").await.unwrap_err();

    for err in [put, list, delete] {
        assert!(matches!(err, StoreError::Unsupported { .. }), "{err:?}");
        assert!(
            err.to_string().contains("not supported by store http:"),
            "{err}"
        );
    }
    assert_eq!(server.requests(), before, "no request was sent");
}

#[tokio::test]
async fn http_object_url_reads_size_and_ranges() {
    let (_dir, server) = serve_fixtures(|_| {}).await;
    let url = format!("{}/pub/images/disk.raw", server.url());
    let data = conformance::fixtures().remove(2).1;

    let object = parse_object_url(&url).unwrap();
    let store = open_store(&url, &object.spec).unwrap();

    assert_eq!(object.key, "disk.raw");
    assert_eq!(
        store.head(&object.key).await.unwrap(),
        Some(data.len() as u64)
    );
    assert_eq!(
        store.get_range(&object.key, 10..20).await.unwrap()[..],
        data[10..20]
    );
}

#[tokio::test]
async fn http_5xx_is_retried_by_the_policy_layer() {
    let (_dir, server) = serve_fixtures(|_| {}).await;
    let backend = Arc::new(
        RemoteStore::http(
            "web",
            &format!("{}/pub", server.url()),
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let policy = RetryPolicy {
        base_backoff: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    let store = RetryStore::new(backend, policy);
    server.fail_next(2, 503);

    let data = store.get_range("small.txt", 0..5).await.unwrap();

    assert_eq!(&data[..], b"hello");
    assert_eq!(server.requests(), 3);
    assert_eq!((store.stats().requests, store.stats().retries), (3, 2));
}

#[tokio::test]
async fn http_error_statuses_are_classified() {
    let (_dir, server) = serve_fixtures(|_| {}).await;
    let store = RemoteStore::http(
        "web",
        &format!("{}/pub", server.url()),
        Duration::from_secs(5),
    )
    .unwrap();

    let mut kinds = Vec::new();
    for status in [503, 500, 429, 403, 400] {
        server.fail_next(1, status);
        kinds.push(store.get_range("small.txt", 0..5).await.unwrap_err().kind());
    }

    use ErrorKind::*;
    assert_eq!(
        kinds,
        [Unavailable, Unavailable, Unavailable, PermissionDenied, Io]
    );
}

#[tokio::test]
async fn http_connection_refused_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RemoteStore::http(
        "down",
        &format!("http://127.0.0.1:{port}/"),
        Duration::from_secs(2),
    )
    .unwrap();

    let err = store.get("k").await.unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
}

#[tokio::test]
async fn slow_http_server_times_out_within_the_deadline() {
    let (_dir, server) = serve_fixtures(|c| c.latency = Duration::from_secs(5)).await;
    let spec = http_spec(
        &format!("{}/pub", server.url()),
        "timeout = \"200ms\"\ndeadline = \"700ms\"\nretries = 10\n",
    );
    let store = open_store("slow", &spec).unwrap();

    let start = Instant::now();
    let err = store.get_range("small.txt", 0..1).await.unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn range_server_caps_bandwidth() {
    // 2 Mbit/s = 250 kB/s: 100 kB take about 0.4 s.
    let (_dir, server) = serve_fixtures(|c| c.rate = Some(250_000)).await;
    let store = RemoteStore::http(
        "capped",
        &format!("{}/pub", server.url()),
        Duration::from_secs(10),
    )
    .unwrap();

    let start = Instant::now();
    let data = store
        .get_range("images/disk.raw", 0..100_000)
        .await
        .unwrap();
    let took = start.elapsed();

    assert_eq!(data.len(), 100_000);
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn s3_config_without_bucket_fails_before_any_request() {
    let err = RemoteStore::s3("x", &S3Config::default(), Duration::from_secs(1)).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}
