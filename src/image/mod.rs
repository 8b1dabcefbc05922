//! Images: manifests, importing files into a store, the read-only image device.
//! (Stub: filled in by the store/image work.)
