//! The image manifest: which chunk holds each `chunk_size` slice of an image.
//!
//! Binary layout (all integers little-endian; see `docs/store-format.md`):
//!
//! ```text
//! 0   8   magic "IMGCMANI"
//! 8   4   format version (1)
//! 12  4   chunk size (power of two, 64 KiB ..= 16 MiB)
//! 16  8   virtual size in bytes
//! 24  8   entry count (== ceil(virtual size / chunk size))
//! 32  33*n entries: tag u8 (0 hole, 1 data) + 32-byte blake3 digest (all zero for a hole)
//! ..  32  blake3 of every byte before it
//! ```
//!
//! Chunk `i` covers `i*chunk_size .. min((i+1)*chunk_size, virtual_size)`: every chunk is
//! full except possibly the last, whose length is `virtual_size - (n-1)*chunk_size`.
//!
//! [`Manifest::decode`] is a pure function over untrusted bytes: it never panics and
//! allocates only after the length has been checked against the header.
//!
//! In memory a manifest keeps one 32-byte digest per chunk plus one bit per chunk for holes
//! (a 100 GiB image with 1 MiB chunks takes ~3.3 MB).

use crate::types::{Digest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The first 8 bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"IMGCMANI";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first entry.
pub const HEADER_LEN: usize = 32;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 33;
/// Bytes of the trailing checksum.
pub const TRAILER_LEN: usize = 32;

const TAG_HOLE: u8 = 0;
const TAG_DATA: u8 = 1;

/// Why bytes are not a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {len} bytes, shorter than the {min}-byte minimum")]
    TooShort { len: usize, min: usize },
    #[error("bad magic: not an imgcache manifest")]
    BadMagic,
    #[error("unsupported manifest format version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("invalid chunk size {0}: must be a power of two between 64 KiB and 16 MiB")]
    BadChunkSize(u32),
    #[error("entry count {entries} does not match virtual size {size} with chunk size {chunk_size} (expected {expected})")]
    BadEntryCount {
        entries: u64,
        size: u64,
        chunk_size: u32,
        expected: u64,
    },
    #[error("manifest is {len} bytes but its header describes {expected} bytes")]
    BadLength { len: usize, expected: u128 },
    #[error("checksum mismatch: manifest is corrupt")]
    BadChecksum,
    #[error("entry {index} has invalid tag {tag}")]
    BadTag { index: u64, tag: u8 },
    #[error("hole entry {index} has a non-zero digest")]
    HoleWithDigest { index: u64 },
}

/// Whether `chunk_size` is acceptable: a power of two in 64 KiB ..= 16 MiB.
pub fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// ceil(size / chunk_size) for a valid chunk size.
fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// An image's chunk map. Invariant: `digests.len() == ceil(size / chunk_size)`, holes have
/// their bit set in `holes` and an all-zero placeholder digest.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u32,
    size: u64,
    digests: Vec<Digest>,
    /// Bit `i` set: chunk `i` is a hole.
    holes: Vec<u64>,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("chunk_size", &self.chunk_size)
            .field("size", &self.size)
            .field("chunks", &self.digests.len())
            .field("holes", &self.hole_count())
            .finish()
    }
}

