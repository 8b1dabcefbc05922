//! The catalog's records: what an image is, as the control API shows it.
//!
//! These types are both the stored rows (serialized into redb) and the API's JSON. Enums
//! serialize lower-case; unknown values are rejected with a message listing the valid ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::types::ImageId;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every valid value, as text.
            pub const ALL: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "invalid {} {:?}: expected one of {}",
                        stringify!($name).to_ascii_lowercase(),
                        s,
                        Self::ALL.join(", ")
                    )),
                }
            }
        }
    };
}

string_enum!(
    /// What the image is for.
    ImageType { System => "system", Volume => "volume" }
);
string_enum!(
    /// The format of the image's bytes as a guest disk.
    DiskFormat { Raw => "raw", Qcow2 => "qcow2", Vmdk => "vmdk", Iso => "iso" }
);
string_enum!(
    /// How the disk is packaged.
    ContainerFormat { Bare => "bare", Ova => "ova" }
);
string_enum!(
    /// Guest operating system family.
    OsType { Linux => "linux", Windows => "windows", Bsd => "bsd", Other => "other" }
);
string_enum!(
    /// Boot firmware the image needs.
    Firmware { Bios => "bios", Uefi => "uefi" }
);
string_enum!(
    /// Who may use the image.
    Visibility { Private => "private", Shared => "shared", Public => "public" }
);
string_enum!(
    /// Lifecycle state.
    ImageStatus {
        Queued => "queued",
        Importing => "importing",
        Active => "active",
        Disabled => "disabled",
        Deleted => "deleted",
        Error => "error",
    }
);

/// An image as the catalog stores it and the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub id: ImageId,
    pub name: String,
    pub description: String,
    pub image_type: ImageType,
    pub disk_format: DiskFormat,
    pub container_format: ContainerFormat,
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Bytes of distinct non-hole chunks the image references.
    pub stored_size: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// e.g. `x86_64`, `aarch64` (see [`validate_architecture`]).
    pub architecture: String,
    pub os_type: OsType,
    pub firmware: Firmware,
    /// Whether the guest has virtio drivers.
    pub virtio: bool,
    /// Minimum disk size in bytes for a volume made from this image (0: none).
    pub min_disk: u64,
    /// Minimum RAM in bytes for a VM booting it (0: none).
    pub min_ram: u64,
    pub visibility: Visibility,
    /// A protected image cannot be deleted.
    pub protected: bool,
    pub tags: BTreeSet<String>,
    pub properties: BTreeMap<String, String>,
    /// Free-form version label.
    pub version: String,
    pub owner: String,
    pub status: ImageStatus,
    /// Lower-case hex md5 of the raw content, once known.
    pub md5: Option<String>,
    /// Lower-case hex sha256 of the raw content, once known.
    pub sha256: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// Name of the store holding the manifest and chunks (`local` for the built-in store).
    pub store: String,
    /// Store key of the manifest (native images) or of the raw object (`object` images).
    pub manifest_key: String,
    /// Where the image's bytes come from. Rows written before this field existed are native.
    #[serde(default)]
    pub source: ImageSource,
}

/// Where an image's bytes come from.
///
/// - `native`: a manifest and content-addressed chunks in store `store` (the local store for
///   imported images; another configured store for pushed or registered ones, read lazily
///   through the chunk cache and verified by digest).
/// - `object`: one plain raw object at `url` (`http(s)://…` or `s3://bucket/key`), read by
///   byte range through the chunk cache in chunks of `chunk_size`; nothing verifies its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ImageSource {
    #[default]
    Native,
    Object {
        url: String,
    },
}

impl ImageSource {
    pub fn is_native(&self) -> bool {
        matches!(self, ImageSource::Native)
    }
}

