//! The NBD wire format: constants, parsers and encoders. Pure: no I/O, no async.
//!
//! Everything here works on byte slices the server has already read; parsers never panic on
//! any input (they are fuzzed) and return [`ProtoError`] for malformed bytes. Encoders append
//! to a `Vec<u8>` so the server can batch many replies into one write.
//!
//! The byte layouts are described in `docs/nbd.md`; the protocol is the "fixed newstyle"
//! negotiation of the NBD specification with structured replies and metadata contexts.

use crate::error::{Classify, ErrorKind};

// ---- Handshake ----------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic in front of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic in front of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options (client → server during the handshake).
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (sent with the export size).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Transmission -------------------------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Every command flag this server understands.
const KNOWN_CMD_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `imgcache:residency` flag: the extent's data is only remote.
pub const STATE_REMOTE: u32 = 1 << 0;
/// `imgcache:residency` flag: the extent is the volume's own (its overlay), not the image's.
pub const STATE_OVERLAY: u32 = 1 << 1;

/// Errno values on the wire (the NBD spec fixes them; they equal Linux's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---- Limits -------------------------------------------------------------------------------

/// Longest option payload accepted; a longer one ends the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) accepted, as the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest READ/WRITE payload; also the maximum block size advertised.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Advertised block sizes.
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Meta context names and the ids the server assigns them.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_RESIDENCY: &str = "imgcache:residency";

/// A malformed handshake or request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("client flags {0:#x} are not supported (fixed newstyle is required)")]
    ClientFlags(u32),
    #[error("length {len} exceeds the limit of {max}")]
    TooLong { len: u64, max: u64 },
    #[error("option payload is malformed: {0}")]
    Malformed(&'static str),
}

impl Classify for ProtoError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

// ---- Byte helpers -------------------------------------------------------------------------

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Malformed("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING_LEN {
            return Err(ProtoError::Malformed("string longer than 4096 bytes"));
        }
        let b = self.take(len)?;
        if b.contains(&0) {
            return Err(ProtoError::Malformed("string contains NUL"));
        }
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

// ---- Handshake parsing --------------------------------------------------------------------

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// What the client's flags word tells the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Parse the client's 32-bit flags. Unknown bits and a client without fixed newstyle are
/// refused (the spec requires closing on unknown flags).
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ProtoError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & !known != 0 || flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The 16-byte header in front of every option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse an option header; a bad magic or a payload over [`MAX_OPTION_LEN`] is fatal.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = be_u32(&b[8..12]);
    let len = be_u32(&b[12..16]);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            len: len.into(),
            max: MAX_OPTION_LEN.into(),
        });
    }
    Ok(OptionHeader { option, len })
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info {
        name: String,
        requests: Vec<u16>,
    },
    Go {
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMetaContext {
        name: String,
        queries: Vec<String>,
    },
    SetMetaContext {
        name: String,
        queries: Vec<String>,
    },
    /// Any option this server does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// Parse the payload of option `option`. `Err` means the payload is malformed and the
/// server answers `NBD_REP_ERR_INVALID` (except for `EXPORT_NAME`, which has no error reply).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    let mut c = Cursor { buf: data };
    let opt = match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(c.string(data.len())?),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY => {
            c.finish()?;
            match option {
                OPT_LIST => ClientOption::List,
                OPT_STARTTLS => ClientOption::StartTls,
                _ => ClientOption::StructuredReply,
            }
        }
        OPT_INFO | OPT_GO => {
            let name_len = c.u32()? as usize;
            let name = c.string(name_len)?;
            let n = c.u16()? as usize;
            if c.buf.len() != n * 2 {
                return Err(ProtoError::Malformed(
                    "info request count does not match length",
                ));
            }
            let mut requests = Vec::with_capacity(n);
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            if option == OPT_GO {
                ClientOption::Go { name, requests }
            } else {
                ClientOption::Info { name, requests }
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let name_len = c.u32()? as usize;
            let name = c.string(name_len)?;
            let n = c.u32()? as usize;
            // Each query takes at least 4 bytes; refuse counts the payload cannot hold
            // before allocating for them.
            if n > c.buf.len() / 4 {
                return Err(ProtoError::Malformed("query count does not match length"));
            }
            let mut queries = Vec::with_capacity(n);
            for _ in 0..n {
                let len = c.u32()? as usize;
                queries.push(c.string(len)?);
            }
            c.finish()?;
            if option == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext { name, queries }
            } else {
                ClientOption::SetMetaContext { name, queries }
            }
        }
        other => ClientOption::Unsupported(other),
    };
    Ok(opt)
}

