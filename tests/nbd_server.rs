//! The NBD server driven in-process over real unix sockets, by a small test client that
//! speaks the wire format itself (independently of `proto.rs`'s encoders where it matters).

use std::sync::Arc;
use std::time::Duration;

use imgcache::device::mem::MemDevice;
use imgcache::export::nbd::proto::*;
use imgcache::export::nbd::NbdServer;
use imgcache::export::{Export, ExportListing, ExportRegistry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

const SIZE: usize = 1 << 20;

struct TestRegistry(Vec<Export>);

impl ExportRegistry for TestRegistry {
    fn list(&self) -> Vec<ExportListing> {
        self.0
            .iter()
            .map(|e| ExportListing {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }
    fn open(&self, name: &str) -> Option<Export> {
        self.0.iter().find(|e| e.name == name).cloned()
    }
}

/// Byte `i` of the test pattern.
fn pattern(i: usize) -> u8 {
    (i * 7 + i / 4096) as u8
}

/// A 1 MiB device: holes at 64K..128K and 512K..576K, remote (slow path) at 256K..384K.
fn test_device() -> MemDevice {
    let data: Vec<u8> = (0..SIZE).map(pattern).collect();
    MemDevice::new(data)
        .with_holes([65536..131072, 524288..589824])
        .with_remote(262144..393216)
}

/// What the test device holds at `offset .. offset+len`.
fn expected(offset: usize, len: usize) -> Vec<u8> {
    let in_hole = |i: usize| (65536..131072).contains(&i) || (524288..589824).contains(&i);
    (offset..offset + len)
        .map(|i| if in_hole(i) { 0 } else { pattern(i) })
        .collect()
}

fn registry_with(dev: MemDevice) -> Arc<TestRegistry> {
    Arc::new(TestRegistry(vec![
        Export {
            name: "disk".into(),
            description: "a test disk".into(),
            device: Arc::new(dev),
        },
        Export {
            name: "other".into(),
            description: String::new(),
            device: Arc::new(MemDevice::new(vec![1u8; 4096])),
        },
    ]))
}

/// A server connection over a socket pair; keeps the shutdown sender alive.
struct Harness {
    client: Client,
    _tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), imgcache::export::nbd::NbdError>>,
}

fn start_with(dev: MemDevice) -> Harness {
    let (a, b) = UnixStream::pair().unwrap();
    let server = NbdServer::new(registry_with(dev));
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let (rd, wr) = b.into_split();
        server.serve_connection(rd, wr, rx).await
    });
    Harness {
        client: Client { s: a },
        _tx: tx,
        task,
    }
}

async fn start() -> Client {
    let mut h = start_with(test_device());
    h.client.greet().await;
    // Leak the harness parts so the server outlives this helper.
    std::mem::forget(h._tx);
    drop(h.task);
    h.client
}

struct Client {
    s: UnixStream,
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    async fn greet(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(g[16..18], [0, 3]);
        self.s.write_all(&3u32.to_be_bytes()).await.unwrap();
    }

