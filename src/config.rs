//! Daemon configuration. (Stub: filled in by the daemon work.)
