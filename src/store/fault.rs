//! A fault-injecting store wrapper, for tests.
//!
//! [`FaultStore`] forwards every call to an inner [`Store`] and, according to the [`Rule`]s
//! it holds, delays it, fails it (transiently or permanently), hangs it, or damages the bytes
//! a read returns (truncated, or one bit flipped). Rules fire on the Nth matching call, on the
//! first N, always, or with a probability drawn from a seeded PRNG, so a failing test can be
//! replayed. Everything can be changed while the store is in use (`set_down`, `set_hang`,
//! `set_delay`, `add_rule`), and the store counts calls and the most calls in flight at once,
//! which is how tests check the concurrency limit of the policy layer above it.
//!
//! Faults are checked in rule order; the first rule that fires decides what happens to the
//! call. `set_down` and `set_hang` win over every rule.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::{Store, StoreError};
use crate::error::ErrorKind;

/// A store operation, to aim a [`Rule`] at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    GetRange,
    Put,
    Head,
    List,
    Delete,
}

/// What happens to a call a rule fires on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Fail with an `Unavailable` error (retrying may help).
    Transient,
    /// Fail with a `PermissionDenied` error (retrying does not help).
    Permanent,
    /// Never answer (until the caller gives up).
    Hang,
    /// Wait this long, then do the call normally.
    Delay(Duration),
    /// Do the call, then return only the first half of the bytes read (reads only).
    Truncate,
    /// Do the call, then flip one bit of the bytes read (reads only, non-empty data).
    FlipBit,
}

/// When a rule fires, counted over the calls the rule matches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    /// On every matching call.
    Always,
    /// On the `n`th matching call only (1-based).
    Nth(u64),
    /// On the first `n` matching calls.
    FirstN(u64),
    /// On each matching call with this probability (0.0 to 1.0), from the seeded PRNG.
    Probability(f64),
}

/// A fault, when it fires, and which operation it is aimed at (`None`: every operation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub fault: Fault,
    pub when: When,
    pub op: Option<Op>,
}

impl Rule {
    /// `fault` on every call matching `op` (any call when `op` is `None`).
    pub fn new(fault: Fault, when: When, op: Option<Op>) -> Rule {
        Rule { fault, when, op }
    }
}

struct RuleState {
    rule: Rule,
    matched: u64,
}

struct Faults {
    rules: Vec<RuleState>,
    rng: SplitMix64,
}

/// A [`Store`] wrapper that injects faults; see the module docs.
pub struct FaultStore<S: ?Sized> {
    inner: Arc<S>,
    faults: Mutex<Faults>,
    down: AtomicBool,
    hang: AtomicBool,
    delay_ms: AtomicU64,
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl<S: Store + ?Sized> FaultStore<S> {
    /// Wrap `inner`, with no fault yet; `seed` drives the probabilistic rules.
    pub fn new(inner: Arc<S>, seed: u64) -> FaultStore<S> {
        FaultStore {
            inner,
            faults: Mutex::new(Faults {
                rules: Vec::new(),
                rng: SplitMix64(seed),
            }),
            down: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }

    /// The wrapped store (to arrange data behind the faults' back).
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Add a rule after the existing ones.
    pub fn add_rule(&self, rule: Rule) {
        self.faults
            .lock()
            .rules
            .push(RuleState { rule, matched: 0 });
    }

    /// Remove every rule.
    pub fn clear_rules(&self) {
        self.faults.lock().rules.clear();
    }

    /// While `down`, every call fails at once with an `Unavailable` error.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While hanging, every call waits forever (cancel it with a timeout).
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::SeqCst);
    }

    /// Delay every call by `delay` before doing it (`Duration::ZERO`: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many calls reached this store.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The most calls that were in progress at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The fault the rules decide for one call of `op`, if any.
    fn pick(&self, op: Op) -> Option<Fault> {
        let mut faults = self.faults.lock();
        let Faults { rules, rng } = &mut *faults;
        let mut picked = None;
        for state in rules.iter_mut() {
            if state.rule.op.is_some_and(|o| o != op) {
                continue;
            }
            state.matched += 1;
            let fires = match state.rule.when {
                When::Always => true,
                When::Nth(n) => state.matched == n,
                When::FirstN(n) => state.matched <= n,
                When::Probability(p) => rng.next_f64() < p,
            };
            if fires && picked.is_none() {
                picked = Some(state.rule.fault);
            }
        }
        picked
    }

