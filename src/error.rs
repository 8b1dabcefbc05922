//! The shared error classification.
//!
//! Every module has its own `thiserror` enum; each of them can say which [`ErrorKind`] it is.
//! The kind, never the message, drives decisions: retries, the NBD errno, the HTTP status of
//! the control API and the CLI's exit code. One mapping function per front end lives here.

/// What kind of failure an error is, independent of the module that raised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller's input is wrong (bad name, bad size, malformed request).
    InvalidInput,
    /// The named thing does not exist.
    NotFound,
    /// The named thing exists already (duplicate name).
    AlreadyExists,
    /// The request conflicts with the current state (protected, in use, wrong status).
    Conflict,
    /// The operation is not allowed on this object (a write to a read-only export).
    PermissionDenied,
    /// A dependency is temporarily unavailable; retrying may help.
    Unavailable,
    /// A dependency did not answer in time.
    Timeout,
    /// Stored data failed verification.
    Corrupt,
    /// The local disk is full.
    NoSpace,
    /// Any other I/O failure.
    Io,
    /// A bug or an impossible state.
    Internal,
}

/// Implemented by every module error so front ends can classify it.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}

impl ErrorKind {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    /// The HTTP status the control API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidInput => 400,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => 409,
            ErrorKind::NoSpace => 507,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Corrupt | ErrorKind::Io | ErrorKind::Internal => 500,
        }
    }

    /// The kind the control API's status code stands for (the CLI's reverse mapping).
    pub fn from_http_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::InvalidInput,
            403 => ErrorKind::PermissionDenied,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            503 => ErrorKind::Unavailable,
            504 => ErrorKind::Timeout,
            507 => ErrorKind::NoSpace,
            _ => ErrorKind::Internal,
        }
    }

    /// The errno a block front end (NBD, FUSE) reports.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::PermissionDenied => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::NotFound => libc::ENOENT,
            _ => libc::EIO,
        }
    }

    /// The kind of an `std::io::Error`.
    pub fn of_io(err: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::InvalidInput | K::InvalidData => ErrorKind::InvalidInput,
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
            K::TimedOut => ErrorKind::Timeout,
            K::StorageFull => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        }
    }
}

/// `err` and its sources joined with ": ", for logs and user-facing messages (module errors
/// never paste their source into their own message, so the chain is walked here once).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}
