use std::sync::Arc;

use proptest::prelude::*;

use super::sim::{CrashMode, SimRng, SimStorage};
use super::*;

const B: usize = BLOCK as usize;

fn base_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

fn new_overlay(blocks: usize) -> (SimStorage, Overlay, Vec<u8>) {
    let s = SimStorage::new();
    let base = base_of(blocks * B);
    let ov = Overlay::create(Arc::new(s.clone()), (blocks * B) as u64, base.len() as u64).unwrap();
    (s, ov, base)
}

#[allow(clippy::ptr_arg)] // `&Vec<u8>` is the `BaseRead` in these tests
fn read(ov: &Overlay, base: &Vec<u8>, off: usize, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    ov.read(off as u64, &mut b, base).unwrap();
    b
}

#[test]
fn unwritten_blocks_read_from_base() {
    let (_s, ov, base) = new_overlay(4);
    assert_eq!(read(&ov, &base, 100, 3 * B), base[100..100 + 3 * B]);
    assert_eq!(ov.allocated_bytes(), 0);
}

#[test]
fn aligned_write_reads_back_and_allocates_one_block() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(B as u64, &[7u8; B], false, &base).unwrap();
    assert_eq!(read(&ov, &base, B, B), vec![7u8; B]);
    assert_eq!(read(&ov, &base, 0, B), base[..B]);
    assert_eq!(ov.allocated_bytes(), BLOCK);
}

#[test]
fn aligned_write_never_reads_the_base() {
    struct Failing;
    impl BaseRead for Failing {
        fn read_base(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            panic!("aligned writes must not copy up from the base")
        }
    }
    let (_s, ov, _base) = new_overlay(4);
    ov.write(0, &[1u8; 2 * B], false, &Failing).unwrap();
}

#[test]
fn unaligned_write_merges_with_base_block() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(B as u64 + 10, &[9u8; 20], false, &base).unwrap();
    let mut want = base[B..2 * B].to_vec();
    want[10..30].fill(9);
    assert_eq!(read(&ov, &base, B, B), want);
}

#[test]
fn unaligned_write_spanning_blocks_merges_with_overlay_blocks() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(0, &[1u8; 3 * B], false, &base).unwrap();
    ov.write(B as u64 - 5, &[2u8; B + 10], false, &base)
        .unwrap();
    let mut want = vec![1u8; 3 * B];
    want[B - 5..2 * B + 5].fill(2);
    assert_eq!(read(&ov, &base, 0, 3 * B), want);
}

#[test]
fn trimmed_block_reads_zero_not_base() {
    let (_s, ov, base) = new_overlay(4);
    ov.trim(0, 2 * B as u64, false, &base).unwrap();
    assert_eq!(read(&ov, &base, 0, 2 * B), vec![0u8; 2 * B]);
    assert_eq!(read(&ov, &base, 2 * B, B), base[2 * B..3 * B]);
}

#[test]
fn partial_write_zeroes_zeroes_only_its_bytes() {
    let (_s, ov, base) = new_overlay(4);
    ov.write_zeroes(100, 50, false, &base).unwrap();
    let mut want = base[..B].to_vec();
    want[100..150].fill(0);
    assert_eq!(read(&ov, &base, 0, B), want);
}

#[test]
fn trim_releases_overlay_blocks_after_flush() {
    let (_s, ov, base) = new_overlay(8);
    ov.write(0, &[3u8; 4 * B], false, &base).unwrap();
    ov.trim(0, 4 * B as u64, false, &base).unwrap();
    ov.flush().unwrap();
    assert_eq!(ov.allocated_bytes(), 0);
}

#[test]
fn freed_block_is_not_reused_before_the_trim_is_durable() {
    let (s, ov, base) = new_overlay(8);
    ov.write(0, &[3u8; B], false, &base).unwrap();
    ov.flush().unwrap();
    ov.trim(0, B as u64, false, &base).unwrap();
    ov.write(B as u64, &[4u8; B], false, &base).unwrap();
    // Power loss: the trim is lost, so block 0 must still read its flushed data.
    let after = s.crash(CrashMode::ProcessDeath, &mut SimRng::new(1));
    drop(ov);
    let ov = Overlay::open(Arc::new(after)).unwrap();
    assert_eq!(read(&ov, &base, 0, B), vec![3u8; B]);
}