    async fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).await.unwrap();
    }

    /// One option reply: (option, reply type, data).
    async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(be64(&h[0..8]), 0x3e889045565a9);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (be32(&h[8..12]), be32(&h[12..16]), d)
    }

    /// Replies up to and including the final one (ACK or an error).
    async fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (_, t, d) = self.reply().await;
            let last = t == REP_ACK || t & (1 << 31) != 0;
            out.push((t, d));
            if last {
                return out;
            }
        }
    }

    async fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.reply().await.1, REP_ACK);
    }

    async fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.opt(OPT_SET_META_CONTEXT, &meta_payload(name, queries))
            .await;
        let r = self.replies().await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        r[..r.len() - 1]
            .iter()
            .map(|(t, d)| {
                assert_eq!(*t, REP_META_CONTEXT);
                (be32(d), String::from_utf8(d[4..].to_vec()).unwrap())
            })
            .collect()
    }

    /// GO; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        self.opt(OPT_GO, &go_payload(name)).await;
        let mut export = None;
        for (t, d) in self.replies().await {
            assert!(t == REP_INFO || t == REP_ACK, "reply {t:#x}");
            if t == REP_INFO && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                export = Some((be64(&d[2..10]), u16::from_be_bytes([d[10], d[11]])));
            }
        }
        export.expect("NBD_INFO_EXPORT")
    }

    async fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.s
            .write_all(&req_bytes(cmd, flags, cookie, offset, len))
            .await
            .unwrap();
    }

    /// A simple reply: (error, cookie), then `data_len` bytes if no error.
    async fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
        let err = be32(&h[4..8]);
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).await.unwrap();
        (err, be64(&h[8..16]), d)
    }

    async fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        let mut payload = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut payload).await.unwrap();
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: be64(&h[8..16]),
            payload,
        }
    }

    /// Chunks of one reply up to the DONE one (assumes one request outstanding).
    async fn chunks(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk().await;
            let done = c.flags & REPLY_FLAG_DONE != 0;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// Whether the server closed the connection (EOF within a second).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn req_bytes(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x25609513u32.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Reassemble a structured READ reply; returns the bytes and how many hole chunks it had.
fn assemble(chunks: &[Chunk], offset: u64, len: usize) -> (Vec<u8>, usize) {
    let mut buf = vec![0xAAu8; len];
    let mut covered = 0usize;
    let mut holes = 0;
    for c in chunks {
        match c.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = (be64(&c.payload) - offset) as usize;
                let d = &c.payload[8..];
                buf[at..at + d.len()].copy_from_slice(d);
                covered += d.len();
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = (be64(&c.payload) - offset) as usize;
                let n = be32(&c.payload[8..]) as usize;
                buf[at..at + n].fill(0);
                covered += n;
                holes += 1;
            }
            k => panic!("unexpected chunk type {k}"),
        }
    }
    assert_eq!(covered, len, "chunks must cover the request exactly");
    (buf, holes)
}

// ---- Handshake ----------------------------------------------------------------------------

#[tokio::test]
async fn go_reports_size_and_read_only_flags() {
    let mut c = start().await;
    let (size, flags) = c.go("disk").await;
    assert_eq!(size, SIZE as u64);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & TFLAG_SEND_CACHE, 0);
    assert_eq!(
        flags & (TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES),
        0
    );
}