impl Manifest {
    /// A manifest of `size` bytes with every chunk a hole.
    ///
    /// Panics if `chunk_size` is invalid (callers validate user input first).
    pub fn new_holes(size: u64, chunk_size: u32) -> Manifest {
        assert!(
            valid_chunk_size(chunk_size),
            "invalid chunk size {chunk_size}"
        );
        let n = chunk_count(size, chunk_size) as usize;
        let mut holes = vec![u64::MAX; n.div_ceil(64)];
        if n % 64 != 0 {
            if let Some(last) = holes.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        Manifest {
            chunk_size,
            size,
            digests: vec![Digest([0; 32]); n],
            holes,
        }
    }

    /// Build a manifest from per-chunk entries (`None` = hole).
    pub fn from_entries(
        size: u64,
        chunk_size: u32,
        entries: impl IntoIterator<Item = Option<Digest>>,
    ) -> Result<Manifest, ManifestError> {
        if !valid_chunk_size(chunk_size) {
            return Err(ManifestError::BadChunkSize(chunk_size));
        }
        let mut m = Manifest::new_holes(size, chunk_size);
        let mut n = 0u64;
        for e in entries {
            if n < m.chunk_count() {
                if let Some(d) = e {
                    m.set_data(n, d);
                }
            }
            n += 1;
        }
        if n != m.chunk_count() {
            return Err(ManifestError::BadEntryCount {
                entries: n,
                size,
                chunk_size,
                expected: m.chunk_count(),
            });
        }
        Ok(m)
    }

    /// Mark chunk `index` as stored with `digest`. Panics if out of range.
    pub fn set_data(&mut self, index: u64, digest: Digest) {
        let i = index as usize;
        self.digests[i] = digest;
        self.holes[i / 64] &= !(1u64 << (i % 64));
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Length in bytes of chunk `index` (the last one may be short); 0 if out of range.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(u64::from(self.chunk_size));
        if start >= self.size {
            return 0;
        }
        (self.size - start).min(u64::from(self.chunk_size))
    }

    /// The digest of chunk `index`, or `None` for a hole or an index out of range.
    #[inline]
    pub fn chunk(&self, index: u64) -> Option<&Digest> {
        let i = usize::try_from(index).ok()?;
        let d = self.digests.get(i)?;
        if self.holes[i / 64] & (1u64 << (i % 64)) != 0 {
            None
        } else {
            Some(d)
        }
    }

    pub fn is_hole(&self, index: u64) -> bool {
        self.chunk(index).is_none()
    }

    pub fn hole_count(&self) -> u64 {
        self.holes.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Every entry in order (`None` = hole).
    pub fn entries(&self) -> impl Iterator<Item = Option<&Digest>> + '_ {
        (0..self.chunk_count()).map(move |i| self.chunk(i))
    }

    /// The distinct data digests, sorted.
    pub fn distinct_digests(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.entries().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Serialise to the binary format.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.digests.len();
        let mut out = Vec::with_capacity(HEADER_LEN + n * ENTRY_LEN + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        for e in self.entries() {
            match e {
                None => {
                    out.push(TAG_HOLE);
                    out.extend_from_slice(&[0u8; 32]);
                }
                Some(d) => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(&d.0);
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parse and verify untrusted bytes. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let min = HEADER_LEN + TRAILER_LEN;
        if bytes.len() < min {
            return Err(ManifestError::TooShort {
                len: bytes.len(),
                min,
            });
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        let u32_at =
            |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if header[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let chunk_size = u32_at(12);
        if !valid_chunk_size(chunk_size) {
            return Err(ManifestError::BadChunkSize(chunk_size));
        }
        let size = u64_at(16);
        let entries = u64_at(24);
        let expected_entries = chunk_count(size, chunk_size);
        if entries != expected_entries {
            return Err(ManifestError::BadEntryCount {
                entries,
                size,
                chunk_size,
                expected: expected_entries,
            });
        }
        let expected_len =
            (HEADER_LEN + TRAILER_LEN) as u128 + u128::from(entries) * ENTRY_LEN as u128;
        if bytes.len() as u128 != expected_len {
            return Err(ManifestError::BadLength {
                len: bytes.len(),
                expected: expected_len,
            });
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(ManifestError::BadChecksum);
        }
        // Length checked above: `entries` fits in memory we already hold.
        let mut m = Manifest::new_holes(size, chunk_size);
        let entry_bytes = &rest[..rest.len() - TRAILER_LEN];
        for (i, e) in entry_bytes.chunks_exact(ENTRY_LEN).enumerate() {
            let index = i as u64;
            let mut d = [0u8; 32];
            d.copy_from_slice(&e[1..]);
            match e[0] {
                TAG_HOLE if d == [0u8; 32] => {}
                TAG_HOLE => return Err(ManifestError::HoleWithDigest { index }),
                TAG_DATA => m.set_data(index, Digest(d)),
                tag => return Err(ManifestError::BadTag { index, tag }),
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u32 = 64 * 1024;

    fn sample() -> Manifest {
        let size = 3 * u64::from(CS) + 100;
        Manifest::from_entries(
            size,
            CS,
            [
                Some(Digest::of(b"a")),
                None,
                Some(Digest::of(b"b")),
                Some(Digest::of(b"a")),
            ],
        )
        .unwrap()
    }

    #[test]
    fn encode_decode_round_trips() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 4 * ENTRY_LEN + TRAILER_LEN);
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.chunk(1), None);
        assert_eq!(back.chunk(2), Some(&Digest::of(b"b")));
        assert_eq!(back.chunk_len(3), 100);
        assert_eq!(back.chunk_len(0), u64::from(CS));
        assert_eq!(back.hole_count(), 1);
        assert_eq!(back.distinct_digests().len(), 2);
    }

    #[test]
    fn empty_manifest_round_trips() {
        let m = Manifest::new_holes(0, CS);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn decode_rejects_bad_magic() {
        let mut b = sample().encode();
        b[0] ^= 1;
        assert_eq!(Manifest::decode(&b), Err(ManifestError::BadMagic));
    }

    #[test]
    fn decode_rejects_truncation() {
        let b = sample().encode();
        for len in 0..b.len() {
            assert!(Manifest::decode(&b[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn decode_rejects_every_single_bit_flip() {
        let b = sample().encode();
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(Manifest::decode(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn decode_rejects_bad_version_and_chunk_size() {
        let mut b = sample().encode();
        b[8] = 2;
        assert_eq!(
            Manifest::decode(&b),
            Err(ManifestError::UnsupportedVersion(2))
        );
        let mut b = sample().encode();
        b[12..16].copy_from_slice(&(CS + 1).to_le_bytes());
        assert_eq!(
            Manifest::decode(&b),
            Err(ManifestError::BadChunkSize(CS + 1))
        );
    }

    #[test]
    fn decode_rejects_huge_entry_count_without_allocating() {
        let mut b = sample().encode();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        b[24..32].copy_from_slice(&(u64::MAX / u64::from(CS) + 1).to_le_bytes());
        assert!(matches!(
            Manifest::decode(&b),
            Err(ManifestError::BadLength { .. })
        ));
    }

    #[test]
    fn decode_rejects_hole_with_digest_even_with_valid_checksum() {
        let mut b = sample().encode();
        let e1 = HEADER_LEN + ENTRY_LEN;
        b[e1 + 1] = 7;
        let body_len = b.len() - TRAILER_LEN;
        let sum = *blake3::hash(&b[..body_len]).as_bytes();
        b[body_len..].copy_from_slice(&sum);
        assert_eq!(
            Manifest::decode(&b),
            Err(ManifestError::HoleWithDigest { index: 1 })
        );
    }

    #[test]
    fn from_entries_rejects_wrong_count() {
        let r = Manifest::from_entries(u64::from(CS) + 1, CS, [None]);
        assert!(matches!(
            r,
            Err(ManifestError::BadEntryCount { expected: 2, .. })
        ));
    }

    #[test]
    fn in_memory_size_is_compact() {
        // 100 GiB with 1 MiB chunks.
        let m = Manifest::new_holes(100 << 30, 1 << 20);
        let bytes = m.digests.capacity() * 32 + m.holes.capacity() * 8;
        assert!(bytes <= 102_400 * 33, "{bytes}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decode_of_mutated_manifest_never_panics(
            pos in 0usize..200, val in any::<u8>(), cut in 0usize..200,
        ) {
            let mut b = sample().encode();
            let p = pos % b.len();
            b[p] = val;
            b.truncate(b.len() - cut % b.len());
            let _ = Manifest::decode(&b);
        }

        #[test]
        fn round_trip_arbitrary(
            size in 0u64..(40 * 65536),
            seed in any::<u64>(),
        ) {
            let n = size.div_ceil(u64::from(CS));
            let entries = (0..n).map(|i| {
                if (seed >> (i % 64)) & 1 == 1 { None } else { Some(Digest::of(&i.to_le_bytes())) }
            });
            let m = Manifest::from_entries(size, CS, entries).unwrap();
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }
    }
}
