//! The store policy layer: timeouts, retries, a concurrency limit and counters.
//!
//! This is the only place in imgcache that retries or backs off. Backends make one attempt
//! per call and classify their failures ([`crate::error::ErrorKind`]); [`RetryStore`] wraps any backend and:
//!
//! - bounds each attempt by [`RetryPolicy::timeout`] (a hanging attempt becomes a
//!   [`StoreError::Timeout`]);
//! - retries failures whose kind is transient ([`crate::error::ErrorKind::is_transient`]: `Unavailable`,
//!   `Timeout`) up to [`RetryPolicy::retries`] times, sleeping a full-jitter exponential
//!   backoff between attempts (uniform in `0..=min(max_backoff, base_backoff * 2^n)`), and never
//!   past [`RetryPolicy::deadline`] from the start of the call; anything else is returned at
//!   once;
//! - lets at most [`RetryPolicy::max_concurrency`] attempts reach the backend at once (a
//!   permit is held for one attempt, not across backoff sleeps); waiting for a permit counts
//!   against the deadline;
//! - counts calls, attempts, bytes, retries, errors and timeouts ([`RetryStore::stats`]).
//!
//! Every operation is retried, `put` included: a put replaces its object atomically, so doing
//! it twice is harmless.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Store, StoreError};
use crate::error::Classify;

/// How a [`RetryStore`] treats the calls it forwards.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The longest one attempt may take.
    pub timeout: Duration,
    /// How many times a transiently failed call is tried again (0: one attempt only).
    pub retries: u32,
    /// The longest one call may take, all attempts, backoffs and queueing included.
    pub deadline: Duration,
    /// The backoff cap before the first retry; doubles with every retry.
    pub base_backoff: Duration,
    /// The largest backoff cap.
    pub max_backoff: Duration,
    /// The most attempts in progress at once against the backend.
    pub max_concurrency: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(30),
            retries: 4,
            deadline: Duration::from_secs(120),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_concurrency: 16,
        }
    }
}

/// A snapshot of a [`RetryStore`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Calls made to the wrapper.
    pub calls: u64,
    /// Attempts sent to the backend (calls plus retries).
    pub requests: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes sent by successful puts.
    pub bytes_written: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Calls that failed (after their retries).
    pub errors: u64,
    /// Attempts that hit the per-attempt timeout or the deadline.
    pub timeouts: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
}

/// A [`Store`] wrapper applying a [`RetryPolicy`]; see the module docs.
pub struct RetryStore<S: ?Sized> {
    inner: Arc<S>,
    policy: RetryPolicy,
    permits: Semaphore,
    counters: Counters,
    /// State of the jitter generator (SplitMix64); quality only needs to spread retries.
    jitter: Mutex<u64>,
}

