//! The control API. (Stub: filled in by the API work.)
