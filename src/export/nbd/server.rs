//! One NBD connection: handshake, then the transmission loop.
//!
//! A connection is one tokio task that owns both halves of the socket ([`Conn`]). Requests
//! are read through a large input buffer and handled as many at a time as are buffered;
//! a WRITE payload of [`BIG_WRITE`] bytes or more that is not all buffered yet is read
//! outside it, into the device's memory ([`Landing`]) or a buffer of its own ([`BigWrite`]).
//! A READ is first tried inline with [`BlockDevice::try_read_nowait`], straight into the
//! output buffer; only when that would block is the async [`BlockDevice::read`] queued in a
//! `FuturesUnordered` polled by the same task. Replies are appended to one output buffer and
//! written with as few `write` calls as possible, in completion order.
//!
//! Invariants: the output buffer only ever holds complete replies, so a reply that fails
//! half-way is rolled back by truncating to where it started; at most [`MAX_INFLIGHT`]
//! queued requests and [`MAX_INFLIGHT_BYTES`] of their buffers exist per connection, and
//! no new request is read while either limit or [`MAX_UNSENT`] is reached.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::proto::{self, ClientOption, Command, MetaContext, Negotiated, Request, Sink};
use super::NbdError;
use crate::device::{errno_of, BlockDevice, ExtentKind, Landing, MappedPiece, Residency};
use crate::export::{Export, ExportRegistry};

/// Most requests queued (waiting on the device) per connection.
pub const MAX_INFLIGHT: usize = 128;
/// Most bytes of buffers held by queued requests per connection.
pub const MAX_INFLIGHT_BYTES: usize = 128 * 1024 * 1024;
/// Most reply bytes waiting to be written before the server stops reading requests.
pub const MAX_UNSENT: usize = 64 * 1024 * 1024;
/// Reply bytes after which the server writes before handling more buffered requests.
const SOFT_UNSENT: usize = 256 * 1024;
/// Most extents asked from the device for one BLOCK_STATUS request.
pub const MAX_STATUS_EXTENTS: usize = 2048;
/// Spinning is only worth it after batches of replies up to this size.
const SPIN_MAX_BATCH: u64 = 256 * 1024;
/// Largest data chunk of a structured READ reply.
const PIECE: usize = 256 * 1024;
/// Most extents asked from the device to find holes in one READ.
const MAX_READ_EXTENTS: usize = 64;

/// Mapped data pieces at least this long are written straight from the device's memory
/// (`writev`); shorter ones are copied into the output buffer, which costs less than an
/// extra slice per reply.
const SHARE_MIN: usize = 16 * 1024;
/// Zeros for holes sent without copying.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

const INBUF_SIZE: usize = 256 * 1024;
/// A WRITE payload at least this long that is not buffered yet is read straight into a
/// buffer of its own and written on a blocking thread, so the connection goes on reading
/// the next requests while it is written (see [`BigWrite`]).
const BIG_WRITE: usize = 64 * 1024;
/// An idle connection keeps an output buffer up to this size for reuse.
const OUTBUF_KEEP: usize = 16 * 1024 * 1024;

/// Resolves when `shutdown` is (or becomes) true, or its sender is gone.
pub(super) async fn wait_shutdown(mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// The read side of a connection: a stream that can also read into several buffers with
/// one call (a large WRITE's payload lands in scattered device memory this way).
pub trait ReadStream: AsyncRead + Unpin + Send {
    /// Read into `bufs` in order; `Ok(0)` at end of stream. Cancel safe.
    fn read_vectored<'a>(
        &'a mut self,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, io::Result<usize>>;
}

macro_rules! read_stream_for_tokio_half {
    ($t:ty) => {
        impl ReadStream for $t {
            fn read_vectored<'a>(
                &'a mut self,
                bufs: &'a mut [IoSliceMut<'_>],
            ) -> BoxFuture<'a, io::Result<usize>> {
                Box::pin(async move {
                    loop {
                        self.readable().await?;
                        match self.try_read_vectored(bufs) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            r => return r,
                        }
                    }
                })
            }
        }
    };
}
read_stream_for_tokio_half!(tokio::net::unix::OwnedReadHalf);
read_stream_for_tokio_half!(tokio::net::tcp::OwnedReadHalf);

/// Serve one client on `rd`/`wr` until it disconnects, misbehaves or `shutdown` fires.
///
/// `spin`, when given, is the socket's fd and a duration: after answering a small batch,
/// the connection polls the fd that long before sleeping, which saves a sleep and wake-up
/// per batch for a client in a tight request loop. The fd must stay open while `rd` lives.
pub(super) async fn serve<R, W>(
    registry: &dyn ExportRegistry,
    rd: R,
    wr: W,
    shutdown: watch::Receiver<bool>,
    spin: Option<(RawFd, Duration)>,
) -> Result<(), NbdError>
where
    R: ReadStream,
    W: AsyncWrite + Unpin,
{
    let stop = wait_shutdown(shutdown);
    tokio::pin!(stop);
    let mut conn = Conn {
        rd,
        wr,
        inbuf: InBuf::new(),
        out: OutBuf::default(),
    };
    let session = tokio::select! {
        r = conn.handshake(registry) => r?,
        _ = &mut stop => return Ok(()),
    };
    let Some(session) = session else {
        return Ok(());
    };
    tracing::debug!(export = %session.export.name, "nbd: transmission phase");
    let mut t = Transmission::new(conn, session);
    t.spin = spin;
    t.spin_cur = spin.map_or(Duration::ZERO, |(_, d)| d);
    t.run(stop).await
}

// ---- Buffers ------------------------------------------------------------------------------

