//! The daemon. (Stub: filled in by the daemon work.)