// ---- Handshake encoding -------------------------------------------------------------------

/// Append an option reply header and its payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_REP_SERVER` for one export of `NBD_OPT_LIST`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// `NBD_REP_META_CONTEXT` with `id` and `name`.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &data);
}

/// What `NBD_OPT_INFO` / `NBD_OPT_GO` report about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub size: u64,
    pub flags: u16,
}

/// The `NBD_REP_INFO` replies for `option` (INFO or GO): export, name, description (if not
/// empty) and block size. They are sent whether or not the client asked for them, which the
/// spec allows.
pub fn encode_info_replies(out: &mut Vec<u8>, option: u32, info: &ExportInfo<'_>) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&info.size.to_be_bytes());
    d.extend_from_slice(&info.flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);

    d.clear();
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(info.name.as_bytes());
    encode_option_reply(out, option, REP_INFO, &d);

    if !info.description.is_empty() {
        d.clear();
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d.extend_from_slice(info.description.as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }

    d.clear();
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (without NO_ZEROES) 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---- Meta contexts ------------------------------------------------------------------------

/// A metadata context this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeros.
    BaseAllocation,
    /// `imgcache:residency`: bit 0 set = the data is only remote.
    Residency,
}

impl MetaContext {
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::Residency];

    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            MetaContext::Residency => CONTEXT_RESIDENCY,
        }
    }

    /// The id this server uses on the wire for the context (never 0).
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::Residency => 2,
        }
    }
}

/// The contexts a list of queries selects, in a stable order and without duplicates.
///
/// An empty list selects everything when `list` is true (`NBD_OPT_LIST_META_CONTEXT`) and
/// nothing otherwise. A namespace-only query (`base:`, `imgcache:`) selects the whole
/// namespace for listing; for setting, only full names select. Unknown names select nothing.
pub fn select_contexts(queries: &[String], list: bool) -> Vec<MetaContext> {
    if queries.is_empty() {
        return if list {
            MetaContext::ALL.to_vec()
        } else {
            Vec::new()
        };
    }
    MetaContext::ALL
        .into_iter()
        .filter(|ctx| {
            let name = ctx.name();
            queries.iter().any(|q| {
                q == name
                    || (list
                        && q.ends_with(':')
                        && name.starts_with(q.as_str())
                        && q.matches(':').count() == 1)
            })
        })
        .collect()
}

// ---- Requests -----------------------------------------------------------------------------

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// Whether the command modifies the export.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Command::Write | Command::Flush | Command::Trim | Command::WriteZeroes
        )
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// The number of payload bytes following the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.command == Command::Write {
            self.len as usize
        } else {
            0
        }
    }
}

/// Parse a request header. A bad magic or a WRITE payload over [`MAX_PAYLOAD`] is fatal for
/// the connection (the stream cannot be resynchronised); everything else is checked by
/// [`check_request`] and answered with an errno.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    let req = Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: Command::from_wire(u16::from_be_bytes([b[6], b[7]])),
        cookie: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        len: be_u32(&b[24..28]),
    };
    if req.command == Command::Write && req.len > MAX_PAYLOAD {
        return Err(ProtoError::TooLong {
            len: req.len.into(),
            max: MAX_PAYLOAD.into(),
        });
    }
    Ok(req)
}