/// Bytes read from the client and not yet consumed: `buf[start..end]`.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            buf: vec![0; INBUF_SIZE],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 4 * INBUF_SIZE {
                // A large WRITE grew the buffer; give the memory back.
                self.buf = vec![0; INBUF_SIZE];
            }
        }
    }

    /// Make room for `need` contiguous bytes starting at `start`.
    fn reserve(&mut self, need: usize) {
        if self.buf.len() - self.start < need {
            self.compact();
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
        }
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Read whatever the socket has; `Ok(0)` at end of stream. Cancel safe.
    /// The buffer never grows here (only [`InBuf::reserve`] grows it), so a client cannot
    /// make it grow by sending requests faster than they are handled; callers check
    /// [`InBuf::has_room`] first.
    async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> io::Result<usize> {
        if self.buf.len() - self.end < 64 * 1024 && self.start > 0 {
            self.compact();
        }
        debug_assert!(self.has_room());
        let n = rd.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Whether unconsumed data leaves room to read more.
    fn has_room(&self) -> bool {
        self.end - self.start < self.buf.len()
    }

    /// Read until at least `n` bytes are buffered; `Ok(false)` at end of stream.
    async fn fill_to<R: AsyncRead + Unpin>(&mut self, rd: &mut R, n: usize) -> io::Result<bool> {
        self.reserve(n);
        while self.end - self.start < n {
            if self.fill(rd).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Replies waiting to be written: the bytes of `buf[sent..len]`, with the shared (zero-copy)
/// pieces of `shared` spliced in: `(pos, bytes)` goes out right after `buf[..pos]`.
/// `buf` stays initialised up to its length, so reads can land in it without zeroing it
/// first.
#[derive(Default)]
struct OutBuf {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    /// In order of `pos` (non-decreasing); never holds empty `Bytes`.
    shared: VecDeque<(usize, Bytes)>,
    /// Bytes of the front `shared` piece already written.
    shared_sent: usize,
    /// Unsent bytes, `buf`'s and `shared`'s.
    unsent: usize,
    /// Bytes written over the connection's life.
    total_sent: u64,
}

/// A position in an [`OutBuf`] to roll back to.
#[derive(Clone, Copy)]
struct Mark {
    len: usize,
    shared: usize,
    unsent: usize,
}

/// Most slices given to one `writev`.
const MAX_IOV: usize = 64;

impl OutBuf {
    /// Append `n` bytes (with stale contents) and return them to be filled.
    fn grab(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if end > self.buf.len() {
            let want = end.max(self.buf.len() * 2).max(64 * 1024);
            self.buf.resize(want, 0);
        }
        let start = self.len;
        self.len = end;
        self.unsent += n;
        &mut self.buf[start..end]
    }

    /// Append `bytes` without copying them; they are kept until written.
    fn put_shared(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.unsent += bytes.len();
        self.shared.push_back((self.len, bytes));
    }

    /// Where the next reply starts. Nothing may be written between taking a mark and
    /// truncating to it.
    fn mark(&self) -> Mark {
        Mark {
            len: self.len,
            shared: self.shared.len(),
            unsent: self.unsent,
        }
    }

    fn truncate(&mut self, mark: Mark) {
        debug_assert!(mark.len >= self.sent);
        self.len = mark.len;
        self.shared.truncate(mark.shared);
        self.unsent = mark.unsent;
    }

    /// Number of bytes waiting to be written.
    fn unsent(&self) -> usize {
        self.unsent
    }

    /// Fill `iov` with the next unsent slices, in order; returns how many.
    fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        let mut k = 0;
        let mut at = self.sent;
        for (i, (pos, bytes)) in self.shared.iter().enumerate() {
            if *pos > at {
                iov[k] = IoSlice::new(&self.buf[at..*pos]);
                at = *pos;
                k += 1;
                if k == MAX_IOV {
                    return k;
                }
            }
            let skip = if i == 0 { self.shared_sent } else { 0 };
            iov[k] = IoSlice::new(&bytes[skip..]);
            k += 1;
            if k == MAX_IOV {
                return k;
            }
        }
        if self.len > at {
            iov[k] = IoSlice::new(&self.buf[at..self.len]);
            k += 1;
        }
        k
    }

    /// Mark `n` more bytes as written.
    fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.unsent);
        self.total_sent += n as u64;
        self.unsent -= n;
        let mut n = n;
        while n > 0 {
            let until = self.shared.front().map_or(self.len, |(pos, _)| *pos);
            if until > self.sent {
                let k = n.min(until - self.sent);
                self.sent += k;
                n -= k;
                continue;
            }
            let Some((_, front)) = self.shared.front() else {
                break;
            };
            let k = n.min(front.len() - self.shared_sent);
            self.shared_sent += k;
            n -= k;
            if self.shared_sent == front.len() {
                self.shared.pop_front();
                self.shared_sent = 0;
            }
        }
        if self.unsent == 0 {
            self.sent = 0;
            self.len = 0;
            self.shared.clear();
            self.shared_sent = 0;
            if self.buf.len() > OUTBUF_KEEP {
                self.buf = Vec::new();
            }
        }
    }

    /// Write once (vectored when there are shared pieces); `Ok(0)` only when nothing was
    /// waiting. Cancel safe.
    async fn write_some<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> io::Result<usize> {
        let n = if self.shared.is_empty() {
            wr.write(&self.buf[self.sent..self.len]).await?
        } else {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let k = self.slices(&mut iov);
            wr.write_vectored(&iov[..k]).await?
        };
        if n == 0 && self.unsent > 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.advance(n);
        Ok(n)
    }

    /// Write what the socket takes right now, without waiting.
    fn write_now<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> io::Result<()> {
        if self.unsent == 0 {
            return Ok(());
        }
        match self.write_some(wr).now_or_never() {
            Some(r) => r.map(drop),
            None => Ok(()),
        }
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> io::Result<()> {
        while self.unsent > 0 {
            self.write_some(wr).await?;
        }
        wr.flush().await
    }
}

impl Sink for OutBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.grab(bytes.len()).copy_from_slice(bytes);
    }
}

