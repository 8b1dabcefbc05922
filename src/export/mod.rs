//! Front ends that serve [`crate::device::BlockDevice`]s to clients.
//!
//! The front ends see exports only through [`ExportRegistry`], which the daemon implements:
//! it resolves an export name to an open device handle once, when a client opens the export,
//! so the data path never touches the catalog.

use std::sync::Arc;
use std::time::SystemTime;

use crate::device::BlockDevice;

pub mod fuse;
pub mod nbd;

/// One export as a front end sees it.
#[derive(Clone)]
pub struct Export {
    /// The export name, e.g. `images/debian-12`.
    pub name: String,
    /// A one-line human description.
    pub description: String,
    /// The device serving it.
    pub device: Arc<dyn BlockDevice>,
}

/// A name and description, as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// When an export was created and last changed (catalog times, not data writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportTimes {
    pub created: SystemTime,
    pub modified: SystemTime,
}

/// Which exports exist right now. Implemented by the daemon.
pub trait ExportRegistry: Send + Sync + 'static {
    /// Every export a client may open now, sorted by name.
    fn list(&self) -> Vec<ExportListing>;
    /// Open the named export; `None` if it does not exist (or is disabled, deleted).
    fn open(&self, name: &str) -> Option<Export>;
    /// The catalog times of the named export, for front ends that show them (FUSE);
    /// `None` when unknown (the front end then shows its own start time).
    fn times(&self, name: &str) -> Option<ExportTimes> {
        let _ = name;
        None
    }
}