/// Encode a request header (used by tests and the fuzzer's round trip).
pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    let cmd = match req.command {
        Command::Read => 0,
        Command::Write => 1,
        Command::Disc => 2,
        Command::Flush => 3,
        Command::Trim => 4,
        Command::Cache => 5,
        Command::WriteZeroes => 6,
        Command::BlockStatus => 7,
        Command::Unknown(v) => v,
    };
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    out.extend_from_slice(&req.len.to_be_bytes());
}

/// What was negotiated for a connection, as far as request checking needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub writable: bool,
    pub structured: bool,
    /// At least one meta context is selected.
    pub block_status: bool,
}

/// Check a request against the export; `Err(errno)` is the error to reply with.
///
/// Order: unknown command or flags → EINVAL; a write to a read-only export → EPERM; zero
/// length, past the end, or a READ over the maximum payload → EINVAL (past-the-end writes on
/// a writable export → ENOSPC, as the spec asks); BLOCK_STATUS without a context → EINVAL.
pub fn check_request(req: &Request, neg: &Negotiated) -> Result<(), u32> {
    if matches!(req.command, Command::Unknown(_)) || req.flags & !KNOWN_CMD_FLAGS != 0 {
        return Err(EINVAL);
    }
    if req.command.is_write() && !neg.writable {
        return Err(EPERM);
    }
    match req.command {
        Command::Disc | Command::Flush => return Ok(()),
        Command::BlockStatus if !neg.block_status || !neg.structured => return Err(EINVAL),
        Command::Read if req.len > MAX_PAYLOAD => return Err(EINVAL),
        _ => {}
    }
    if req.len == 0 {
        return Err(EINVAL);
    }
    let end = req.offset.checked_add(req.len.into());
    if end.is_none_or(|end| end > neg.size) {
        return Err(
            if matches!(req.command, Command::Write | Command::WriteZeroes) {
                ENOSPC
            } else {
                EINVAL
            },
        );
    }
    Ok(())
}

// ---- Reply encoding -----------------------------------------------------------------------

/// Where transmission-phase encoders append their bytes (a `Vec<u8>`, or the server's
/// reusable output buffer).
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A simple reply header (data, if any, follows).
pub fn encode_simple_reply(out: &mut impl Sink, error: u32, cookie: u64) {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    out.put(&h);
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn encode_chunk_header(out: &mut impl Sink, flags: u16, kind: u16, cookie: u64, len: u32) {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    out.put(&h);
}

/// The header (chunk header + offset) of an `OFFSET_DATA` chunk carrying `data_len` bytes.
pub fn encode_offset_data_header(
    out: &mut impl Sink,
    done: bool,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len);
    out.put(&offset.to_be_bytes());
}

/// An `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(out: &mut impl Sink, done: bool, cookie: u64, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.put(&offset.to_be_bytes());
    out.put(&len.to_be_bytes());
}

/// A final `NONE` chunk.
pub fn encode_none_done(out: &mut impl Sink, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// A final `ERROR` chunk without message.
pub fn encode_error_chunk(out: &mut impl Sink, cookie: u64, error: u32) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
    out.put(&error.to_be_bytes());
    out.put(&0u16.to_be_bytes());
}