/// Attributes a user sets when adding an image; every field optional with a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageAttributes {
    pub description: Option<String>,
    pub image_type: Option<ImageType>,
    pub disk_format: Option<DiskFormat>,
    pub container_format: Option<ContainerFormat>,
    pub architecture: Option<String>,
    pub os_type: Option<OsType>,
    pub firmware: Option<Firmware>,
    pub virtio: Option<bool>,
    pub min_disk: Option<u64>,
    pub min_ram: Option<u64>,
    pub visibility: Option<Visibility>,
    pub protected: Option<bool>,
    pub tags: Option<BTreeSet<String>>,
    pub properties: Option<BTreeMap<String, String>>,
    pub version: Option<String>,
    pub owner: Option<String>,
}

/// A change to an image (`image set`): every field optional; `None` leaves it unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagePatch {
    /// Rename.
    pub name: Option<String>,
    #[serde(flatten)]
    pub attributes: ImageAttributes,
    /// Tags to add.
    pub add_tags: Vec<String>,
    /// Tags to remove.
    pub remove_tags: Vec<String>,
    /// Property keys to remove.
    pub remove_properties: Vec<String>,
}

/// Lifecycle actions on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    Disable,
    Enable,
    /// Move to the recycle bin (status `deleted`).
    Delete,
    /// Restore from the recycle bin.
    Recover,
}

/// Check an image name: 1–128 characters of letters, digits, spaces and `-_.():+`, no
/// leading or trailing space, not a UUID (names and ids share one lookup).
pub fn validate_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > 128 {
        return Err(format!(
            "invalid image name {name:?}: must be 1 to 128 characters"
        ));
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err(format!(
            "invalid image name {name:?}: no leading or trailing spaces"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || " -_.():+".contains(*c)))
    {
        return Err(format!(
            "invalid image name {name:?}: character {c:?} is not allowed (letters, digits, spaces and -_.():+ only)"
        ));
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(format!(
            "invalid image name {name:?}: a name cannot look like an image id"
        ));
    }
    Ok(())
}

/// Check an architecture label (`x86_64`, `aarch64`, `i686`, `armv7l`, `ppc64le`, `s390x`,
/// `riscv64`, ...): 1–32 of lower-case letters, digits and `_`.
pub fn validate_architecture(arch: &str) -> Result<(), String> {
    if arch.is_empty()
        || arch.len() > 32
        || !arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "invalid architecture {arch:?}: use a label such as x86_64 or aarch64 (lower-case letters, digits, _)"
        ));
    }
    Ok(())
}

/// Check a tag: 1–64 characters, no control characters, no commas (the CLI splits on them).
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let n = tag.chars().count();
    if n == 0 || n > 64 || tag.chars().any(|c| c.is_control() || c == ',') || tag.trim() != tag {
        return Err(format!(
            "invalid tag {tag:?}: 1 to 64 characters, no commas, control characters or surrounding spaces"
        ));
    }
    Ok(())
}

/// Check a property key (1–255 of letters, digits and `._:-`) and value (at most 65535 bytes).
pub fn validate_property(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > 255
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        return Err(format!(
            "invalid property key {key:?}: 1 to 255 of letters, digits and ._:-"
        ));
    }
    if value.len() > 65535 {
        return Err(format!("property {key:?}: value longer than 65535 bytes"));
    }
    Ok(())
}

/// Check free-form text fields (description up to 1024 bytes; version, owner up to 255).
pub fn validate_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field} is longer than {max} bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_with_allowed_punctuation_is_valid() {
        assert!(validate_name("debian-12 (bookworm): v1.0+x_y").is_ok());
    }

    #[test]
    fn name_with_slash_or_edge_space_is_invalid() {
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(" a").is_err());
        assert!(validate_name("a ").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
        assert!(validate_name("3f0c8a6e-1b1e-4f7a-9a51-2f0b8e0b5a11").is_err());
    }

    #[test]
    fn enum_parse_error_lists_valid_values() {
        let err = "qcow3".parse::<DiskFormat>().unwrap_err();
        assert!(err.contains("raw, qcow2, vmdk, iso"), "{err}");
        assert_eq!("QCOW2".parse::<DiskFormat>().unwrap(), DiskFormat::Qcow2);
    }
}