#[test]
fn fua_write_survives_power_loss() {
    let (s, ov, base) = new_overlay(4);
    ov.write(0, &[5u8; B], true, &base).unwrap();
    let after = s.crash(CrashMode::PowerLoss, &mut SimRng::new(1));
    drop(ov);
    let ov = Overlay::open(Arc::new(after)).unwrap();
    assert_eq!(read(&ov, &base, 0, B), vec![5u8; B]);
}

#[test]
fn unflushed_write_may_be_lost_on_power_loss_but_never_garbage() {
    let (s, ov, base) = new_overlay(4);
    ov.write(0, &[5u8; B], false, &base).unwrap();
    let after = s.crash(CrashMode::PowerLoss, &mut SimRng::new(1));
    drop(ov);
    let ov = Overlay::open(Arc::new(after)).unwrap();
    assert_eq!(read(&ov, &base, 0, B), base[..B]);
}

#[test]
fn reopen_after_clean_close_keeps_everything() {
    let (s, ov, base) = new_overlay(4);
    ov.write(10, &[5u8; 3 * B], false, &base).unwrap();
    ov.snapshot("a").unwrap();
    ov.trim(0, B as u64, false, &base).unwrap();
    let want = read(&ov, &base, 0, 4 * B);
    ov.close().unwrap();
    let after = s.crash(CrashMode::PowerLoss, &mut SimRng::new(1));
    let ov = Overlay::open(Arc::new(after)).unwrap();
    assert_eq!(read(&ov, &base, 0, 4 * B), want);
    assert_eq!(ov.list_snapshots()[0].name, "a");
}

#[test]
fn open_without_overlay_is_not_found() {
    assert!(matches!(
        Overlay::open(Arc::new(SimStorage::new())),
        Err(OverlayError::NotFound)
    ));
}

#[test]
fn create_over_existing_overlay_is_refused() {
    let (s, _ov, _base) = new_overlay(4);
    assert!(matches!(
        Overlay::create(Arc::new(s), 4096, 4096),
        Err(OverlayError::AlreadyExists)
    ));
}

#[test]
fn write_past_end_is_out_of_range() {
    let (_s, ov, base) = new_overlay(4);
    let r = ov.write(4 * BLOCK - 1, &[1, 2], false, &base);
    assert!(matches!(r, Err(OverlayError::OutOfRange { .. })));
    assert_eq!(io::Error::from(r.unwrap_err()).raw_os_error(), None);
}

#[test]
fn resize_grows_with_zeros_not_base() {
    let (_s, ov, base) = new_overlay(2);
    ov.resize(4 * BLOCK).unwrap();
    assert_eq!(ov.size(), 4 * BLOCK);
    assert_eq!(read(&ov, &base, 2 * B, 2 * B), vec![0u8; 2 * B]);
    assert!(matches!(ov.resize(BLOCK), Err(OverlayError::Shrink { .. })));
}

#[test]
fn base_shorter_than_a_block_reads_zeros_past_its_end() {
    let s = SimStorage::new();
    let base = base_of(B + 100);
    let ov = Overlay::create(Arc::new(s), 2 * BLOCK, base.len() as u64).unwrap();
    let got = read(&ov, &base, B, B);
    assert_eq!(got[..100], base[B..B + 100]);
    assert!(got[100..].iter().all(|&b| b == 0));
    ov.write(B as u64 + 200, &[1], false, &base).unwrap();
    let got = read(&ov, &base, B, B);
    assert_eq!(got[..100], base[B..B + 100]);
    assert_eq!(got[200], 1);
}

