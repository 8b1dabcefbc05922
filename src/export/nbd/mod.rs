//! The NBD server. (Stub: filled in by the NBD work.)