// ---- Handshake ----------------------------------------------------------------------------

struct Conn<R, W> {
    rd: R,
    wr: W,
    inbuf: InBuf,
    out: OutBuf,
}

/// The result of a successful handshake.
struct Session {
    export: Export,
    structured: bool,
    contexts: Vec<MetaContext>,
}

/// Handshake state between options.
#[derive(Default)]
struct Haggle {
    no_zeroes: bool,
    structured: bool,
    /// Contexts selected by the last SET_META_CONTEXT, and for which export.
    contexts: Vec<MetaContext>,
    contexts_export: Option<String>,
}

impl Haggle {
    fn finish(self, export: Export) -> Session {
        let contexts = if self.contexts_export.as_deref() == Some(export.name.as_str()) {
            self.contexts
        } else {
            Vec::new()
        };
        Session {
            export,
            structured: self.structured,
            contexts,
        }
    }
}

/// The transmission flags for `device`.
pub(super) fn transmission_flags(device: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_CACHE;
    if structured {
        f |= proto::TFLAG_SEND_DF;
    }
    if device.writable().is_some() {
        f |= proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_FAST_ZERO;
        if device.flush_covers_all_connections() {
            f |= proto::TFLAG_CAN_MULTI_CONN;
        }
    } else {
        f |= proto::TFLAG_READ_ONLY | proto::TFLAG_CAN_MULTI_CONN;
    }
    f
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    async fn read_exact_buffered(&mut self, n: usize) -> Result<Option<&[u8]>, NbdError> {
        if !self.inbuf.fill_to(&mut self.rd, n).await? {
            return Ok(None);
        }
        let s = self.inbuf.start;
        self.inbuf.consume_keep(n);
        Ok(Some(&self.inbuf.buf[s..s + n]))
    }

    async fn send(&mut self) -> Result<(), NbdError> {
        self.out.flush(&mut self.wr).await?;
        Ok(())
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        let mut v = Vec::with_capacity(20 + data.len());
        proto::encode_option_reply(&mut v, option, reply, data);
        self.out.put(&v);
    }

    /// Run option haggling; `None` when the session ends without a transmission phase.
    async fn handshake(
        &mut self,
        registry: &dyn ExportRegistry,
    ) -> Result<Option<Session>, NbdError> {
        let mut v = Vec::new();
        proto::encode_greeting(&mut v);
        self.out.put(&v);
        self.send().await?;

        let Some(b) = self.read_exact_buffered(4).await? else {
            return Ok(None);
        };
        let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let client = proto::parse_client_flags(flags)?;
        let mut st = Haggle {
            no_zeroes: client.no_zeroes,
            ..Haggle::default()
        };

        loop {
            let Some(h) = self.read_exact_buffered(16).await? else {
                return Ok(None);
            };
            let mut hb = [0u8; 16];
            hb.copy_from_slice(h);
            let header = proto::parse_option_header(&hb)?;
            let Some(data) = self.read_exact_buffered(header.len as usize).await? else {
                return Ok(None);
            };
            let parsed = proto::parse_option(header.option, data);
            self.inbuf.settle();
            let opt = header.option;
            let option = match parsed {
                Ok(o) => o,
                Err(e) if opt == proto::OPT_EXPORT_NAME => return Err(e.into()),
                Err(e) => {
                    tracing::debug!(option = opt, error = %e, "nbd: malformed option");
                    self.reply(opt, proto::REP_ERR_INVALID, b"malformed option payload");
                    self.send().await?;
                    continue;
                }
            };
            match option {
                ClientOption::ExportName(name) => {
                    let Some(export) = registry.open(&name) else {
                        tracing::debug!(export = %name, "nbd: unknown export, closing");
                        return Ok(None);
                    };
                    let flags = transmission_flags(&*export.device, st.structured);
                    let mut v = Vec::new();
                    proto::encode_export_name_reply(
                        &mut v,
                        export.device.size(),
                        flags,
                        st.no_zeroes,
                    );
                    self.out.put(&v);
                    self.send().await?;
                    return Ok(Some(st.finish(export)));
                }
                ClientOption::Abort => {
                    self.reply(opt, proto::REP_ACK, &[]);
                    // The client may already be gone; that is fine.
                    let _ = self.send().await;
                    return Ok(None);
                }
                ClientOption::List => {
                    let mut v = Vec::new();
                    for e in registry.list() {
                        proto::encode_rep_server(&mut v, &e.name, &e.description);
                    }
                    self.out.put(&v);
                    self.reply(opt, proto::REP_ACK, &[]);
                }
                ClientOption::StartTls => {
                    self.reply(opt, proto::REP_ERR_POLICY, b"TLS is not supported");
                }
                ClientOption::Info { name, .. } | ClientOption::Go { name, .. } => {
                    let Some(export) = registry.open(&name) else {
                        self.reply(opt, proto::REP_ERR_UNKNOWN, b"no such export");
                        self.send().await?;
                        continue;
                    };
                    let info = proto::ExportInfo {
                        name: &export.name,
                        description: &export.description,
                        size: export.device.size(),
                        flags: transmission_flags(&*export.device, st.structured),
                    };
                    let mut v = Vec::new();
                    proto::encode_info_replies(&mut v, opt, &info);
                    proto::encode_option_reply(&mut v, opt, proto::REP_ACK, &[]);
                    self.out.put(&v);
                    self.send().await?;
                    if opt == proto::OPT_GO {
                        return Ok(Some(st.finish(export)));
                    }
                    continue;
                }
                ClientOption::StructuredReply => {
                    st.structured = true;
                    self.reply(opt, proto::REP_ACK, &[]);
                }
                ClientOption::ListMetaContext { name, queries }
                | ClientOption::SetMetaContext { name, queries } => {
                    let list = opt == proto::OPT_LIST_META_CONTEXT;
                    if !st.structured {
                        self.reply(opt, proto::REP_ERR_INVALID, b"structured replies first");
                    } else if registry.open(&name).is_none() {
                        self.reply(opt, proto::REP_ERR_UNKNOWN, b"no such export");
                    } else {
                        let selected = proto::select_contexts(&queries, list);
                        let mut v = Vec::new();
                        for ctx in &selected {
                            let id = if list { 0 } else { ctx.id() };
                            proto::encode_rep_meta_context(&mut v, opt, id, ctx.name());
                        }
                        proto::encode_option_reply(&mut v, opt, proto::REP_ACK, &[]);
                        self.out.put(&v);
                        if !list {
                            st.contexts = selected;
                            st.contexts_export = Some(name);
                        }
                    }
                }
                ClientOption::Unsupported(_) => {
                    self.reply(opt, proto::REP_ERR_UNSUP, &[]);
                }
            }
            self.send().await?;
        }
    }
}