#[tokio::test]
async fn info_sends_name_description_and_block_size_then_continues() {
    let mut c = start().await;
    let mut d = go_payload("disk");
    d.truncate(d.len() - 2);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    c.opt(OPT_INFO, &d).await;
    let replies = c.replies().await;
    let kinds: Vec<u16> = replies
        .iter()
        .filter(|(t, _)| *t == REP_INFO)
        .map(|(_, d)| u16::from_be_bytes([d[0], d[1]]))
        .collect();
    for k in [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        assert!(kinds.contains(&k), "missing info {k}");
    }
    let bs = &replies
        .iter()
        .find(|(t, d)| *t == REP_INFO && d[1] == INFO_BLOCK_SIZE as u8)
        .unwrap()
        .1;
    assert_eq!(
        (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
        (1, 4096, 32 << 20)
    );
    // Still in the handshake: GO works afterwards.
    assert_eq!(c.go("disk").await.0, SIZE as u64);
}

#[tokio::test]
async fn list_returns_every_export() {
    let mut c = start().await;
    c.opt(OPT_LIST, &[]).await;
    let r = c.replies().await;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(be32(&r[0].1), 4);
    assert_eq!(&r[0].1[4..], b"diska test disk");
    assert_eq!(&r[1].1[4..], b"other");
    assert_eq!(r[2].0, REP_ACK);
}

#[tokio::test]
async fn unknown_option_gets_unsup_and_handshake_continues() {
    let mut c = start().await;
    c.opt(0x1234, b"whatever").await;
    assert_eq!(c.reply().await.1, REP_ERR_UNSUP);
    c.opt(OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(c.reply().await.1, REP_ERR_UNSUP);
    c.opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.reply().await.1, REP_ERR_POLICY);
    assert_eq!(c.go("disk").await.0, SIZE as u64);
}

#[tokio::test]
async fn go_for_unknown_export_gets_err_unknown() {
    let mut c = start().await;
    c.opt(OPT_GO, &go_payload("nope")).await;
    assert_eq!(c.reply().await.1, REP_ERR_UNKNOWN);
    assert_eq!(c.go("other").await.0, 4096);
}

#[tokio::test]
async fn malformed_go_gets_err_invalid_and_handshake_continues() {
    let mut c = start().await;
    c.opt(OPT_GO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(c.reply().await.1, REP_ERR_INVALID);
    c.opt(OPT_LIST, b"junk").await;
    assert_eq!(c.reply().await.1, REP_ERR_INVALID);
    assert_eq!(c.go("disk").await.0, SIZE as u64);
}

#[tokio::test]
async fn export_name_for_unknown_export_closes() {
    let mut c = start().await;
    c.opt(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn export_name_replies_size_and_flags_without_zeroes() {
    let mut c = start().await;
    c.opt(OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(be64(&b), SIZE as u64);
    c.request(0, 0, 1, 0, 16).await;
    let (err, cookie, data) = c.simple(16).await;
    assert_eq!((err, cookie), (0, 1));
    assert_eq!(data, expected(0, 16));
}

#[tokio::test]
async fn abort_acks_and_closes() {
    let mut c = start().await;
    c.opt(OPT_ABORT, &[]).await;
    assert_eq!(c.reply().await.1, REP_ACK);
    assert!(c.closed().await);
}

#[tokio::test]
async fn client_without_fixed_newstyle_is_closed() {
    let mut h = start_with(test_device());
    let mut g = [0u8; 18];
    h.client.s.read_exact(&mut g).await.unwrap();
    h.client.s.write_all(&0u32.to_be_bytes()).await.unwrap();
    assert!(h.client.closed().await);
    assert!(h.task.await.unwrap().is_err());
}

#[tokio::test]
async fn oversized_option_closes() {
    let mut c = start().await;
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.s.write_all(&v).await.unwrap();
    assert!(c.closed().await);
}

#[tokio::test]
async fn meta_context_needs_structured_replies() {
    let mut c = start().await;
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("disk", &["base:allocation"]),
    )
    .await;
    assert_eq!(c.reply().await.1, REP_ERR_INVALID);
}

#[tokio::test]
async fn list_meta_context_lists_all_or_by_namespace() {
    let mut c = start().await;
    c.structured().await;
    c.opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[]))
        .await;
    let names: Vec<String> = c
        .replies()
        .await
        .iter()
        .filter(|(t, _)| *t == REP_META_CONTEXT)
        .map(|(_, d)| String::from_utf8(d[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, ["base:allocation", "imgcache:residency"]);

    c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("disk", &["imgcache:", "x-unknown:thing"]),
    )
    .await;
    let r = c.replies().await;
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"imgcache:residency");

    c.opt(OPT_LIST_META_CONTEXT, &meta_payload("nope", &[]))
        .await;
    assert_eq!(c.reply().await.1, REP_ERR_UNKNOWN);
}

#[tokio::test]
async fn set_meta_context_omits_unknown_contexts() {
    let mut c = start().await;
    c.structured().await;
    let got = c
        .set_meta("disk", &["qemu:dirty-bitmap:a", "base:allocation"])
        .await;
    assert_eq!(got, vec![(1, "base:allocation".to_string())]);
}

// ---- Transmission -------------------------------------------------------------------------

#[tokio::test]
async fn read_simple_returns_the_data() {
    let mut c = start().await;
    c.go("disk").await;
    // Spans data, a hole and data again; simple replies carry the zeros.
    c.request(0, 0, 42, 60000, 80000).await;
    let (err, cookie, data) = c.simple(80000).await;
    assert_eq!((err, cookie), (0, 42));
    assert_eq!(data, expected(60000, 80000));
}

#[tokio::test]
async fn read_structured_sends_holes_as_hole_chunks() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    c.request(0, 0, 7, 60000, 80000).await;
    let chunks = c.chunks().await;
    assert!(chunks.iter().all(|ch| ch.cookie == 7));
    let (data, holes) = assemble(&chunks, 60000, 80000);
    assert_eq!(holes, 1);
    assert_eq!(chunks.len(), 3);
    assert_eq!(data, expected(60000, 80000));
}

#[tokio::test]
async fn read_structured_with_df_sends_one_data_chunk() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    c.request(0, CMD_FLAG_DF, 7, 60000, 80000).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(assemble(&chunks, 60000, 80000).0, expected(60000, 80000));
}

