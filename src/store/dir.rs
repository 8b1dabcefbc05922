//! A store in a local directory. (Stub: filled in by the store/image work.)
