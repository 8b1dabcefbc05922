//! An in-memory block device for tests. (Stub: filled in by the NBD work.)