#[tokio::test]
async fn read_of_remote_range_goes_through_the_slow_path() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    // 256K..384K is remote: try_read_nowait refuses, the async read serves it.
    c.request(0, 0, 9, 250000, 200000).await;
    let chunks = c.chunks().await;
    assert_eq!(
        assemble(&chunks, 250000, 200000).0,
        expected(250000, 200000)
    );
}

#[tokio::test]
async fn read_past_end_returns_einval() {
    let mut c = start().await;
    c.go("disk").await;
    c.request(0, 0, 1, SIZE as u64 - 10, 11).await;
    assert_eq!(c.simple(11).await.0, EINVAL);
    c.request(0, 0, 2, 0, 0).await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    c.request(99, 0, 3, 0, 1).await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    // The connection survives.
    c.request(0, 0, 4, 0, 4).await;
    assert_eq!(c.simple(4).await.0, 0);
}

#[tokio::test]
async fn structured_read_error_is_an_error_chunk() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    c.request(0, 0, 5, SIZE as u64, 1).await;
    let ch = c.chunk().await;
    assert_eq!(ch.kind, REPLY_TYPE_ERROR);
    assert_ne!(ch.flags & REPLY_FLAG_DONE, 0);
    assert_eq!(be32(&ch.payload), EINVAL);
}

#[tokio::test]
async fn write_to_read_only_export_returns_eperm() {
    let mut c = start().await;
    c.go("disk").await;
    let mut v = req_bytes(1, 0, 11, 0, 5);
    v.extend_from_slice(b"hello");
    c.s.write_all(&v).await.unwrap();
    assert_eq!(c.simple(0).await, (EPERM, 11, vec![]));
    for (cmd, cookie) in [(3u16, 12u64), (4, 13), (6, 14)] {
        c.request(cmd, 0, cookie, 0, 5).await;
        assert_eq!(c.simple(0).await, (EPERM, cookie, vec![]));
    }
    // The payload was consumed: the next request parses.
    c.request(0, 0, 15, 0, 5).await;
    assert_eq!(c.simple(5).await.1, 15);
}

#[tokio::test]
async fn block_status_reports_both_contexts() {
    let mut c = start().await;
    c.structured().await;
    let ids = c
        .set_meta("disk", &["base:allocation", "imgcache:residency"])
        .await;
    assert_eq!(ids.len(), 2);
    c.go("disk").await;
    c.request(7, 0, 3, 0, SIZE as u32).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 2);
    let mut by_id = std::collections::HashMap::new();
    for ch in &chunks {
        assert_eq!(ch.kind, REPLY_TYPE_BLOCK_STATUS);
        let descs: Vec<(u32, u32)> = ch.payload[4..]
            .chunks(8)
            .map(|d| (be32(d), be32(&d[4..])))
            .collect();
        by_id.insert(be32(&ch.payload), descs);
    }
    let alloc = &by_id[&1];
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        alloc,
        &vec![
            (65536, 0),
            (65536, hz),
            (393216, 0),
            (65536, hz),
            (458752, 0)
        ]
    );
    let res = &by_id[&2];
    assert_eq!(res, &vec![(262144, 0), (131072, 1), (655360, 0)]);
}

