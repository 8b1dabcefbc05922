//! Wire types of the control API, shared by the server and the client.
//!
//! The add stream is NDJSON: one [`AddEvent`] per line, any number of `progress` lines, then
//! exactly one `image` or `error` line. [`NdjsonDecoder`] splits a byte stream into events.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cache::WarmReport;
use crate::catalog::{ImageAttributes, ImageRecord};
pub use crate::daemon::from_volume::ImageFromVolumeReport;
pub use crate::daemon::lazy::{
    CacheView, ImageCacheRow, PushReport, PushRequest, StoreInfo, WarmRequest,
};
use crate::error::ErrorKind;

/// The largest request body the server accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The largest NDJSON line the client accepts (an image record with many properties).
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// `POST /v1/images`: exactly one of `file` (import), `store` + `manifest` (register a
/// native image in a store), `url` (register a raw object) or `volume` (an image from a
/// volume or snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddImageRequest {
    pub name: String,
    /// Absolute path of a raw file on the daemon's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A configured store holding the image's manifest and chunks; with `volume`, the
    /// store to make the image in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The manifest's key in `store`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// `http(s)://…` or `s3://bucket/key` of a raw image object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `VOLUME` or `VOLUME@SNAPSHOT`: a new local image with that content (chunks shared
    /// with the base image where the volume did not change them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Bytes; the daemon's default when absent (the base image's for `volume`).
    #[serde(default)]
    pub chunk_size: Option<u64>,
    /// `md5:HEX` or `sha256:HEX`.
    #[serde(default)]
    pub checksum: Option<String>,
    #[serde(default)]
    pub attributes: ImageAttributes,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
}

/// The `error` object of every failed request and of a failed add stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// See [`kind_name`].
    pub kind: String,
    pub message: String,
}

/// The body of a failed request: `{"error":{...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// Progress of an add, in bytes of the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddProgress {
    pub done: u64,
    pub total: u64,
}

/// One line of a progress stream (add, push, warm).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddEvent {
    Progress(AddProgress),
    /// Final line of an add: the committed image.
    Image(Box<ImageRecord>),
    /// Final line of an image made from a volume.
    FromVolume(Box<ImageFromVolumeReport>),
    /// Final line of a warm.
    Warm(WarmReport),
    /// Final line of a push.
    Push(PushReport),
    /// Final: the add failed and left nothing behind.
    Error(ApiError),
}

impl AddEvent {
    /// The event as one NDJSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("an AddEvent always serializes");
        line.push(b'\n');
        line
    }
}

/// Splits a byte stream into NDJSON events; lines may arrive split across chunks.
#[derive(Debug, Default)]
pub struct NdjsonDecoder {
    buf: Vec<u8>,
}

/// A line that is not a valid event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NdjsonError {
    #[error("invalid progress line from the daemon: {0}")]
    BadLine(String),
    #[error("progress line from the daemon longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("the daemon's progress stream ended in the middle of a line")]
    Truncated,
}

impl NdjsonDecoder {
    pub fn new() -> NdjsonDecoder {
        NdjsonDecoder::default()
    }

    /// Feed `bytes`; returns the events of every line completed by them. Empty lines are
    /// skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<AddEvent>, NdjsonError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + nl];
            start += nl + 1;
            if let Some(ev) = parse_line(line)? {
                events.push(ev);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE_BYTES {
            return Err(NdjsonError::LineTooLong);
        }
        Ok(events)
    }

    /// The stream ended: a last line without a newline is parsed; a partial one is an error.
    pub fn finish(&mut self) -> Result<Option<AddEvent>, NdjsonError> {
        let rest = std::mem::take(&mut self.buf);
        if rest.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        match parse_line(&rest) {
            Ok(ev) => Ok(ev),
            Err(_) => Err(NdjsonError::Truncated),
        }
    }
}

fn parse_line(line: &[u8]) -> Result<Option<AddEvent>, NdjsonError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|e| NdjsonError::BadLine(e.to_string()))
}

/// The wire name of an error kind (`invalid_input`, `not_found`, ...).
pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::Conflict => "conflict",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::NoSpace => "no_space",
        ErrorKind::Io => "io",
        ErrorKind::Internal => "internal",
    }
}

/// The kind of a wire name; unknown names (a newer daemon) are `Internal`.
pub fn kind_from_name(name: &str) -> ErrorKind {
    const ALL: [ErrorKind; 11] = [
        ErrorKind::InvalidInput,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Conflict,
        ErrorKind::PermissionDenied,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Corrupt,
        ErrorKind::NoSpace,
        ErrorKind::Io,
        ErrorKind::Internal,
    ];
    ALL.into_iter()
        .find(|k| kind_name(*k) == name)
        .unwrap_or(ErrorKind::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_event_has_the_documented_shape() {
        let ev = AddEvent::Progress(AddProgress { done: 5, total: 9 });
        assert_eq!(ev.to_line(), b"{\"progress\":{\"done\":5,\"total\":9}}\n");
    }

    #[test]
    fn decoder_joins_lines_split_across_chunks() {
        let mut d = NdjsonDecoder::new();
        assert_eq!(d.push(b"{\"progress\":{\"do").unwrap(), vec![]);
        let evs = d
            .push(b"ne\":1,\"total\":4}}\n\n{\"progress\":{\"done\":4,\"total\":4}}\n{\"err")
            .unwrap();
        assert_eq!(
            evs,
            vec![
                AddEvent::Progress(AddProgress { done: 1, total: 4 }),
                AddEvent::Progress(AddProgress { done: 4, total: 4 }),
            ]
        );
        let evs = d
            .push(b"or\":{\"kind\":\"not_found\",\"message\":\"gone\"}}")
            .unwrap();
        assert!(evs.is_empty());
        assert_eq!(
            d.finish().unwrap(),
            Some(AddEvent::Error(ApiError {
                kind: "not_found".into(),
                message: "gone".into()
            }))
        );
    }

    #[test]
    fn decoder_rejects_garbage_line() {
        let mut d = NdjsonDecoder::new();
        let err = d.push(b"hello\n").unwrap_err();
        assert!(matches!(err, NdjsonError::BadLine(_)), "{err}");
    }

    #[test]
    fn decoder_reports_truncated_final_line() {
        let mut d = NdjsonDecoder::new();
        d.push(b"{\"progress\":{\"done\":1").unwrap();
        assert_eq!(d.finish(), Err(NdjsonError::Truncated));
    }

    #[test]
    fn decoder_with_nothing_pending_finishes_cleanly() {
        let mut d = NdjsonDecoder::new();
        d.push(b"{\"progress\":{\"done\":1,\"total\":1}}\n")
            .unwrap();
        assert_eq!(d.finish(), Ok(None));
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [
            ErrorKind::InvalidInput,
            ErrorKind::NoSpace,
            ErrorKind::Conflict,
        ] {
            assert_eq!(kind_from_name(kind_name(k)), k);
        }
        assert_eq!(kind_from_name("martian"), ErrorKind::Internal);
    }

    #[test]
    fn add_request_rejects_unknown_fields() {
        let err =
            serde_json::from_str::<AddImageRequest>(r#"{"name":"a","file":"/f","chunksize":1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("chunksize"), "{err}");
    }
}