#[test]
fn snapshot_keeps_its_content_after_overwrite_redirect_on_write() {
    let (s, ov, base) = new_overlay(4);
    ov.write(0, &[1u8; B], false, &base).unwrap();
    ov.snapshot("s").unwrap();
    ov.write(0, &[2u8; B], false, &base).unwrap();
    assert_eq!(ov.allocated_bytes(), 2 * BLOCK);
    let c = ov.clone_snapshot("s", Arc::new(SimStorage::new())).unwrap();
    assert_eq!(read(&c, &base, 0, B), vec![1u8; B]);
    assert_eq!(read(&ov, &base, 0, B), vec![2u8; B]);
    drop(s);
}

#[test]
fn revert_restores_snapshot_content_and_size() {
    let (_s, ov, base) = new_overlay(2);
    ov.write(0, &[1u8; B], false, &base).unwrap();
    ov.snapshot("s").unwrap();
    ov.write(0, &[2u8; 2 * B], false, &base).unwrap();
    ov.resize(3 * BLOCK).unwrap();
    ov.revert("s").unwrap();
    assert_eq!(ov.size(), 2 * BLOCK);
    assert_eq!(read(&ov, &base, 0, B), vec![1u8; B]);
    assert_eq!(read(&ov, &base, B, B), base[B..2 * B]);
}

#[test]
fn delete_snapshot_releases_its_blocks() {
    let (_s, ov, base) = new_overlay(2);
    ov.write(0, &[1u8; B], false, &base).unwrap();
    ov.snapshot("s").unwrap();
    ov.write(0, &[2u8; B], false, &base).unwrap();
    ov.delete_snapshot("s").unwrap();
    assert_eq!(ov.allocated_bytes(), BLOCK);
    assert!(ov.list_snapshots().is_empty());
    assert!(matches!(
        ov.delete_snapshot("s"),
        Err(OverlayError::SnapshotNotFound(_))
    ));
}

#[test]
fn snapshot_names_are_unique_and_validated() {
    let (_s, ov, _base) = new_overlay(2);
    ov.snapshot("a").unwrap();
    assert!(matches!(
        ov.snapshot("a"),
        Err(OverlayError::SnapshotExists(_))
    ));
    assert!(matches!(ov.snapshot(""), Err(OverlayError::InvalidName(_))));
}

#[test]
fn clone_from_snapshot_is_independent() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(0, &[1u8; 2 * B], false, &base).unwrap();
    ov.trim(3 * B as u64, B as u64, false, &base).unwrap();
    ov.snapshot("s").unwrap();
    let cs = SimStorage::new();
    let c = ov.clone_snapshot("s", Arc::new(cs.clone())).unwrap();
    ov.write(0, &[9u8; B], false, &base).unwrap();
    c.write(B as u64, &[8u8; B], false, &base).unwrap();
    c.flush().unwrap();
    drop(c);
    let c = Overlay::open(Arc::new(cs)).unwrap();
    assert_eq!(read(&c, &base, 0, B), vec![1u8; B]);
    assert_eq!(read(&c, &base, B, B), vec![8u8; B]);
    assert_eq!(read(&c, &base, 2 * B, B), base[2 * B..3 * B]);
    assert_eq!(read(&c, &base, 3 * B, B), vec![0u8; B]);
    assert_eq!(read(&ov, &base, B, B), vec![1u8; B]);
}

#[test]
fn hydrate_never_overwrites_guest_data() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(B as u64, &[7u8; B], false, &base).unwrap();
    ov.trim(2 * B as u64, B as u64, false, &base).unwrap();
    let n = ov.hydrate(0, &base[..4 * B]).unwrap();
    assert_eq!(n, 2);
    assert_eq!(read(&ov, &base, B, B), vec![7u8; B]);
    assert_eq!(read(&ov, &base, 2 * B, B), vec![0u8; B]);
    assert_eq!(read(&ov, &base, 0, B), base[..B]);
    assert!(ov.is_fully_allocated());
}