    /// Run `call` for `op` under the faults in force, tracking the calls in flight.
    async fn run<T, F>(&self, op: Op, key: &str, call: F) -> Result<(T, Option<Fault>), StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight::enter(&self.in_flight, &self.max_in_flight);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(injected(key, ErrorKind::Unavailable));
        }
        let fault = self.pick(op);
        match fault {
            Some(Fault::Transient) => return Err(injected(key, ErrorKind::Unavailable)),
            Some(Fault::Permanent) => return Err(injected(key, ErrorKind::PermissionDenied)),
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(Fault::Truncate | Fault::FlipBit) | None => {}
        }
        Ok((call.await?, fault))
    }

    /// Apply a read-damaging fault to the bytes a read returned.
    fn damage(&self, data: Bytes, fault: Option<Fault>) -> Bytes {
        match fault {
            Some(Fault::Truncate) => data.slice(..data.len() / 2),
            Some(Fault::FlipBit) if !data.is_empty() => {
                let bit = self.faults.lock().rng.next_u64() % (data.len() as u64 * 8);
                let mut bytes = BytesMut::from(&data[..]);
                bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
                bytes.freeze()
            }
            _ => data,
        }
    }
}

fn injected(key: &str, kind: ErrorKind) -> StoreError {
    StoreError::Remote {
        key: key.to_string(),
        kind,
        source: format!("injected {kind:?} fault").into(),
    }
}

/// Counts one call in flight for as long as it lives, and records the maximum.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64, max: &AtomicU64) -> InFlight<'a> {
        let now = count.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A small seeded PRNG (SplitMix64): reproducible faults without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for FaultStore<S> {
    fn describe(&self) -> String {
        format!("fault:{}", self.inner.describe())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let (data, fault) = self
            .run(Op::GetRange, key, self.inner.get_range(key, range))
            .await?;
        Ok(self.damage(data, fault))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let (data, fault) = self.run(Op::Get, key, self.inner.get(key)).await?;
        Ok(self.damage(data, fault))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.run(Op::Put, key, self.inner.put(key, data))
            .await
            .map(|_| ())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.run(Op::Head, key, self.inner.head(key))
            .await
            .map(|(v, _)| v)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.run(Op::List, prefix, self.inner.list(prefix))
            .await
            .map(|(v, _)| v)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(Op::Delete, key, self.inner.delete(key))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;
    use crate::store::mem::MemStore;

    async fn store_with(data: &'static [u8]) -> FaultStore<MemStore> {
        let mem = Arc::new(MemStore::new());
        mem.put("k", Bytes::from_static(data)).await.unwrap();
        FaultStore::new(mem, 7)
    }

    #[tokio::test]
    async fn nth_rule_fails_only_the_nth_call() {
        let store = store_with(b"abc").await;
        store.add_rule(Rule::new(Fault::Transient, When::Nth(2), Some(Op::Get)));

        let results = [
            store.get("k").await.is_ok(),
            store.get("k").await.is_ok(),
            store.get("k").await.is_ok(),
        ];

        assert_eq!(results, [true, false, true]);
    }

    #[tokio::test]
    async fn permanent_fault_is_not_transient() {
        let store = store_with(b"abc").await;
        store.add_rule(Rule::new(Fault::Permanent, When::Always, None));

        let err = store.head("k").await.unwrap_err();

        assert!(!err.kind().is_transient());
    }

    #[tokio::test]
    async fn truncate_returns_half_the_range() {
        let store = store_with(b"abcdefgh").await;
        store.add_rule(Rule::new(Fault::Truncate, When::Always, Some(Op::GetRange)));

        let data = store.get_range("k", 0..8).await.unwrap();

        assert_eq!(&data[..], b"abcd");
    }

    #[tokio::test]
    async fn flip_bit_changes_exactly_one_bit() {
        let store = store_with(b"abcdefgh").await;
        store.add_rule(Rule::new(Fault::FlipBit, When::Always, None));

        let data = store.get("k").await.unwrap();

        let flipped: u32 = data
            .iter()
            .zip(b"abcdefgh")
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(flipped, 1);
    }

    #[tokio::test]
    async fn probability_rule_is_reproducible_from_the_seed() {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let store = store_with(b"abc").await;
            store.add_rule(Rule::new(Fault::Transient, When::Probability(0.5), None));
            let mut run = Vec::new();
            for _ in 0..32 {
                run.push(store.get("k").await.is_ok());
            }
            outcomes.push(run);
        }

        assert_eq!(outcomes[0], outcomes[1]);
        assert!(outcomes[0].contains(&true) && outcomes[0].contains(&false));
    }

    #[tokio::test]
    async fn down_store_fails_every_call_until_back_up() {
        let store = store_with(b"abc").await;

        store.set_down(true);
        let down = store.get("k").await.unwrap_err();
        store.set_down(false);
        let up = store.get("k").await;

        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(up.is_ok());
    }
}