#[tokio::test]
async fn block_status_req_one_sends_one_extent_per_context() {
    let mut c = start().await;
    c.structured().await;
    c.set_meta("disk", &["base:allocation", "imgcache:residency"])
        .await;
    c.go("disk").await;
    c.request(7, CMD_FLAG_REQ_ONE, 3, 100000, 500000).await;
    for ch in c.chunks().await {
        assert_eq!(ch.payload.len(), 12);
        assert!(be32(&ch.payload[4..]) <= 500000);
    }
}

#[tokio::test]
async fn block_status_without_meta_context_returns_einval() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    c.request(7, 0, 3, 0, 4096).await;
    assert_eq!(c.simple(0).await.0, EINVAL);
}

#[tokio::test]
async fn cache_succeeds() {
    let mut c = start().await;
    c.go("disk").await;
    c.request(5, 0, 8, 0, 4096).await;
    assert_eq!(c.simple(0).await, (0, 8, vec![]));
}

#[tokio::test]
async fn many_in_flight_requests_all_get_answers() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    const N: u64 = 500;
    let mut batch = Vec::new();
    for i in 0..N {
        // Every fourth read touches the remote range, so replies come out of order.
        let off = if i % 4 == 0 {
            300_000 + i * 8
        } else {
            i * 1000
        };
        batch.extend_from_slice(&req_bytes(0, CMD_FLAG_DF, i, off, 4096));
    }
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&batch).await.unwrap();
        wr
    });
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let mut h = [0u8; 20];
        rd.read_exact(&mut h).await.unwrap();
        let cookie = be64(&h[8..16]);
        let mut p = vec![0u8; be32(&h[16..20]) as usize];
        rd.read_exact(&mut p).await.unwrap();
        let off = be64(&p) as usize;
        assert_eq!(p[8..], expected(off, 4096)[..]);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    assert!(seen.iter().all(|s| *s));
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn disc_finishes_in_flight_replies_then_closes() {
    let mut c = start().await;
    c.go("disk").await;
    let mut v = Vec::new();
    v.extend_from_slice(&req_bytes(0, 0, 1, 300_000, 512)); // slow path
    v.extend_from_slice(&req_bytes(0, 0, 2, 0, 512));
    v.extend_from_slice(&req_bytes(2, 0, 3, 0, 0));
    v.extend_from_slice(&req_bytes(0, 0, 4, 0, 512)); // after DISC: ignored
    c.s.write_all(&v).await.unwrap();
    let mut cookies = vec![c.simple(512).await.1, c.simple(512).await.1];
    cookies.sort();
    assert_eq!(cookies, [1, 2]);
    assert!(c.closed().await);
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let mut c = start().await;
    c.go("disk").await;
    c.s.write_all(&[0x55u8; 28]).await.unwrap();
    assert!(c.closed().await);
}