/// A base that must never be read.
struct NoBaseRead;
impl BaseRead for NoBaseRead {
    fn read_base(&self, offset: u64, _: &mut [u8]) -> io::Result<()> {
        panic!("read the base at {offset} after a full hydrate")
    }
}

fn read_no_base(ov: &Overlay, off: usize, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    ov.read(off as u64, &mut b, &NoBaseRead).unwrap();
    b
}

#[test]
fn hydrate_fills_snapshots_that_still_read_the_base() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(B as u64, &[1u8; B], false, &base).unwrap();
    ov.snapshot("s").unwrap();
    ov.write(0, &[2u8; B], false, &base).unwrap();
    // Current: guest 0, guest 1, base 2-3; snapshot: base 0, guest 1, base 2-3.
    assert_eq!(
        ov.unallocated_ranges(0, u64::MAX, 10),
        vec![(0, BLOCK), (2 * BLOCK, 2 * BLOCK)]
    );

    let n = ov.hydrate(0, &base[..4 * B]).unwrap();

    assert_eq!(n, 3);
    assert!(ov.is_fully_allocated());
    // Blocks 2 and 3 are shared by both maps; block 0 of the snapshot has its own.
    assert_eq!(ov.allocated_bytes(), 5 * BLOCK);
    ov.revert("s").unwrap();
    assert_eq!(read_no_base(&ov, 0, B), base[..B]);
    assert_eq!(read_no_base(&ov, B, B), vec![1u8; B]);
    assert_eq!(read_no_base(&ov, 2 * B, 2 * B), base[2 * B..4 * B]);
}

#[test]
fn snapshot_fills_survive_reopen_after_sync_all() {
    let (s, ov, base) = new_overlay(4);
    ov.snapshot("s").unwrap();
    ov.write(0, &[3u8; 4 * B], false, &base).unwrap();
    ov.hydrate(0, &base[..4 * B]).unwrap();

    ov.sync_all().unwrap();
    drop(ov);
    let ov = Overlay::open(Arc::new(s)).unwrap();

    assert!(ov.is_fully_allocated());
    let c = ov.clone_snapshot("s", Arc::new(SimStorage::new())).unwrap();
    assert_eq!(read_no_base(&c, 0, 4 * B), base[..4 * B]);
}

#[test]
fn unallocated_range_is_capped_and_skips_allocated_runs() {
    let (_s, ov, base) = new_overlay(2048);
    ov.write(0, &vec![1u8; 1000 * B], false, &base).unwrap();

    let r = ov.next_unallocated(0, 16 * BLOCK);
    let rest = ov.unallocated_ranges(0, u64::MAX, 10);

    assert_eq!(r, Some((1000 * BLOCK, 16 * BLOCK)));
    assert_eq!(rest, vec![(1000 * BLOCK, 1048 * BLOCK)]);
    assert_eq!(
        ov.next_unallocated(1040 * BLOCK + 100, BLOCK),
        Some((1040 * BLOCK + 100, BLOCK - 100))
    );
}

#[test]
fn hydrate_rejects_unaligned_ranges() {
    let (_s, ov, base) = new_overlay(4);
    assert!(matches!(
        ov.hydrate(1, &base[..B]),
        Err(OverlayError::Unaligned)
    ));
}

#[test]
fn unallocated_ranges_lists_base_blocks_in_order() {
    let (_s, ov, base) = new_overlay(8);
    ov.write(2 * B as u64, &[1u8; 2 * B], false, &base).unwrap();
    ov.trim(6 * B as u64, B as u64, false, &base).unwrap();
    assert_eq!(
        ov.unallocated_ranges(0, u64::MAX, 10),
        vec![(0, 2 * BLOCK), (4 * BLOCK, 2 * BLOCK), (7 * BLOCK, BLOCK)]
    );
    assert_eq!(ov.unallocated_ranges(0, u64::MAX, 1).len(), 1);
    assert!(!ov.is_fully_allocated());
}

