//! imgcache: serve catalog VM images to the VMs of one host, lazily, over NBD (and later FUSE).
//!
//! Module map (dependencies point one way only, left to right):
//!
//! `api → daemon → export → image → store`, with `catalog` used by `daemon` and `api`,
//! and `types`, `error`, `device`, `config` at the bottom, used by everyone.
//!
//! - [`types`]: small shared newtypes (`ImageId`, `Digest`, sizes).
//! - [`error`]: the shared [`error::ErrorKind`] that front ends map to errno / HTTP status.
//! - [`device`]: the [`device::BlockDevice`] trait every export serves.
//! - [`store`]: image storage (objects by key): the [`store::Store`] trait and backends.
//! - [`image`]: manifests, importing files into a store, the read-only image device.
//! - [`catalog`]: the embedded metadata database (redb): image rows, chunk references.
//! - [`export`]: front ends; [`export::nbd`] is the NBD server.
//! - [`daemon`]: owns catalog, stores, open images and listeners; start-up and shutdown.
//! - [`api`]: the control API (HTTP/JSON on a unix socket) and its client used by the CLI.
//! - [`config`]: the daemon configuration, validated once at load.
//! - [`overlay`]: the copy-on-write overlay format; [`volume`]: a volume device (overlay over
//!   an image) and flattening.

pub mod api;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod device;
pub mod error;
pub mod export;
pub mod image;
pub mod overlay;
pub mod store;
pub mod sys;
pub mod types;
pub mod volume;