#[tokio::test]
async fn write_payload_over_limit_closes() {
    let mut c = start().await;
    c.go("disk").await;
    c.request(1, 0, 1, 0, (32 << 20) + 1).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn writable_device_accepts_writes_and_advertises_them() {
    let mut h = start_with(MemDevice::new(vec![0u8; 65536]).with_writes());
    h.client.greet().await;
    let c = &mut h.client;
    c.structured().await;
    c.set_meta("disk", &["base:allocation"]).await;
    let (_, flags) = c.go("disk").await;
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0);
    for f in [
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(flags & f, 0);
    }
    let mut v = req_bytes(1, CMD_FLAG_FUA, 1, 100, 5);
    v.extend_from_slice(b"hello");
    c.s.write_all(&v).await.unwrap();
    assert_eq!(c.simple(0).await, (0, 1, vec![]));
    c.request(3, 0, 2, 0, 0).await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(0, CMD_FLAG_DF, 3, 98, 9).await;
    let ch = c.chunks().await;
    assert_eq!(&ch[0].payload[8..], b"\0\0hello\0\0");
    // Trim punches a hole that block status reports.
    c.request(4, 0, 4, 32768, 32768).await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(7, 0, 5, 0, 65536).await;
    let ch = c.chunks().await;
    let last = &ch[0].payload[ch[0].payload.len() - 8..];
    assert_eq!(
        (be32(last), be32(&last[4..])),
        (32768, STATE_HOLE | STATE_ZERO)
    );
    c.request(1, 0, 6, 65535, 0).await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    c.request(6, 0, 6, 65000, 1000).await;
    assert_eq!(c.simple(0).await.0, ENOSPC);
}

