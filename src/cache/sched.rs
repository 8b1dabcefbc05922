//! Fetch scheduling: a counting semaphore with two classes, so demand reads always go before
//! read-ahead and warming.
//!
//! [`FetchScheduler::acquire`] hands out at most `capacity` permits. Waiting demand requests
//! are served before any waiting background request; a background request that a demand
//! reader starts waiting on can be promoted ([`Urgency::promote`]). Background requests never
//! take the last `reserved` permits, so a demand read finds a free slot at once even while
//! warming saturates the others.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Whether a fetch serves a reader now or prepares for later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A guest read is waiting for it.
    Demand,
    /// Read-ahead, NBD_CMD_CACHE or warming.
    Background,
}

/// A flag a queued background request carries; set it to jump the background queue.
#[derive(Debug, Clone, Default)]
pub struct Urgency(Arc<AtomicBool>);

impl Urgency {
    pub fn promote(&self) {
        self.0.store(true, Ordering::Release);
    }
    fn is_urgent(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

struct State {
    available: usize,
    demand: VecDeque<oneshot::Sender<()>>,
    background: VecDeque<(Urgency, oneshot::Sender<()>)>,
}

/// The scheduler shared by every image of a cache.
pub struct FetchScheduler {
    capacity: usize,
    reserved: usize,
    state: Mutex<State>,
}

/// A held fetch slot; released on drop.
pub struct Permit {
    sched: Arc<FetchScheduler>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.sched.release();
    }
}

impl FetchScheduler {
    /// `capacity` concurrent fetches, of which background work may use all but `reserved`.
    pub fn new(capacity: usize, reserved: usize) -> Arc<FetchScheduler> {
        let capacity = capacity.max(1);
        Arc::new(FetchScheduler {
            capacity,
            reserved: reserved.min(capacity - 1),
            state: Mutex::new(State {
                available: capacity,
                demand: VecDeque::new(),
                background: VecDeque::new(),
            }),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Wait for a slot of class `prio`. Cancel-safe: dropping the future gives up the place
    /// (a permit granted meanwhile is passed on).
    pub async fn acquire(self: &Arc<Self>, prio: Priority, urgency: &Urgency) -> Permit {
        let rx = {
            let mut st = self.state.lock();
            let can_take = match prio {
                Priority::Demand => st.available > 0,
                Priority::Background => {
                    st.demand.is_empty() && st.available > self.reserved
                        || urgency.is_urgent() && st.available > 0
                }
            };
            if can_take {
                st.available -= 1;
                return Permit {
                    sched: self.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            match prio {
                Priority::Demand => st.demand.push_back(tx),
                Priority::Background => st.background.push_back((urgency.clone(), tx)),
            }
            rx
        };
        let mut guard = WaitGuard {
            sched: self,
            rx: Some(rx),
        };
        guard.wait().await;
        Permit {
            sched: self.clone(),
        }
    }

    fn release(&self) {
        let mut st = self.state.lock();
        st.available += 1;
        self.dispatch(&mut st);
    }

    /// Hand free slots to waiters: demand first, then urgent background, then background
    /// while more than `reserved` slots are free.
    fn dispatch(&self, st: &mut State) {
        while st.available > 0 {
            if let Some(tx) = st.demand.pop_front() {
                if tx.send(()).is_ok() {
                    st.available -= 1;
                }
                continue;
            }
            if let Some(pos) = st.background.iter().position(|(u, _)| u.is_urgent()) {
                let (_, tx) = st.background.remove(pos).expect("position is in range");
                if tx.send(()).is_ok() {
                    st.available -= 1;
                }
                continue;
            }
            if st.available > self.reserved {
                if let Some((_, tx)) = st.background.pop_front() {
                    if tx.send(()).is_ok() {
                        st.available -= 1;
                    }
                    continue;
                }
            }
            break;
        }
    }

    /// Re-run dispatch (after a waiting background request was promoted).
    pub fn kick(&self) {
        let mut st = self.state.lock();
        self.dispatch(&mut st);
    }
}

/// Waits for a granted slot; if dropped after the grant but before observing it, returns the
/// slot so it is not lost.
struct WaitGuard<'a> {
    sched: &'a Arc<FetchScheduler>,
    rx: Option<oneshot::Receiver<()>>,
}

impl WaitGuard<'_> {
    async fn wait(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            // A sender is dropped unsent only when its receiver is gone, so this is a grant.
            let _ = rx.await;
        }
        self.rx = None;
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.sched.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn demand_goes_before_queued_background() {
        let s = FetchScheduler::new(1, 0);
        let u = Urgency::default();
        let p = s.acquire(Priority::Demand, &u).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let (s1, o1, u1) = (s.clone(), order.clone(), u.clone());
        let bg = tokio::spawn(async move {
            let _p = s1.acquire(Priority::Background, &u1).await;
            o1.lock().push("background");
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (s2, o2, u2) = (s.clone(), order.clone(), u.clone());
        let dm = tokio::spawn(async move {
            let _p = s2.acquire(Priority::Demand, &u2).await;
            o2.lock().push("demand");
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p);
        bg.await.unwrap();
        dm.await.unwrap();
        assert_eq!(*order.lock(), vec!["demand", "background"]);
    }

    #[tokio::test]
    async fn background_leaves_reserved_slots_for_demand() {
        let s = FetchScheduler::new(3, 1);
        let u = Urgency::default();
        let _a = s.acquire(Priority::Background, &u).await;
        let _b = s.acquire(Priority::Background, &u).await;
        let third = tokio::time::timeout(
            Duration::from_millis(30),
            s.acquire(Priority::Background, &u),
        )
        .await;
        assert!(third.is_err(), "background took the reserved slot");
        let d =
            tokio::time::timeout(Duration::from_millis(30), s.acquire(Priority::Demand, &u)).await;
        assert!(d.is_ok(), "demand must get the reserved slot");
    }

    #[tokio::test]
    async fn cancelled_waiter_does_not_leak_a_slot() {
        let s = FetchScheduler::new(1, 0);
        let u = Urgency::default();
        let p = s.acquire(Priority::Demand, &u).await;
        let w =
            tokio::time::timeout(Duration::from_millis(10), s.acquire(Priority::Demand, &u)).await;
        assert!(w.is_err());
        drop(p);
        let again =
            tokio::time::timeout(Duration::from_millis(50), s.acquire(Priority::Demand, &u)).await;
        assert!(again.is_ok(), "slot lost after a cancelled wait");
    }
}