impl InBuf {
    /// Consume `n` bytes but keep them in place until [`InBuf::settle`] (so a borrowed
    /// slice of them stays valid).
    fn consume_keep(&mut self, n: usize) {
        self.start += n;
    }

    /// Reset the buffer when everything has been consumed.
    fn settle(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

// ---- Transmission -------------------------------------------------------------------------

/// A contiguous part of a READ: data to send, or a hole.
#[derive(Debug, Clone, Copy)]
struct Seg {
    offset: u64,
    len: u32,
    hole: bool,
}

/// A queued request's result.
enum Done {
    Read {
        req: Request,
        segs: Vec<Seg>,
        buf: Vec<u8>,
        res: io::Result<()>,
    },
    /// Commands whose reply has no payload (a simple reply).
    Plain {
        cookie: u64,
        buf: Vec<u8>,
        res: io::Result<()>,
    },
}

/// A large WRITE whose payload is being read from the socket straight into `buf`, or into
/// the device's own memory (`landing`, then `buf` is empty).
struct BigWrite {
    req: Request,
    buf: Vec<u8>,
    filled: usize,
    landing: Option<Box<dyn Landing>>,
}

impl BigWrite {
    /// Where the next payload bytes go.
    fn room(&mut self) -> &mut [u8] {
        match &mut self.landing {
            Some(l) => l.room(self.filled),
            None => &mut self.buf[self.filled..],
        }
    }

    fn complete(&self) -> bool {
        self.filled == self.req.len as usize
    }
}

struct Transmission<R, W> {
    conn: Conn<R, W>,
    dev: Arc<dyn BlockDevice>,
    neg: Negotiated,
    contexts: Vec<MetaContext>,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    pending_bytes: usize,
    /// Spare buffers for queued requests.
    pool: Vec<Vec<u8>>,
    /// A DISC was received: read nothing more, finish what is queued, close.
    disconnecting: bool,
    /// See [`serve`].
    spin: Option<(RawFd, Duration)>,
    /// The current spin duration, adapted between zero and the configured one.
    spin_cur: Duration,
    /// Scratch space for [`BlockDevice::try_read_mapped`].
    mapped: Vec<MappedPiece>,
    /// The stream is inside the payload of this WRITE: read into its buffer, not `inbuf`.
    big: Option<BigWrite>,
}

/// Append the bytes of `piece` to `out`: long data shared, short data copied, zeros.
fn put_piece(out: &mut OutBuf, piece: &MappedPiece) {
    match piece {
        MappedPiece::Data(b) if b.len() >= SHARE_MIN => out.put_shared(b.clone()),
        MappedPiece::Data(b) => out.put(b),
        MappedPiece::Zero(n) if *n >= SHARE_MIN => {
            let mut left = *n;
            while left > 0 {
                let k = left.min(ZEROS.len());
                out.put_shared(Bytes::from_static(&ZEROS[..k]));
                left -= k;
            }
        }
        MappedPiece::Zero(n) => out.grab(*n).fill(0),
    }
}

/// Read what the socket has into the payload of `big` if there is one, else into `inbuf`.
/// `Ok(0)` at end of stream. Cancel safe.
async fn fill_next<R: ReadStream>(
    rd: &mut R,
    inbuf: &mut InBuf,
    big: &mut Option<BigWrite>,
) -> io::Result<usize> {
    match big {
        Some(b) => {
            let n = match &mut b.landing {
                Some(l) => {
                    let mut iov = l.rooms(b.filled, MAX_IOV);
                    rd.read_vectored(&mut iov).await?
                }
                None => rd.read(&mut b.buf[b.filled..]).await?,
            };
            b.filled += n;
            Ok(n)
        }
        None => inbuf.fill(rd).await,
    }
}

fn wire_errno(err: &io::Error) -> u32 {
    match errno_of(err) {
        libc::EPERM => proto::EPERM,
        libc::EINVAL => proto::EINVAL,
        libc::ENOSPC => proto::ENOSPC,
        libc::ENOMEM => proto::ENOMEM,
        libc::EOVERFLOW => proto::EOVERFLOW,
        libc::ENOTSUP => proto::ENOTSUP,
        libc::ESHUTDOWN => proto::ESHUTDOWN,
        _ => proto::EIO,
    }
}

impl<R: ReadStream, W: AsyncWrite + Unpin> Transmission<R, W> {
    fn new(conn: Conn<R, W>, session: Session) -> Self {
        let dev = session.export.device.clone();
        let neg = Negotiated {
            size: dev.size(),
            writable: dev.writable().is_some(),
            structured: session.structured,
            block_status: !session.contexts.is_empty(),
        };
        Transmission {
            conn,
            dev,
            neg,
            contexts: session.contexts,
            pending: FuturesUnordered::new(),
            pending_bytes: 0,
            pool: Vec::new(),
            disconnecting: false,
            spin: None,
            spin_cur: Duration::ZERO,
            mapped: Vec::new(),
            big: None,
        }
    }

    fn may_take_more(&self) -> bool {
        !self.disconnecting
            && self.pending.len() < MAX_INFLIGHT
            && self.pending_bytes < MAX_INFLIGHT_BYTES
            && self.conn.out.unsent() < MAX_UNSENT
    }

    async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), NbdError> {
        tokio::pin!(stop);
        let mut eof = false;
        let mut spun_at = 0u64;
        loop {
            // Handle buffered requests, writing replies out as soon as a good amount is
            // ready, so the client receives while the next replies are being read.
            while self.handle_buffered()? {
                self.conn.out.write_now(&mut self.conn.wr)?;
                if self.conn.out.unsent() >= SOFT_UNSENT {
                    // The socket is full: wait for it below.
                    break;
                }
            }
            let idle = self.pending.is_empty();
            if (self.disconnecting || eof) && idle {
                // Best effort: the client may have closed its side already.
                let _ = self.conn.out.flush(&mut self.conn.wr).await;
                return Ok(());
            }
            let can_read = !eof
                && (self.big.is_some() || (self.may_take_more() && self.conn.inbuf.has_room()));
            let want_write = self.conn.out.unsent() > 0;
            // When this connection went to sleep after a spin that found nothing.
            let mut slept_at = None;
            if can_read && !want_write && idle && self.spin.is_some() && self.big.is_none() {
                // Spin only after small batches (small-request ping-pong); after large
                // replies the client is busy copying and the CPU is better left to it.
                let batch = self.conn.out.total_sent - spun_at;
                spun_at = self.conn.out.total_sent;
                if batch <= SPIN_MAX_BATCH {
                    if self.spin_for_input()? {
                        continue;
                    }
                    slept_at = Some(std::time::Instant::now());
                }
            }
            tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                Some(done) = self.pending.next(), if !idle => self.complete(done),
                r = self.conn.out.write_some(&mut self.conn.wr), if want_write => {
                    r?;
                }
                r = fill_next(&mut self.conn.rd, &mut self.conn.inbuf, &mut self.big), if can_read => {
                    if r? == 0 {
                        eof = true;
                    } else if let Some(t) = slept_at {
                        self.spin_woken_after(t.elapsed());
                    }
                    if self.big.as_ref().is_some_and(BigWrite::complete) {
                        self.start_big_write();
                    }
                }
            }
        }
    }

