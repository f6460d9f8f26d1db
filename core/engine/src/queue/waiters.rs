//! Long-polls on commands (`GET /v1/commands/{id}?wait=`): each waits on its own command's
//! wake-up, rung by the queue when that command ends, instead of re-reading it on a timer;
//! their number is capped per client and in total.
//!
//! Invariants: a waiter is woken only by the end of its own command (or its safety-net
//! re-read, for commands ended by another core); the counts go back down when a waiter leaves,
//! however it leaves (its registration is dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::QueueError;

/// Caps of long-polls.
#[derive(Debug, Clone, Copy)]
pub struct WaitLimits {
    /// Long-polls waiting at once, in all.
    pub total: usize,
    /// Long-polls waiting at once per client (user name or address).
    pub per_client: usize,
}

impl Default for WaitLimits {
    fn default() -> Self {
        WaitLimits {
            total: 1024,
            per_client: 64,
        }
    }
}

#[derive(Default)]
struct State {
    by_command: HashMap<i64, Arc<Notify>>,
    by_client: HashMap<String, usize>,
    total: usize,
}

/// The waiters of this core.
#[derive(Default)]
pub(crate) struct Waiters {
    state: Mutex<State>,
}

/// One waiter; leaving (dropping it) gives its place back.
pub(crate) struct Registration<'a> {
    waiters: &'a Waiters,
    id: i64,
    client: Option<String>,
    /// Rung when the command ends.
    pub notify: Arc<Notify>,
}

impl Waiters {
    /// Registers a waiter for command `id`; `client` is counted against `limits` (`None`: the
    /// core's own waits, not capped).
    pub fn register(
        &self,
        id: i64,
        client: Option<&str>,
        limits: WaitLimits,
    ) -> Result<Registration<'_>, QueueError> {
        let mut s = self.state.lock().unwrap();
        if let Some(c) = client {
            let mine = s.by_client.get(c).copied().unwrap_or(0);
            if mine >= limits.per_client {
                return Err(QueueError::TooManyWaits(format!(
                    "{c} already has {mine} requests waiting on commands (at most {}); wait for \
                     one to return, or read without ?wait=",
                    limits.per_client
                )));
            }
            if s.total >= limits.total {
                return Err(QueueError::TooManyWaits(format!(
                    "this core already has {} requests waiting on commands (at most {}); try \
                     again later, or read without ?wait=",
                    s.total, limits.total
                )));
            }
            *s.by_client.entry(c.to_string()).or_default() += 1;
            s.total += 1;
        }
        let notify = s.by_command.entry(id).or_default().clone();
        Ok(Registration {
            waiters: self,
            id,
            client: client.map(str::to_string),
            notify,
        })
    }

    /// Wakes the waiters of the commands `ids` (they ended).
    pub fn wake(&self, ids: impl IntoIterator<Item = i64>) {
        let s = self.state.lock().unwrap();
        if s.by_command.is_empty() {
            return;
        }
        for id in ids {
            if let Some(n) = s.by_command.get(&id) {
                n.notify_waiters();
            }
        }
    }

    /// Waiters registered now (for tests and metrics).
    pub fn count(&self) -> usize {
        self.state.lock().unwrap().total
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut s = self.waiters.state.lock().unwrap();
        if let Some(c) = &self.client {
            s.total -= 1;
            if let Some(n) = s.by_client.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    s.by_client.remove(c);
                }
            }
        }
        // The map's reference and this one: the last waiter of the command leaves.
        if Arc::strong_count(&self.notify) == 2 {
            s.by_command.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_capped_per_client_and_in_total_and_give_their_place_back() {
        let w = Waiters::default();
        let limits = WaitLimits {
            total: 3,
            per_client: 2,
        };
        let a1 = w.register(1, Some("ada"), limits).unwrap();
        let a2 = w.register(2, Some("ada"), limits).unwrap();
        let e = w
            .register(3, Some("ada"), limits)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ada already has 2 requests waiting"), "{e}");
        let b1 = w.register(1, Some("10.0.0.9"), limits).unwrap();
        let e = w
            .register(4, Some("bob"), limits)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already has 3 requests waiting"), "{e}");
        let _core = w.register(5, None, limits).unwrap();
        assert_eq!(w.count(), 3, "the core's own waits are not counted");
        drop(a2);
        let _b2 = w.register(4, Some("bob"), limits).unwrap();
        drop((a1, b1));
        assert_eq!(w.count(), 1);
        assert!(!w.state.lock().unwrap().by_command.contains_key(&1));
        assert!(!w.state.lock().unwrap().by_client.contains_key("ada"));
    }

    #[tokio::test]
    async fn only_the_end_of_its_own_command_wakes_a_waiter() {
        let w = Waiters::default();
        let r = w.register(7, None, WaitLimits::default()).unwrap();
        let woken = r.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        w.wake([6, 8]);
        assert!(futures_poll(woken.as_mut()).is_pending());
        w.wake([7]);
        assert!(futures_poll(woken.as_mut()).is_ready());
    }

    fn futures_poll<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
