//! Byte layouts of the overlay's metadata files (see `docs/overlay-format.md`): superblock
//! slots, checkpoints and journal records. Pure encoding and decoding; decoding treats its
//! input as untrusted and never panics.

use super::map::{BlockMap, Entry, BLOCK};

pub const SUPER_MAGIC: &[u8; 8] = b"IMGCOVL1";
pub const CKPT_MAGIC: &[u8; 8] = b"IMGCCKPT";
pub const FORMAT_VERSION: u32 = 1;
/// Size of one superblock slot; slot `g % 2` lives at `(g % 2) * SUPER_SLOT_STRIDE`.
pub const SUPER_SLOT_LEN: usize = 512;
pub const SUPER_SLOT_STRIDE: u64 = 4096;
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest payload a record may declare (a snapshot name is at most 255 bytes).
pub const MAX_RECORD_PAYLOAD: usize = 1024;
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// One superblock slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub ckpt_len: u64,
    pub ckpt_crc: u32,
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPER_SLOT_LEN] {
        let mut b = [0u8; SUPER_SLOT_LEN];
        b[0..8].copy_from_slice(SUPER_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.ckpt_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.ckpt_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..508]);
        b[508..512].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` if the slot is empty, torn or not ours. A slot of a newer format version is
    /// `Err(version)`.
    pub fn decode(b: &[u8]) -> Result<Option<Superblock>, u32> {
        if b.len() < SUPER_SLOT_LEN || &b[0..8] != SUPER_MAGIC {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(b[508..512].try_into().unwrap_or_default());
        if crc != crc32fast::hash(&b[..508]) {
            return Ok(None);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != FORMAT_VERSION {
            return Err(version);
        }
        let block = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
        if block as u64 != BLOCK {
            return Ok(None);
        }
        Ok(Some(Superblock {
            generation: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
            ckpt_len: u64::from_le_bytes(b[24..32].try_into().unwrap_or_default()),
            ckpt_crc: u32::from_le_bytes(b[32..36].try_into().unwrap_or_default()),
        }))
    }
}

/// One journal record's effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Set `count` blocks from `l` to `first.nth(i)`.
    SetRun {
        l: u64,
        count: u64,
        first: Entry,
    },
    Snapshot(String),
    DeleteSnapshot(String),
    Revert(String),
    Resize(u64),
}

const T_SET_RUN: u8 = 1;
const T_SNAPSHOT: u8 = 2;
const T_DELETE: u8 = 3;
const T_REVERT: u8 = 4;
const T_RESIZE: u8 = 5;

impl Record {
    /// Append the record (header and payload) to `out`.
    pub fn encode(&self, generation: u64, seq: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        match self {
            Record::SetRun { l, count, first } => {
                out.push(T_SET_RUN);
                out.extend_from_slice(&l.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&first.encode().to_le_bytes());
            }
            Record::Snapshot(n) | Record::DeleteSnapshot(n) | Record::Revert(n) => {
                out.push(match self {
                    Record::Snapshot(_) => T_SNAPSHOT,
                    Record::DeleteSnapshot(_) => T_DELETE,
                    _ => T_REVERT,
                });
                out.extend_from_slice(&(n.len() as u16).to_le_bytes());
                out.extend_from_slice(n.as_bytes());
            }
            Record::Resize(size) => {
                out.push(T_RESIZE);
                out.extend_from_slice(&size.to_le_bytes());
            }
        }
        let len = (out.len() - start - RECORD_HEADER_LEN) as u32;
        out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        out[start + 8..start + 16].copy_from_slice(&generation.to_le_bytes());
        out[start + 16..start + 24].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32fast::hash(&out[start + 4..]);
        out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode the record at the start of `b` if it is intact and belongs to `generation` with
    /// sequence number `seq`; returns it and its total length. `None` marks the end of the
    /// journal (torn, stale or absent record).
    pub fn decode(b: &[u8], generation: u64, seq: u64) -> Option<(Record, usize)> {
        let mut c = Cursor(b);
        let crc = c.u32()?;
        let len = c.u32()? as usize;
        if len > MAX_RECORD_PAYLOAD || b.len() < RECORD_HEADER_LEN + len {
            return None;
        }
        if crc32fast::hash(&b[4..RECORD_HEADER_LEN + len]) != crc {
            return None;
        }
        if c.u64()? != generation || c.u64()? != seq {
            return None;
        }
        let mut p = Cursor(&b[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]);
        let rec = match p.u8()? {
            T_SET_RUN => Record::SetRun {
                l: p.u64()?,
                count: p.u64()?,
                first: Entry::decode(p.u32()?),
            },
            t @ (T_SNAPSHOT | T_DELETE | T_REVERT) => {
                let n = p.name()?;
                match t {
                    T_SNAPSHOT => Record::Snapshot(n),
                    T_DELETE => Record::DeleteSnapshot(n),
                    _ => Record::Revert(n),
                }
            }
            T_RESIZE => Record::Resize(p.u64()?),
            _ => return None,
        };
        Some((rec, RECORD_HEADER_LEN + len))
    }
}

/// A map as stored in a checkpoint.
#[derive(Clone)]
pub struct StoredMap {
    pub name: String,
    pub size: u64,
    pub map: BlockMap,
}

/// Everything a checkpoint holds.
pub struct Checkpoint {
    pub generation: u64,
    pub next_seq: u64,
    pub base_len: u64,
    /// The current map (empty name) first, then the snapshots.
    pub current: StoredMap,
    pub snapshots: Vec<StoredMap>,
}

fn encode_map(m: &StoredMap, out: &mut Vec<u8>) {
    out.extend_from_slice(&(m.name.len() as u16).to_le_bytes());
    out.extend_from_slice(m.name.as_bytes());
    out.extend_from_slice(&m.size.to_le_bytes());
    let runs = m.map.runs();
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (l, n, e) in runs {
        out.extend_from_slice(&l.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&e.encode().to_le_bytes());
    }
}

fn decode_map(c: &mut Cursor) -> Option<StoredMap> {
    let name = c.name()?;
    let size = c.u64()?;
    let nruns = c.u64()?;
    if size > super::MAX_SIZE {
        return None;
    }
    let blocks = size.div_ceil(BLOCK);
    let mut map = BlockMap::new(blocks);
    for _ in 0..nruns {
        let l = c.u64()?;
        let n = c.u64()?;
        let e = Entry::decode(c.u32()?);
        if l.checked_add(n)? > blocks || e == Entry::Base {
            return None;
        }
        if let Entry::Data(p) = e {
            if (p as u64).checked_add(n)? > super::map::MAX_PHYS as u64 {
                return None;
            }
        }
        map.set_run(l, n, e, &mut |_| {});
    }
    Some(StoredMap { name, size, map })
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(CKPT_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.next_seq.to_le_bytes());
        out.extend_from_slice(&self.current.size.to_le_bytes());
        out.extend_from_slice(&self.base_len.to_le_bytes());
        out.extend_from_slice(&(self.snapshots.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 12]);
        encode_map(&self.current, &mut out);
        for s in &self.snapshots {
            encode_map(s, &mut out);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a whole checkpoint; `None` if anything is malformed or the checksum is wrong.
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() < 68 {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut c = Cursor(body);
        if c.take(8)? != CKPT_MAGIC || c.u32()? != FORMAT_VERSION || c.u32()? as u64 != BLOCK {
            return None;
        }
        let generation = c.u64()?;
        let next_seq = c.u64()?;
        let size = c.u64()?;
        let base_len = c.u64()?;
        let nsnap = c.u32()?;
        c.take(12)?;
        let current = decode_map(&mut c)?;
        if current.size != size || !current.name.is_empty() {
            return None;
        }
        let mut snapshots = Vec::new();
        for _ in 0..nsnap {
            snapshots.push(decode_map(&mut c)?);
        }
        if !c.0.is_empty() {
            return None;
        }
        Some(Checkpoint {
            generation,
            next_seq,
            base_len,
            current,
            snapshots,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        if n > MAX_SNAPSHOT_NAME {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrips_and_rejects_wrong_generation_or_seq() {
        let r = Record::SetRun {
            l: 9,
            count: 3,
            first: Entry::Data(77),
        };
        let mut b = Vec::new();
        r.encode(5, 11, &mut b);
        assert_eq!(Record::decode(&b, 5, 11), Some((r, b.len())));
        assert!(Record::decode(&b, 6, 11).is_none());
        assert!(Record::decode(&b, 5, 12).is_none());
    }

    #[test]
    fn torn_record_is_rejected() {
        let mut b = Vec::new();
        Record::Snapshot("s1".into()).encode(1, 1, &mut b);
        for cut in 0..b.len() {
            assert!(Record::decode(&b[..cut], 1, 1).is_none());
        }
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(Record::decode(&b, 1, 1).is_none());
    }

    #[test]
    fn checkpoint_roundtrips() {
        let mut m = BlockMap::new(1000);
        m.set_run(3, 2, Entry::Data(10), &mut |_| {});
        m.set_run(600, 1, Entry::Zero, &mut |_| {});
        let c = Checkpoint {
            generation: 4,
            next_seq: 99,
            base_len: 1000 * BLOCK,
            current: StoredMap {
                name: String::new(),
                size: 1000 * BLOCK,
                map: m.clone(),
            },
            snapshots: vec![StoredMap {
                name: "a".into(),
                size: 1000 * BLOCK,
                map: m,
            }],
        };
        let b = c.encode();
        let d = Checkpoint::decode(&b).unwrap();
        assert_eq!(d.next_seq, 99);
        assert_eq!(d.current.map.runs(), c.current.map.runs());
        assert_eq!(d.snapshots[0].name, "a");
        let mut bad = b.clone();
        bad[70] ^= 1;
        assert!(Checkpoint::decode(&bad).is_none());
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let mut rng = crate::overlay::sim::SimRng::new(3);
        for _ in 0..2000 {
            let n = rng.below(200) as usize;
            let b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let _ = Record::decode(&b, 1, 1);
            let _ = Checkpoint::decode(&b);
            let _ = Superblock::decode(&b);
        }
    }
}