    /// Adapt the spin duration after a sleep of `slept` ended with new requests: had the
    /// configured spin covered it, spinning is worth it again.
    fn spin_woken_after(&mut self, slept: Duration) {
        let Some((_, max)) = self.spin else {
            return;
        };
        if slept < max {
            self.spin_cur = (self.spin_cur * 2).clamp(max / 4, max);
        }
    }

    /// Poll the socket for new requests for up to the current spin duration; `true` if
    /// something was read.
    ///
    /// The duration adapts (as KVM's halt polling does), so that a client which pauses
    /// between requests costs little CPU: a spin that finds nothing halves it, down to zero
    /// below an eighth of the configured duration; a spin that finds requests doubles it,
    /// and so does a sleep that ended sooner than the configured duration (see
    /// [`Transmission::spin_woken_after`]), from at least a quarter of it.
    fn spin_for_input(&mut self) -> Result<bool, NbdError> {
        let Some((fd, max)) = self.spin else {
            return Ok(false);
        };
        let spin = self.spin_cur;
        if spin.is_zero() {
            return Ok(false);
        }
        let found = self.spin_recv(fd, spin)?;
        self.spin_cur = if found {
            (spin * 2).min(max)
        } else if spin / 2 < max / 8 {
            Duration::ZERO
        } else {
            spin / 2
        };
        Ok(found)
    }