#[tokio::test]
async fn large_writes_trickled_in_pieces_land_and_bad_ones_keep_the_stream_in_step() {
    let size = 4 << 20;
    let mut h = start_with(MemDevice::new(vec![0u8; size]).with_writes());
    h.client.greet().await;
    let c = &mut h.client;
    c.go("disk").await;
    // Two 1 MiB writes back to back, each sent in uneven pieces with pauses, so the
    // server sees the payload arrive over many reads.
    let data: Vec<u8> = (0..2 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut wire = req_bytes(1, 0, 1, 4096, 1 << 20);
    wire.extend_from_slice(&data[..1 << 20]);
    wire.extend(req_bytes(1, CMD_FLAG_FUA, 2, (1 << 20) + 4096, 1 << 20));
    wire.extend_from_slice(&data[1 << 20..]);
    for piece in wire.chunks(100_003) {
        c.s.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut cookies = vec![c.simple(0).await, c.simple(0).await];
    cookies.sort_by_key(|r| r.1);
    assert_eq!(cookies, vec![(0, 1, vec![]), (0, 2, vec![])]);
    // A large write past the end: ENOSPC, its payload consumed, the next request parses.
    let mut v = req_bytes(1, 0, 3, size as u64 - 4096, 256 << 10);
    v.extend(vec![9u8; 256 << 10]);
    c.s.write_all(&v).await.unwrap();
    assert_eq!(c.simple(0).await, (ENOSPC, 3, vec![]));
    c.request(0, 0, 4, 4096, 2 << 20).await;
    let (err, cookie, got) = c.simple(2 << 20).await;
    assert_eq!((err, cookie), (0, 4));
    assert!(got == data, "read back differs from what was written");
}

#[tokio::test]
async fn large_write_to_read_only_export_returns_eperm_and_stream_stays_in_step() {
    let mut c = start().await;
    c.go("disk").await;
    let mut v = req_bytes(1, 0, 21, 0, 512 << 10);
    v.extend(vec![1u8; 512 << 10]);
    c.s.write_all(&v).await.unwrap();
    assert_eq!(c.simple(0).await, (EPERM, 21, vec![]));
    c.request(0, 0, 22, 0, 5).await;
    assert_eq!(c.simple(5).await.1, 22);
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = watch::channel(false);
    let server = NbdServer::new(registry_with(test_device()));
    let run = tokio::spawn(server.run_unix(listener, rx));
    let mut c = Client {
        s: UnixStream::connect(&path).await.unwrap(),
    };
    c.greet().await;
    c.go("disk").await;
    tx.send(true).unwrap();
    assert!(c.closed().await);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run_unix returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(path.exists(), "the socket path belongs to the caller");
}

#[tokio::test]
async fn garbage_client_does_not_affect_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = watch::channel(false);
    let server = NbdServer::new(registry_with(test_device()));
    let run = tokio::spawn(server.run_unix(listener, rx));

    let mut good = Client {
        s: UnixStream::connect(&path).await.unwrap(),
    };
    good.greet().await;
    good.go("disk").await;

    let mut bad = Client {
        s: UnixStream::connect(&path).await.unwrap(),
    };
    let mut g = [0u8; 18];
    bad.s.read_exact(&mut g).await.unwrap();
    bad.s.write_all(&[0xffu8; 64]).await.unwrap();
    assert!(bad.closed().await);

    good.request(0, 0, 1, 4096, 4096).await;
    assert_eq!(good.simple(4096).await.2, expected(4096, 4096));
    tx.send(true).unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn large_structured_read_comes_in_pieces_and_survives_the_slow_path() {
    let mut c = start().await;
    c.structured().await;
    c.go("disk").await;
    // The whole device: data pieces, two holes, and a remote range that makes a piece in
    // the middle fall back to the async path after earlier pieces were produced inline.
    c.request(0, 0, 77, 0, SIZE as u32).await;
    let chunks = c.chunks().await;
    assert!(chunks.iter().all(|ch| ch.cookie == 77));
    assert!(chunks
        .iter()
        .all(|ch| ch.kind != REPLY_TYPE_OFFSET_DATA || ch.payload.len() - 8 <= 256 * 1024));
    let (data, holes) = assemble(&chunks, 0, SIZE);
    assert_eq!(holes, 2);
    assert!(data == expected(0, SIZE));
}

#[tokio::test]
async fn large_simple_read_is_one_reply() {
    let mut c = start().await;
    c.go("disk").await;
    c.request(0, 0, 78, 0, SIZE as u32).await;
    let (err, cookie, data) = c.simple(SIZE).await;
    assert_eq!((err, cookie), (0, 78));
    assert!(data == expected(0, SIZE));
}

#[tokio::test]
async fn tcp_listener_serves_reads() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let run = tokio::spawn(NbdServer::new(registry_with(test_device())).run_tcp(listener, rx));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    v.extend_from_slice(&4u32.to_be_bytes());
    v.extend_from_slice(b"disk");
    v.extend_from_slice(&req_bytes(0, 0, 5, 8192, 100));
    s.write_all(&v).await.unwrap();
    let mut r = vec![0u8; 10 + 16 + 100];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(be64(&r), SIZE as u64);
    assert_eq!(be32(&r[14..]), 0);
    assert_eq!(r[26..], expected(8192, 100)[..]);
    tx.send(true).unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn busy_polling_server_serves_ping_pong_and_pipelined_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = watch::channel(false);
    let server = NbdServer::with_busy_poll(registry_with(test_device()), Duration::from_micros(50));
    let run = tokio::spawn(server.run_unix(listener, rx));
    let mut c = Client {
        s: UnixStream::connect(&path).await.unwrap(),
    };
    c.greet().await;
    c.go("disk").await;
    for i in 0..200u64 {
        let off = (i * 4099) % (SIZE as u64 - 512);
        c.request(0, 0, i, off, 512).await;
        let (err, cookie, data) = c.simple(512).await;
        assert_eq!((err, cookie), (0, i));
        assert_eq!(data, expected(off as usize, 512));
    }
    let mut v = Vec::new();
    for i in 0..64u64 {
        v.extend_from_slice(&req_bytes(0, 0, i, i * 512, 512));
    }
    c.s.write_all(&v).await.unwrap();
    let mut seen = 0u64;
    for _ in 0..64 {
        let (err, cookie, data) = c.simple(512).await;
        assert_eq!(err, 0);
        assert_eq!(data, expected(cookie as usize * 512, 512));
        seen |= 1 << cookie;
    }
    assert_eq!(seen, u64::MAX);
    tx.send(true).unwrap();
    run.await.unwrap().unwrap();
}

// ---- Zero-copy reads (devices with try_read_mapped) ---------------------------------------

async fn start_mapped() -> Client {
    let mut h = start_with(test_device().with_mapped());
    h.client.greet().await;
    std::mem::forget(h._tx);
    drop(h.task);
    h.client
}

/// Reads spanning data pieces long and short, holes, and the remote (slow path) range.
const MAPPED_READS: [(u64, u32); 6] = [
    (0, 4096),
    (60000, 80000),
    (400_000, 300_000),
    (500_000, 100_000),
    (250_000, 200_000),
    (SIZE as u64 - 4096, 4096),
];

#[tokio::test]
async fn mapped_read_simple_returns_the_data() {
    let mut c = start_mapped().await;
    c.go("disk").await;
    for (i, (off, len)) in MAPPED_READS.into_iter().enumerate() {
        c.request(0, 0, i as u64, off, len).await;
        let (err, cookie, data) = c.simple(len as usize).await;
        assert_eq!((err, cookie), (0, i as u64));
        assert_eq!(
            data,
            expected(off as usize, len as usize),
            "read {off}+{len}"
        );
    }
}

#[tokio::test]
async fn mapped_read_structured_sends_holes_as_hole_chunks() {
    let mut c = start_mapped().await;
    c.structured().await;
    c.go("disk").await;
    for (i, (off, len)) in MAPPED_READS.into_iter().enumerate() {
        c.request(0, 0, i as u64, off, len).await;
        let chunks = c.chunks().await;
        assert!(chunks.iter().all(|ch| ch.cookie == i as u64));
        let (data, _) = assemble(&chunks, off, len as usize);
        assert_eq!(
            data,
            expected(off as usize, len as usize),
            "read {off}+{len}"
        );
    }
    // 60000+80000 is data, hole, data: three chunks, like the copying path.
    c.request(0, 0, 7, 60000, 80000).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 3);
    assert_eq!(assemble(&chunks, 60000, 80000).1, 1);
}