/// A `BLOCK_STATUS` chunk for context `id` with `(len, flags)` descriptors. `descriptors`
/// must not be empty and no length may be zero.
pub fn encode_block_status(
    out: &mut impl Sink,
    done: bool,
    cookie: u64,
    id: u32,
    descriptors: &[(u32, u32)],
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let len = 4 + 8 * descriptors.len() as u32;
    encode_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put(&id.to_be_bytes());
    for (l, f) in descriptors {
        out.put(&l.to_be_bytes());
        out.put(&f.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(size: u64) -> Negotiated {
        Negotiated {
            size,
            writable: false,
            structured: true,
            block_status: true,
        }
    }

    fn req(command: Command, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    fn wire(r: &Request) -> [u8; REQUEST_LEN] {
        let mut v = Vec::new();
        encode_request(&mut v, r);
        v.try_into().unwrap()
    }

    fn go_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
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

    #[test]
    fn greeting_has_magics_and_flags() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(&out[0..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(out[16..18], [0, 3]);
    }

    #[test]
    fn client_without_fixed_newstyle_is_refused() {
        assert_eq!(parse_client_flags(0), Err(ProtoError::ClientFlags(0)));
        assert_eq!(parse_client_flags(2), Err(ProtoError::ClientFlags(2)));
    }

    #[test]
    fn client_with_unknown_flags_is_refused() {
        assert!(parse_client_flags(1 | 4).is_err());
    }

    #[test]
    fn client_flags_report_no_zeroes() {
        assert_eq!(
            parse_client_flags(1).unwrap(),
            ClientFlags { no_zeroes: false }
        );
        assert_eq!(
            parse_client_flags(3).unwrap(),
            ClientFlags { no_zeroes: true }
        );
    }

    #[test]
    fn option_header_parses_option_and_len() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 10
            }
        );
    }

    #[test]
    fn option_header_with_bad_magic_is_an_error() {
        let b = [0x55u8; 16];
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn option_longer_than_limit_is_an_error() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn go_parses_name_and_info_requests() {
        let opt = parse_option(OPT_GO, &go_payload("disk", &[INFO_BLOCK_SIZE])).unwrap();
        assert_eq!(
            opt,
            ClientOption::Go {
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE]
            }
        );
    }

    #[test]
    fn info_parses_like_go() {
        let opt = parse_option(OPT_INFO, &go_payload("", &[])).unwrap();
        assert_eq!(
            opt,
            ClientOption::Info {
                name: String::new(),
                requests: vec![]
            }
        );
    }

    #[test]
    fn go_with_name_longer_than_payload_is_malformed() {
        let mut d = go_payload("disk", &[]);
        d[3] = 200;
        assert!(parse_option(OPT_GO, &d).is_err());
    }

    #[test]
    fn go_with_wrong_request_count_is_malformed() {
        let mut d = go_payload("disk", &[1, 2]);
        d.pop();
        assert!(parse_option(OPT_GO, &d).is_err());
    }

    #[test]
    fn go_with_non_utf8_name_is_malformed() {
        let mut d = go_payload("ab", &[]);
        d[4] = 0xff;
        assert!(parse_option(OPT_GO, &d).is_err());
    }

    #[test]
    fn list_with_payload_is_malformed() {
        assert!(parse_option(OPT_LIST, b"x").is_err());
        assert_eq!(parse_option(OPT_LIST, b"").unwrap(), ClientOption::List);
    }

    #[test]
    fn structured_reply_with_payload_is_malformed() {
        assert!(parse_option(OPT_STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, b"").unwrap(),
            ClientOption::StructuredReply
        );
    }

    #[test]
    fn export_name_is_the_whole_payload() {
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"images/a").unwrap(),
            ClientOption::ExportName("images/a".into())
        );
    }

    #[test]
    fn export_name_with_nul_is_malformed() {
        assert!(parse_option(OPT_EXPORT_NAME, b"a\0b").is_err());
    }

    #[test]
    fn abort_starttls_and_unknown_options_parse() {
        assert_eq!(parse_option(OPT_ABORT, b"").unwrap(), ClientOption::Abort);
        assert_eq!(
            parse_option(OPT_STARTTLS, b"").unwrap(),
            ClientOption::StartTls
        );
        assert_eq!(
            parse_option(OPT_EXTENDED_HEADERS, b"").unwrap(),
            ClientOption::Unsupported(OPT_EXTENDED_HEADERS)
        );
        assert_eq!(
            parse_option(0xdead, b"junk").unwrap(),
            ClientOption::Unsupported(0xdead)
        );
    }

    #[test]
    fn meta_context_options_parse_queries() {
        let d = meta_payload("disk", &["base:allocation", "imgcache:"]);
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &d).unwrap(),
            ClientOption::SetMetaContext {
                name: "disk".into(),
                queries: vec!["base:allocation".into(), "imgcache:".into()]
            }
        );
        assert_eq!(
            parse_option(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])).unwrap(),
            ClientOption::ListMetaContext {
                name: "disk".into(),
                queries: vec![]
            }
        );
    }

    #[test]
    fn meta_context_with_huge_query_count_is_malformed() {
        let mut d = meta_payload("disk", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_LIST_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn meta_context_with_trailing_bytes_is_malformed() {
        let mut d = meta_payload("disk", &["base:allocation"]);
        d.push(0);
        assert!(parse_option(OPT_SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn truncated_payloads_never_panic() {
        for opt in [
            OPT_GO,
            OPT_INFO,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
        ] {
            let full = if opt == OPT_GO || opt == OPT_INFO {
                go_payload("disk", &[1, 2, 3])
            } else {
                meta_payload("disk", &["base:allocation", "imgcache:residency"])
            };
            for cut in 0..full.len() {
                assert!(
                    parse_option(opt, &full[..cut]).is_err(),
                    "opt {opt} cut {cut}"
                );
            }
            assert!(parse_option(opt, &full).is_ok());
        }
    }

    #[test]
    fn empty_list_query_selects_all_contexts() {
        assert_eq!(select_contexts(&[], true), MetaContext::ALL.to_vec());
        assert!(select_contexts(&[], false).is_empty());
    }

    #[test]
    fn namespace_query_lists_the_namespace() {
        assert_eq!(
            select_contexts(&["imgcache:".into()], true),
            vec![MetaContext::Residency]
        );
        assert_eq!(
            select_contexts(&["base:".into()], true),
            vec![MetaContext::BaseAllocation]
        );
        assert!(select_contexts(&["base:".into()], false).is_empty());
    }

    #[test]
    fn unknown_contexts_are_omitted() {
        let q = vec![
            "qemu:dirty-bitmap:x".to_string(),
            "imgcache:residency".into(),
            "base:nothing".into(),
        ];
        assert_eq!(select_contexts(&q, false), vec![MetaContext::Residency]);
    }

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_DF,
            command: Command::Read,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(parse_request(&wire(&r)).unwrap(), r);
    }

    #[test]
    fn every_command_round_trips() {
        for v in 0..10u16 {
            let r = req(Command::from_wire(v), 0, 1);
            let r = Request {
                len: if r.command == Command::Write { 1 } else { 9 },
                ..r
            };
            assert_eq!(parse_request(&wire(&r)).unwrap(), r);
        }
    }

    #[test]
    fn request_with_bad_magic_is_an_error() {
        let mut b = wire(&req(Command::Read, 0, 1));
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn write_over_max_payload_is_fatal() {
        let b = wire(&req(Command::Write, 0, MAX_PAYLOAD + 1));
        assert!(matches!(parse_request(&b), Err(ProtoError::TooLong { .. })));
    }

    #[test]
    fn read_over_max_payload_returns_einval() {
        let r = req(Command::Read, 0, MAX_PAYLOAD + 1);
        assert!(parse_request(&wire(&r)).is_ok());
        assert_eq!(check_request(&r, &neg(u64::MAX)), Err(EINVAL));
    }

    #[test]
    fn read_past_end_returns_einval() {
        assert_eq!(
            check_request(&req(Command::Read, 4096, 1), &neg(4096)),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(Command::Read, u64::MAX, 2), &neg(4096)),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(Command::Read, 4095, 1), &neg(4096)),
            Ok(())
        );
    }

    #[test]
    fn zero_length_read_returns_einval() {
        assert_eq!(
            check_request(&req(Command::Read, 0, 0), &neg(4096)),
            Err(EINVAL)
        );
    }

    #[test]
    fn write_to_read_only_export_returns_eperm() {
        for c in [
            Command::Write,
            Command::Flush,
            Command::Trim,
            Command::WriteZeroes,
        ] {
            assert_eq!(
                check_request(&req(c, 0, 1), &neg(4096)),
                Err(EPERM),
                "{c:?}"
            );
        }
    }

    #[test]
    fn write_past_end_of_writable_export_returns_enospc() {
        let n = Negotiated {
            writable: true,
            ..neg(4096)
        };
        assert_eq!(
            check_request(&req(Command::Write, 4096, 1), &n),
            Err(ENOSPC)
        );
        assert_eq!(check_request(&req(Command::Trim, 4096, 1), &n), Err(EINVAL));
        assert_eq!(check_request(&req(Command::Flush, 0, 0), &n), Ok(()));
    }

    #[test]
    fn unknown_command_returns_einval() {
        assert_eq!(
            check_request(&req(Command::Unknown(42), 0, 1), &neg(4096)),
            Err(EINVAL)
        );
    }

    #[test]
    fn unknown_command_flag_returns_einval() {
        let r = Request {
            flags: 1 << 9,
            ..req(Command::Read, 0, 1)
        };
        assert_eq!(check_request(&r, &neg(4096)), Err(EINVAL));
    }

    #[test]
    fn block_status_without_context_returns_einval() {
        let n = Negotiated {
            block_status: false,
            ..neg(4096)
        };
        assert_eq!(
            check_request(&req(Command::BlockStatus, 0, 1), &n),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(Command::BlockStatus, 0, 1), &neg(4096)),
            Ok(())
        );
    }

    #[test]
    fn simple_reply_layout() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, EPERM, 9);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(be_u32(&out[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&out[4..8]), EPERM);
        assert_eq!(be_u64(&out[8..16]), 9);
    }

    #[test]
    fn hole_chunk_layout() {
        let mut out = Vec::new();
        encode_offset_hole(&mut out, true, 3, 512, 1024);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 12);
        assert_eq!(be_u32(&out[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(be_u32(&out[16..20]), 12);
        assert_eq!(be_u64(&out[20..28]), 512);
        assert_eq!(be_u32(&out[28..32]), 1024);
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut out = Vec::new();
        encode_block_status(&mut out, false, 1, 2, &[(10, 3), (20, 0)]);
        assert_eq!(be_u32(&out[16..20]), 4 + 16);
        assert_eq!(be_u32(&out[20..24]), 2);
        assert_eq!(be_u32(&out[24..28]), 10);
        assert_eq!(be_u32(&out[28..32]), 3);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 20);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 5, EIO);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&out[16..20]), 6);
        assert_eq!(be_u32(&out[20..24]), EIO);
    }

    #[test]
    fn info_replies_include_export_name_and_block_size() {
        let mut out = Vec::new();
        let info = ExportInfo {
            name: "d",
            description: "",
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS,
        };
        encode_info_replies(&mut out, OPT_GO, &info);
        // export (20+12), name (20+3), block size (20+14); no description.
        assert_eq!(out.len(), 32 + 23 + 34);
        assert_eq!(be_u64(&out[22..30]), 1 << 20);
        let bs = &out[out.len() - 12..];
        assert_eq!(be_u32(&bs[0..4]), 1);
        assert_eq!(be_u32(&bs[4..8]), 4096);
        assert_eq!(be_u32(&bs[8..12]), MAX_PAYLOAD);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(opt in 0u32..16, data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_option(opt, &data);
            if let Ok(h) = <[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
                let _ = parse_option_header(&h);
            }
            if let Ok(b) = <[u8; REQUEST_LEN]>::try_from(data.get(..REQUEST_LEN).unwrap_or(&[])) {
                if let Ok(r) = parse_request(&b) {
                    proptest::prop_assert_eq!(&wire(&r)[..], &b[..]);
                    let _ = check_request(&r, &neg(u64::from(opt) << 12));
                }
            }
        }

        #[test]
        fn go_payloads_round_trip(name in "[a-z/]{0,40}", reqs in proptest::collection::vec(0u16..8, 0..8)) {
            let parsed = parse_option(OPT_GO, &go_payload(&name, &reqs)).unwrap();
            proptest::prop_assert_eq!(parsed, ClientOption::Go { name, requests: reqs });
        }
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut a = Vec::new();
        encode_export_name_reply(&mut a, 1, 1, false);
        let mut b = Vec::new();
        encode_export_name_reply(&mut b, 1, 1, true);
        assert_eq!(a.len(), 134);
        assert_eq!(b.len(), 10);
    }
}
