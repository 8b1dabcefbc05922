//! The embedded catalog (redb). (Stub: filled in by the catalog work.)