    fn spin_recv(&mut self, fd: RawFd, spin: Duration) -> Result<bool, NbdError> {
        let inb = &mut self.conn.inbuf;
        if inb.buf.len() - inb.end < 64 * 1024 && inb.start > 0 {
            inb.compact();
        }
        let start = std::time::Instant::now();
        loop {
            let room = &mut inb.buf[inb.end..];
            // SAFETY: `room` is valid for writes of `room.len()` bytes; `fd` is the open
            // socket owned by this connection (see `serve`). MSG_DONTWAIT never blocks.
            let n =
                unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), libc::MSG_DONTWAIT) };
            if n > 0 {
                inb.end += n as usize;
                return Ok(true);
            }
            if n == 0 {
                return Ok(false);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => return Err(err.into()),
            }
            if start.elapsed() >= spin {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Handle complete requests in the input buffer, as far as the limits allow. `true`
    /// when it stopped because [`SOFT_UNSENT`] bytes of replies are waiting and more
    /// requests may be buffered.
    fn handle_buffered(&mut self) -> Result<bool, NbdError> {
        while self.may_take_more() {
            if self.conn.out.unsent() >= SOFT_UNSENT {
                return Ok(true);
            }
            let data = self.conn.inbuf.data();
            if data.len() < proto::REQUEST_LEN {
                break;
            }
            let mut hb = [0u8; proto::REQUEST_LEN];
            hb.copy_from_slice(&data[..proto::REQUEST_LEN]);
            let req = proto::parse_request(&hb)?;
            let need = proto::REQUEST_LEN + req.payload_len();
            if data.len() < need {
                if req.payload_len() >= BIG_WRITE {
                    // Everything buffered belongs to this payload: move it over and read
                    // the rest straight into the device's memory if it offers some (only
                    // for a request it will accept), else into the request's own buffer.
                    let landing = match proto::check_request(&req, &self.neg) {
                        Ok(()) => self
                            .dev
                            .writable()
                            .and_then(|w| w.landing(req.offset, req.len.into())),
                        Err(_) => None,
                    };
                    let buf = match landing {
                        Some(_) => Vec::new(),
                        None => self.take_buf(req.payload_len()),
                    };
                    let mut big = BigWrite {
                        req,
                        buf,
                        filled: 0,
                        landing,
                    };
                    let mut have = &self.conn.inbuf.data()[proto::REQUEST_LEN..];
                    while !have.is_empty() {
                        let room = big.room();
                        let k = room.len().min(have.len());
                        room[..k].copy_from_slice(&have[..k]);
                        have = &have[k..];
                        big.filled += k;
                    }
                    let n = self.conn.inbuf.data().len();
                    self.conn.inbuf.consume(n);
                    self.big = Some(big);
                    break;
                }
                self.conn.inbuf.reserve(need);
                break;
            }
            let start = self.conn.inbuf.start + proto::REQUEST_LEN;
            self.handle(req, start..self.conn.inbuf.start + need);
            self.conn.inbuf.consume(need);
        }
        Ok(false)
    }

    /// A buffer of `len` bytes with stale contents (from this connection's earlier
    /// requests; only the part never used before is zeroed).
    fn take_buf(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        } else {
            b.truncate(len);
        }
        self.pending_bytes += len;
        b
    }

    fn put_buf(&mut self, buf: Vec<u8>) {
        self.pending_bytes -= buf.len();
        if self.pool.len() < 16 && buf.capacity() <= 4 * 1024 * 1024 {
            self.pool.push(buf);
        }
    }

    /// The payload of the [`BigWrite`] is complete: check the request and queue the write
    /// on a blocking thread (falling back to [`WritableDevice::write`] for devices that
    /// cannot write at once).
    fn start_big_write(&mut self) {
        let Some(BigWrite {
            req, buf, landing, ..
        }) = self.big.take()
        else {
            return;
        };
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        if let Some(landing) = landing {
            // Already checked; the payload is in place: make it the content.
            let errno = match landing.commit(fua) {
                Ok(()) => 0,
                Err(e) => wire_errno(&e),
            };
            proto::encode_simple_reply(&mut self.conn.out, errno, req.cookie);
            return;
        }
        if let Err(errno) = proto::check_request(&req, &self.neg) {
            self.reply_error(&req, errno);
            self.put_buf(buf);
            return;
        }
        let (offset, len) = (req.offset, buf.len());
        let dev = self.dev.clone();
        self.pending.push(Box::pin(async move {
            let blocking_dev = dev.clone();
            let done = tokio::task::spawn_blocking(move || {
                let res = blocking_dev
                    .writable()
                    .and_then(|w| w.write_now(offset, &buf, fua));
                (buf, res)
            })
            .await;
            let (buf, res) = match done {
                Ok((buf, Some(res))) => (buf, res),
                Ok((buf, None)) => {
                    let res = match dev.writable() {
                        Some(w) => w.write(offset, &buf, fua).await,
                        None => Err(crate::device::errno_error(libc::EPERM)),
                    };
                    (buf, res)
                }
                // The buffer went down with the panicked thread; a new one keeps the
                // accounting of `pending_bytes` right.
                Err(e) => (vec![0; len], Err(io::Error::other(e))),
            };
            Done::Plain {
                cookie: req.cookie,
                buf,
                res,
            }
        }));
    }

    fn reply_error(&mut self, req: &Request, errno: u32) {
        if req.command == Command::Read && self.neg.structured {
            proto::encode_error_chunk(&mut self.conn.out, req.cookie, errno);
        } else {
            proto::encode_simple_reply(&mut self.conn.out, errno, req.cookie);
        }
    }

    /// Handle one request whose payload is `inbuf.buf[payload]`.
    fn handle(&mut self, req: Request, payload: std::ops::Range<usize>) {
        if req.command == Command::Disc {
            self.disconnecting = true;
            return;
        }
        if let Err(errno) = proto::check_request(&req, &self.neg) {
            self.reply_error(&req, errno);
            return;
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let (offset, len) = (req.offset, u64::from(req.len));
        match req.command {
            Command::Read => self.read(req),
            Command::BlockStatus => self.block_status(req),
            Command::Cache => {
                let dev = self.dev.clone();
                self.pending.push(Box::pin(async move {
                    let res = dev.cache(offset, len).await;
                    Done::Plain {
                        cookie: req.cookie,
                        buf: Vec::new(),
                        res,
                    }
                }));
            }
            Command::Write => {
                // A device that can write at once takes the payload straight from the input
                // buffer: no copy, no queueing.
                if let Some(w) = self.dev.writable() {
                    if let Some(res) =
                        w.write_now(offset, &self.conn.inbuf.buf[payload.clone()], fua)
                    {
                        let errno = match &res {
                            Ok(()) => 0,
                            Err(e) => wire_errno(e),
                        };
                        proto::encode_simple_reply(&mut self.conn.out, errno, req.cookie);
                        return;
                    }
                }
                let mut buf = self.take_buf(0);
                buf.extend_from_slice(&self.conn.inbuf.buf[payload]);
                self.pending_bytes += buf.len();
                let dev = self.dev.clone();
                self.pending.push(Box::pin(async move {
                    let res = match dev.writable() {
                        Some(w) => w.write(offset, &buf, fua).await,
                        None => Err(crate::device::errno_error(libc::EPERM)),
                    };
                    Done::Plain {
                        cookie: req.cookie,
                        buf,
                        res,
                    }
                }));
            }
            Command::Flush | Command::Trim | Command::WriteZeroes => {
                let dev = self.dev.clone();
                let may_punch = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                self.pending.push(Box::pin(async move {
                    let res = match dev.writable() {
                        Some(w) => match req.command {
                            Command::Flush => w.flush().await,
                            Command::Trim => w.trim(offset, len, fua).await,
                            _ => w.write_zeroes(offset, len, may_punch, fua).await,
                        },
                        None => Err(crate::device::errno_error(libc::EPERM)),
                    };
                    Done::Plain {
                        cookie: req.cookie,
                        buf: Vec::new(),
                        res,
                    }
                }));
            }
            // Rejected by check_request / handled above.
            Command::Disc | Command::Unknown(_) => self.reply_error(&req, proto::EINVAL),
        }
    }

    /// The parts of a READ: holes, and data in pieces of at most [`PIECE`] bytes (only with
    /// structured replies and without DF). `None` means "one data part covering the whole
    /// request", the common case of small reads.
    fn read_segments(&self, req: &Request) -> Option<Vec<Seg>> {
        if !self.neg.structured || req.flags & proto::CMD_FLAG_DF != 0 {
            return None;
        }
        let end = req.offset + u64::from(req.len);
        let exts = self
            .dev
            .extents(req.offset, u64::from(req.len), MAX_READ_EXTENTS);
        let has_hole = exts.iter().any(|e| e.kind == ExtentKind::Hole);
        if !has_hole && req.len as usize <= PIECE {
            return None;
        }
        let mut segs: Vec<Seg> = Vec::with_capacity(exts.len() + 1 + req.len as usize / PIECE);
        let push = |segs: &mut Vec<Seg>, s: u64, t: u64, hole: bool| match segs.last_mut() {
            Some(last) if last.hole == hole => last.len += (t - s) as u32,
            _ => segs.push(Seg {
                offset: s,
                len: (t - s) as u32,
                hole,
            }),
        };
        let mut pos = req.offset;
        for e in exts {
            let s = e.offset.max(pos);
            let t = e.offset.saturating_add(e.len).min(end);
            if s >= t || s != pos {
                // Out of order or overlapping answers: ignore the rest, send it as data.
                break;
            }
            push(&mut segs, s, t, e.kind == ExtentKind::Hole);
            pos = t;
        }
        if pos < end {
            push(&mut segs, pos, end, false);
        }
        // Split data into pieces, so each is written out while still in the CPU cache.
        let mut out = Vec::with_capacity(segs.len() + req.len as usize / PIECE);
        for s in segs {
            if s.hole {
                out.push(s);
                continue;
            }
            let mut at = s.offset;
            let end = s.offset + u64::from(s.len);
            while at < end {
                let n = (end - at).min(PIECE as u64);
                out.push(Seg {
                    offset: at,
                    len: n as u32,
                    hole: false,
                });
                at += n;
            }
        }
        Some(out)
    }

    fn read(&mut self, req: Request) {
        // Short reads copy with `try_read_nowait` (a `pread`): for a random 4 KiB read the
        // kernel's copy from the page cache measured faster than a copy out of a mapping
        // (TLB misses on the user mapping; see docs/benchmarks.md).
        if req.len as usize >= SHARE_MIN && self.read_mapped(&req) {
            return;
        }
        match self.read_segments(&req) {
            None => self.read_whole(req),
            Some(segs) => self.read_pieces(req, segs),
        }
    }

    /// Answer a READ from [`BlockDevice::try_read_mapped`] pieces, if the device can: long
    /// data pieces go out without a copy, holes become hole chunks (structured replies
    /// without DF) or zeros. `false`: the device cannot, nothing was done.
    fn read_mapped(&mut self, req: &Request) -> bool {
        let mut pieces = std::mem::take(&mut self.mapped);
        pieces.clear();
        let len = req.len as usize;
        let res = self.dev.try_read_mapped(req.offset, len, &mut pieces);
        let handled = match res {
            None => false,
            Some(Err(e)) => {
                self.reply_error(req, wire_errno(&e));
                true
            }
            Some(Ok(())) if pieces.iter().map(MappedPiece::len).sum::<usize>() != len => {
                // A device bug; the copying path is still right.
                debug_assert!(false, "try_read_mapped covered the wrong length");
                false
            }
            Some(Ok(())) => {
                let out = &mut self.conn.out;
                if !self.neg.structured {
                    proto::encode_simple_reply(out, 0, req.cookie);
                    pieces.iter().for_each(|p| put_piece(out, p));
                } else if req.flags & proto::CMD_FLAG_DF != 0 {
                    proto::encode_offset_data_header(out, true, req.cookie, req.offset, req.len);
                    pieces.iter().for_each(|p| put_piece(out, p));
                } else {
                    // One chunk per run of data or hole pieces.
                    let mut at = req.offset;
                    let mut i = 0;
                    while i < pieces.len() {
                        let hole = matches!(pieces[i], MappedPiece::Zero(_));
                        let run = pieces[i..]
                            .iter()
                            .take_while(|p| matches!(p, MappedPiece::Zero(_)) == hole)
                            .count();
                        let bytes: usize = pieces[i..i + run].iter().map(MappedPiece::len).sum();
                        let done = i + run == pieces.len();
                        if hole {
                            proto::encode_offset_hole(out, done, req.cookie, at, bytes as u32);
                        } else {
                            proto::encode_offset_data_header(
                                out,
                                done,
                                req.cookie,
                                at,
                                bytes as u32,
                            );
                            pieces[i..i + run].iter().for_each(|p| put_piece(out, p));
                        }
                        at += bytes as u64;
                        i += run;
                    }
                }
                true
            }
        };
        pieces.clear();
        self.mapped = pieces;
        handled
    }

    /// A READ answered by one reply (simple, or one data chunk): all inline or all queued.
    fn read_whole(&mut self, req: Request) {
        let mark = self.conn.out.mark();
        let out = &mut self.conn.out;
        if self.neg.structured {
            proto::encode_offset_data_header(out, true, req.cookie, req.offset, req.len);
        } else {
            proto::encode_simple_reply(out, 0, req.cookie);
        }
        let slot = out.grab(req.len as usize);
        match self.dev.try_read_nowait(req.offset, slot) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.conn.out.truncate(mark);
                self.reply_error(&req, wire_errno(&e));
            }
            None => {
                self.conn.out.truncate(mark);
                let seg = Seg {
                    offset: req.offset,
                    len: req.len,
                    hole: false,
                };
                self.queue_read(req, vec![seg]);
            }
        }
    }

    /// A structured READ in several chunks. Chunks are written out as they are produced;
    /// a failing piece ends the reply with an error chunk, and a piece that would block
    /// queues the rest of the request.
    fn read_pieces(&mut self, req: Request, segs: Vec<Seg>) {
        for (i, s) in segs.iter().enumerate() {
            let done = i + 1 == segs.len();
            let out = &mut self.conn.out;
            if s.hole {
                proto::encode_offset_hole(out, done, req.cookie, s.offset, s.len);
                continue;
            }
            // Nothing after `mark` has been written yet: writes only happen between pieces.
            let mark = out.mark();
            proto::encode_offset_data_header(out, done, req.cookie, s.offset, s.len);
            let slot = out.grab(s.len as usize);
            match self.dev.try_read_nowait(s.offset, slot) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    self.conn.out.truncate(mark);
                    proto::encode_error_chunk(&mut self.conn.out, req.cookie, wire_errno(&e));
                    return;
                }
                None => {
                    self.conn.out.truncate(mark);
                    self.queue_read(req, segs[i..].to_vec());
                    return;
                }
            }
            if !done && self.conn.out.unsent() >= SOFT_UNSENT {
                self.try_write_now();
            }
        }
    }

    /// Write what the socket takes right now, without waiting. Errors show up again on the
    /// next write, in the main loop.
    fn try_write_now(&mut self) {
        let _ = self.conn.out.write_now(&mut self.conn.wr);
    }

    /// Queue an async read of `segs` (contiguous, the rest of `req`).
    fn queue_read(&mut self, req: Request, segs: Vec<Seg>) {
        let base = segs[0].offset;
        let len = (req.offset + u64::from(req.len) - base) as usize;
        let buf = self.take_buf(len);
        let dev = self.dev.clone();
        self.pending.push(Box::pin(async move {
            let mut buf = buf;
            let mut res = Ok(());
            for s in segs.iter().filter(|s| !s.hole) {
                let at = (s.offset - base) as usize;
                res = dev.read(s.offset, &mut buf[at..at + s.len as usize]).await;
                if res.is_err() {
                    break;
                }
            }
            Done::Read {
                req,
                segs,
                buf,
                res,
            }
        }));
    }

    fn complete(&mut self, done: Done) {
        match done {
            Done::Read {
                req,
                segs,
                buf,
                res,
            } => {
                match res {
                    Err(e) => self.reply_error(&req, wire_errno(&e)),
                    Ok(()) if !self.neg.structured => {
                        proto::encode_simple_reply(&mut self.conn.out, 0, req.cookie);
                        self.conn.out.put(&buf);
                    }
                    Ok(()) => {
                        let base = segs[0].offset;
                        let out = &mut self.conn.out;
                        for (i, s) in segs.iter().enumerate() {
                            let done = i + 1 == segs.len();
                            if s.hole {
                                proto::encode_offset_hole(out, done, req.cookie, s.offset, s.len);
                            } else {
                                let at = (s.offset - base) as usize;
                                proto::encode_offset_data_header(
                                    out, done, req.cookie, s.offset, s.len,
                                );
                                out.put(&buf[at..at + s.len as usize]);
                            }
                        }
                    }
                }
                self.put_buf(buf);
            }
            Done::Plain { cookie, buf, res } => {
                let errno = match &res {
                    Ok(()) => 0,
                    Err(e) => wire_errno(e),
                };
                proto::encode_simple_reply(&mut self.conn.out, errno, cookie);
                self.put_buf(buf);
            }
        }
    }

    fn block_status(&mut self, req: Request) {
        let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
        let end = req.offset + u64::from(req.len);
        let exts = self.dev.extents(req.offset, u64::from(req.len), max);
        let mut descs: Vec<(u32, u32)> = Vec::with_capacity(exts.len().max(1));
        let n = self.contexts.len();
        for i in 0..n {
            let ctx = self.contexts[i];
            descs.clear();
            let mut pos = req.offset;
            for e in &exts {
                let s = e.offset.max(pos);
                let t = e.offset.saturating_add(e.len).min(end);
                if s >= t || s != pos {
                    break;
                }
                let flags = match ctx {
                    MetaContext::BaseAllocation => match e.kind {
                        ExtentKind::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
                        ExtentKind::Data => 0,
                    },
                    MetaContext::Residency => match e.residency {
                        Residency::Remote => proto::STATE_REMOTE,
                        Residency::Local => 0,
                        Residency::Overlay => proto::STATE_OVERLAY,
                    },
                };
                let len = (t - s) as u32;
                match descs.last_mut() {
                    Some(last) if last.1 == flags => last.0 += len,
                    _ => descs.push((len, flags)),
                }
                pos = t;
            }
            if descs.is_empty() {
                // The device said nothing usable: "allocated, local" is always safe.
                descs.push((req.len, 0));
            }
            if req_one {
                descs.truncate(1);
            }
            proto::encode_block_status(
                &mut self.conn.out,
                i + 1 == n,
                req.cookie,
                ctx.id(),
                &descs,
            );
        }
    }
}