#[test]
fn map_answers_where_bytes_live() {
    let (_s, ov, base) = new_overlay(4);
    ov.write(B as u64, &[1u8; B], false, &base).unwrap();
    ov.trim(2 * B as u64, B as u64, false, &base).unwrap();
    let plan = ov.map(0, 4 * BLOCK).unwrap();
    let m = plan.mappings();
    assert_eq!(m.len(), 4);
    assert!(matches!(m[0], Mapping::Base { offset: 0, len } if len == BLOCK));
    assert!(matches!(m[1], Mapping::Overlay { len, .. } if len == BLOCK));
    assert!(matches!(m[2], Mapping::Zero { len, .. } if len == BLOCK));
    assert!(matches!(m[3], Mapping::Base { .. }));
}

#[test]
fn checkpoint_during_flush_keeps_state() {
    let (s, ov, base) = new_overlay(16);
    ov.set_journal_limit(100);
    for i in 0..16u8 {
        ov.write(i as u64 * BLOCK, &[i + 1; B], false, &base)
            .unwrap();
        ov.flush().unwrap();
    }
    ov.trim(0, BLOCK, true, &base).unwrap();
    let after = s.crash(CrashMode::PowerLoss, &mut SimRng::new(2));
    drop(ov);
    let ov = Overlay::open(Arc::new(after)).unwrap();
    assert_eq!(read(&ov, &base, 0, B), vec![0u8; B]);
    for i in 1..16u8 {
        assert_eq!(read(&ov, &base, i as usize * B, B), vec![i + 1; B]);
    }
}

