//! A store in a local directory.
//!
//! SIGNATURE STUB: the store/image work fills it in.

use std::path::PathBuf;

/// A [`super::Store`] whose objects are files under a root directory.
pub struct DirStore {
    #[allow(dead_code)]
    root: PathBuf,
}

impl DirStore {
    /// Open (creating if needed) the store rooted at `root`.
    pub fn open(root: PathBuf) -> std::io::Result<DirStore> {
        std::fs::create_dir_all(&root)?;
        Ok(DirStore { root })
    }
}