#[tokio::test]
async fn mapped_read_structured_with_df_sends_one_data_chunk() {
    let mut c = start_mapped().await;
    c.structured().await;
    c.go("disk").await;
    c.request(0, CMD_FLAG_DF, 7, 400_000, 300_000).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(
        assemble(&chunks, 400_000, 300_000).0,
        expected(400_000, 300_000)
    );
}

#[tokio::test]
async fn mapped_read_past_end_returns_einval() {
    let mut c = start_mapped().await;
    c.structured().await;
    c.go("disk").await;
    c.request(0, 0, 5, SIZE as u64 - 10, 11).await;
    let ch = c.chunk().await;
    assert_eq!(ch.kind, REPLY_TYPE_ERROR);
    assert_eq!(be32(&ch.payload), EINVAL);
}

#[tokio::test]
async fn mapped_large_pipelined_reads_to_a_slow_reader_arrive_intact() {
    let mut c = start_mapped().await;
    c.go("disk").await;
    const N: u64 = 200;
    let reqs: Vec<(u64, u32)> = (0..N)
        .map(|i| {
            (
                (i * 37_813) % (SIZE as u64 - 200_000),
                100_000 + (i as u32 % 7) * 13_000,
            )
        })
        .collect();
    let mut batch = Vec::new();
    for (i, (off, len)) in reqs.iter().enumerate() {
        batch.extend_from_slice(&req_bytes(0, 0, i as u64, *off, *len));
    }
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&batch).await.unwrap();
        wr
    });
    let mut seen = vec![false; N as usize];
    for n in 0..N {
        if n % 20 == 0 {
            // Let the socket fill up, so the server's writes come out partial.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await.unwrap();
        assert_eq!(be32(&h[4..8]), 0);
        let cookie = be64(&h[8..16]);
        let (off, len) = reqs[cookie as usize];
        let mut p = vec![0u8; len as usize];
        rd.read_exact(&mut p).await.unwrap();
        assert!(p == expected(off as usize, len as usize), "cookie {cookie}");
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    assert!(seen.iter().all(|s| *s));
    drop(writer.await.unwrap());
}
