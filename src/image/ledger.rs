//! In-flight chunk references of imports. (Stub: filled in by the store/image work.)

/// Chunk references held by imports that are not committed yet.
#[derive(Default)]
pub struct ChunkLedger {}

/// Releases an import's ledger references when dropped.
pub struct LedgerGuard {}