impl<S: Store + ?Sized> RetryStore<S> {
    /// Wrap `inner` with `policy`. A `max_concurrency` of 0 is taken as 1.
    pub fn new(inner: Arc<S>, policy: RetryPolicy) -> RetryStore<S> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (Arc::as_ptr(&inner) as *const () as usize as u64);
        RetryStore {
            permits: Semaphore::new(policy.max_concurrency.max(1)),
            inner,
            policy,
            counters: Counters::default(),
            jitter: Mutex::new(seed),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The counters so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            calls: get(&c.calls),
            requests: get(&c.requests),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            retries: get(&c.retries),
            errors: get(&c.errors),
            timeouts: get(&c.timeouts),
        }
    }

    /// A backoff for retry number `retry` (0-based): uniform in `0..=cap`.
    fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .policy
            .base_backoff
            .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .min(self.policy.max_backoff);
        let cap_us = cap.as_micros() as u64;
        if cap_us == 0 {
            return Duration::ZERO;
        }
        let r = {
            let mut state = self.jitter.lock();
            *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Duration::from_micros(r % (cap_us + 1))
    }

    /// Run `attempt` under the policy. `key` names the object (or prefix) in errors.
    async fn run<T, F, Fut>(&self, key: &str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let deadline = start + self.policy.deadline;
        let timed_out = |after: Duration| {
            c.timeouts.fetch_add(1, Ordering::Relaxed);
            StoreError::Timeout {
                key: key.to_string(),
                after,
            }
        };
        let mut retry = 0u32;
        loop {
            let result = match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
                Err(_) => Err(timed_out(start.elapsed())),
                Ok(permit) => {
                    let _permit = permit.expect("the semaphore is never closed");
                    c.requests.fetch_add(1, Ordering::Relaxed);
                    let limit = (Instant::now() + self.policy.timeout).min(deadline);
                    let attempt_start = Instant::now();
                    match tokio::time::timeout_at(limit, attempt()).await {
                        Ok(r) => r,
                        Err(_) => Err(timed_out(attempt_start.elapsed())),
                    }
                }
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let give_up = !err.kind().is_transient()
                || retry >= self.policy.retries
                || {
                    let pause = self.backoff(retry);
                    if Instant::now() + pause >= deadline {
                        true
                    } else {
                        tracing::debug!(store = %self.inner.describe(), key, retry, ?pause, error = %err, "retrying store request");
                        tokio::time::sleep(pause).await;
                        false
                    }
                };
            if give_up {
                c.errors.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
            retry += 1;
            c.retries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for RetryStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let data = self
            .run(key, || self.inner.get_range(key, range.clone()))
            .await?;
        self.counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let data = self.run(key, || self.inner.get(key)).await?;
        self.counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.run(key, || self.inner.put(key, data.clone())).await?;
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.run(key, || self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.run(prefix, || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(key, || self.inner.delete(key)).await
    }

    fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_path(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::store::fault::{Fault, FaultStore, Op, Rule, When};
    use crate::store::mem::MemStore;

    fn fast_policy() -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_millis(200),
            retries: 3,
            deadline: Duration::from_secs(5),
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
            max_concurrency: 4,
        }
    }

    async fn fault_store() -> Arc<FaultStore<MemStore>> {
        let mem = Arc::new(MemStore::new());
        mem.put("k", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        Arc::new(FaultStore::new(mem, 1))
    }

    #[tokio::test]
    async fn transient_faults_are_retried_until_success() {
        let faults = fault_store().await;
        faults.add_rule(Rule::new(
            Fault::Transient,
            When::FirstN(2),
            Some(Op::GetRange),
        ));
        let store = RetryStore::new(faults.clone(), fast_policy());

        let data = store.get_range("k", 2..5).await.unwrap();

        assert_eq!(&data[..], b"234");
        assert_eq!(faults.calls(), 3);
        let stats = store.stats();
        assert_eq!((stats.calls, stats.requests, stats.retries), (1, 3, 2));
        assert_eq!((stats.errors, stats.bytes_read), (0, 3));
    }

    #[tokio::test]
    async fn permanent_fault_is_not_retried() {
        let faults = fault_store().await;
        faults.add_rule(Rule::new(Fault::Permanent, When::Always, None));
        let store = RetryStore::new(faults.clone(), fast_policy());

        let err = store.get("k").await.unwrap_err();

        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert_eq!(faults.calls(), 1);
        assert_eq!(store.stats().errors, 1);
    }

    #[tokio::test]
    async fn not_found_is_not_retried() {
        let faults = fault_store().await;
        let store = RetryStore::new(faults.clone(), fast_policy());

        let err = store.get("missing").await.unwrap_err();

        assert!(matches!(err, StoreError::NotFound { .. }));
        assert_eq!(faults.calls(), 1);
    }

    #[tokio::test]
    async fn retries_stop_after_the_configured_count() {
        let faults = fault_store().await;
        faults.set_down(true);
        let store = RetryStore::new(faults.clone(), fast_policy());

        let err = store.head("k").await.unwrap_err();

        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert_eq!(faults.calls(), 4);
        assert_eq!(store.stats().retries, 3);
    }

    #[tokio::test]
    async fn hanging_store_times_out_within_the_deadline() {
        let faults = fault_store().await;
        faults.set_hang(true);
        let policy = RetryPolicy {
            timeout: Duration::from_millis(50),
            retries: 100,
            deadline: Duration::from_millis(300),
            ..fast_policy()
        };
        let store = RetryStore::new(faults.clone(), policy);

        let start = std::time::Instant::now();
        let err = store.get("k").await.unwrap_err();
        let took = start.elapsed();

        assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(took < Duration::from_millis(600), "took {took:?}");
        assert!(faults.calls() >= 2, "timeouts are retried");
        assert!(store.stats().timeouts >= 2);
    }

    #[tokio::test]
    async fn concurrency_limit_bounds_calls_in_flight() {
        let faults = fault_store().await;
        faults.set_delay(Duration::from_millis(20));
        let policy = RetryPolicy {
            max_concurrency: 3,
            ..fast_policy()
        };
        let store = Arc::new(RetryStore::new(faults.clone(), policy));

        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.get_range("k", 0..1).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }

        assert_eq!(faults.calls(), 12);
        assert_eq!(faults.max_in_flight(), 3);
    }

    #[test]
    fn backoff_stays_under_its_cap() {
        let store = RetryStore::new(
            Arc::new(MemStore::new()),
            RetryPolicy {
                base_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(35),
                ..RetryPolicy::default()
            },
        );

        for retry in 0..40 {
            let cap = Duration::from_millis(10 << retry.min(10)).min(Duration::from_millis(35));
            assert!(store.backoff(retry) <= cap);
        }
    }
}