#[test]
fn concurrent_unaligned_writes_to_one_block_both_land() {
    let (_s, ov, base) = new_overlay(2);
    let ov = Arc::new(ov);
    let base = Arc::new(base);
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let (ov, base) = (ov.clone(), base.clone());
            std::thread::spawn(move || {
                for r in 0..50 {
                    let off = (t * 512 + (r % 2) * 4096) as u64;
                    ov.write(off, &[t as u8 + 1; 512], r % 7 == 0, &*base)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let got = read(&ov, &base, 0, 2 * B);
    for t in 0..8 {
        assert!(got[t * 512..(t + 1) * 512]
            .iter()
            .all(|&b| b == t as u8 + 1));
        assert!(got[B + t * 512..B + (t + 1) * 512]
            .iter()
            .all(|&b| b == t as u8 + 1));
    }
}

#[test]
fn crash_harness_few_hundred_rounds() {
    let s = harness::run(1000, 300);
    assert!(s.failures.is_empty(), "{}", s.failures.join("\n"));
    assert_eq!(s.rounds, 300);
    assert!(s.crashes.iter().all(|&c| c > 0));
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, byte: u8 },
    Zero { off: u64, len: u64 },
    Flush,
    Hydrate { block: u64 },
    Snapshot,
    Revert,
}

fn op() -> impl Strategy<Value = Op> {
    const SIZE: u64 = 8 * BLOCK;
    prop_oneof![
        4 => (0..SIZE, 1usize..3 * B, any::<u8>()).prop_map(|(off, len, byte)| Op::Write {
            off,
            len: len.min((SIZE - off) as usize),
            byte
        }),
        2 => (0..SIZE, 1u64..3 * BLOCK).prop_map(|(off, len)| Op::Zero {
            off,
            len: len.min(SIZE - off)
        }),
        1 => Just(Op::Flush),
        1 => (0u64..8).prop_map(|block| Op::Hydrate { block }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Revert),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_ops_match_a_plain_vec(ops in proptest::collection::vec(op(), 1..60)) {
        let (_s, ov, base) = new_overlay(8);
        let mut model = base.clone();
        let mut snap: Option<Vec<u8>> = None;
        for (i, o) in ops.iter().enumerate() {
            match o {
                Op::Write { off, len, byte } => {
                    ov.write(*off, &vec![*byte; *len], false, &base).unwrap();
                    model[*off as usize..*off as usize + len].fill(*byte);
                }
                Op::Zero { off, len } => {
                    ov.write_zeroes(*off, *len, false, &base).unwrap();
                    model[*off as usize..(*off + *len) as usize].fill(0);
                }
                Op::Flush => ov.flush().unwrap(),
                Op::Hydrate { block } => {
                    let s = (*block * BLOCK) as usize;
                    ov.hydrate(*block * BLOCK, &base[s..s + B]).unwrap();
                }
                Op::Snapshot => {
                    if snap.is_some() {
                        ov.delete_snapshot("p").unwrap();
                    }
                    ov.snapshot("p").unwrap();
                    snap = Some(model.clone());
                }
                Op::Revert => {
                    if let Some(s) = &snap {
                        ov.revert("p").unwrap();
                        model = s.clone();
                    }
                }
            }
            prop_assert_eq!(&read(&ov, &base, 0, 8 * B), &model, "after op {} {:?}", i, o);
        }
    }
}

#[test]
fn snapshot_view_stays_right_while_the_volume_changes_and_the_snapshot_goes() {
    const BLOCKS: usize = 64;
    let (_s, ov, base) = new_overlay(BLOCKS);
    let ov = Arc::new(ov);
    ov.write(0, &[1u8; 8 * B], false, &base).unwrap();
    ov.write(10 * BLOCK + 100, &[2u8; 5000], false, &base)
        .unwrap();
    ov.trim(20 * BLOCK, 4 * BLOCK, false, &base).unwrap();
    ov.hydrate(30 * BLOCK, &base[30 * B..32 * B]).unwrap();
    ov.snapshot("s1").unwrap();
    let want = read(&ov, &base, 0, BLOCKS * B);
    let view = ov.snapshot_view("s1").unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);

    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut rng = SimRng::new(11);
            // Make s1's blocks its own, then drop s1: unpinned, they would be freed here...
            ov.write(0, &[3u8; 8 * B], false, &base).unwrap();
            ov.write(10 * BLOCK, &[4u8; 2 * B], false, &base).unwrap();
            ov.snapshot("s2").unwrap();
            ov.delete_snapshot("s1").unwrap();
            ov.flush().unwrap();
            // ...and reused by these writes.
            for i in 0..300u64 {
                let off = rng.below((BLOCKS * B) as u64 - 3 * BLOCK);
                let len = 1 + rng.below(3 * BLOCK) as usize;
                let byte = 5 + (i % 200) as u8;
                match i % 12 {
                    0 => ov.trim(off, len as u64, false, &base).unwrap(),
                    1 => ov.flush().unwrap(),
                    2 => {
                        let b = rng.below(BLOCKS as u64) as usize;
                        ov.hydrate(b as u64 * BLOCK, &base[b * B..(b + 1) * B])
                            .unwrap();
                    }
                    _ => ov.write(off, &vec![byte; len], i % 7 == 0, &base).unwrap(),
                }
                if i == 150 {
                    ov.snapshot("s3").unwrap();
                    ov.delete_snapshot("s2").unwrap();
                }
            }
            ov.flush().unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut rng = SimRng::new(12);
        let mut reads = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || reads < 200 {
            let off = rng.below((BLOCKS * B) as u64) as usize;
            let len = 1 + rng.below((4 * B).min(BLOCKS * B - off) as u64) as usize;
            let mut got = vec![0u8; len];
            view.read(off as u64, &mut got, &base).unwrap();
            assert!(got == want[off..off + len], "view read {off}+{len} changed");
            reads += 1;
        }
    });
    let mut all = vec![0u8; BLOCKS * B];
    view.read(0, &mut all, &base).unwrap();
    let pinned = ov.allocated_bytes();
    drop(view);
    ov.flush().unwrap();

    assert!(all == want, "the view's content changed");
    assert_eq!(ov.list_snapshots()[0].name, "s3");
    assert!(
        ov.allocated_bytes() < pinned,
        "s1's blocks are released once the view is gone ({} of {pinned})",
        ov.allocated_bytes()
    );
}
