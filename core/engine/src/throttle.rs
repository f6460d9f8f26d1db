//! Brute-force protection for sign-ins: failed sign-ins are counted per user name and per client
//! address; past a few free failures, each further one blocks that key for twice as long as the
//! one before (exponential back-off), and a blocked key is answered `429 Too Many Requests`
//! with `Retry-After` without its credentials being checked.
//!
//! Invariants:
//! - A user's block never exceeds `user_max` (30 s by default), whoever fails on that name, so
//!   an attacker cannot lock a real user out for long; an address's block grows to `addr_max`
//!   (15 min), so one client cannot guess fast under many names.
//! - A successful sign-in clears its user's and its address's failures; failures are forgotten
//!   after `forget` without a new one.
//! - Memory is bounded: at most `max_keys` keys per map (the stalest are dropped first).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// How failed sign-ins are slowed down.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Failures per key before any block.
    pub free: u32,
    /// The first block; each further failure doubles it.
    pub base: Duration,
    /// Longest block of a user name.
    pub user_max: Duration,
    /// Longest block of a client address.
    pub addr_max: Duration,
    /// Failures are forgotten after this long without a new one.
    pub forget: Duration,
    /// Most keys remembered per map.
    pub max_keys: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            free: 5,
            base: Duration::from_millis(500),
            user_max: Duration::from_secs(30),
            addr_max: Duration::from_secs(900),
            forget: Duration::from_secs(900),
            max_keys: 100_000,
        }
    }
}

impl Policy {
    /// How long `failures` failures block a key whose blocks stop growing at `max`.
    pub fn block_ms(&self, failures: u32, max: Duration) -> i64 {
        if failures <= self.free {
            return 0;
        }
        let doublings = (failures - self.free - 1).min(30);
        let ms = (self.base.as_millis() as u64).saturating_mul(1 << doublings);
        ms.min(max.as_millis() as u64) as i64
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Strikes {
    failures: u32,
    /// When the last failure happened (ms).
    last: i64,
    /// Blocked until (ms).
    until: i64,
}

/// Which key of a sign-in is blocked, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// `user 'NAME'` or `this address`.
    pub what: String,
    /// Milliseconds until it may try again.
    pub wait_ms: i64,
}

/// Failed sign-ins per user name and per client address.
pub struct Throttle {
    policy: Policy,
    users: Mutex<HashMap<String, Strikes>>,
    addrs: Mutex<HashMap<IpAddr, Strikes>>,
}

fn wait_of<K: Eq + Hash>(map: &Mutex<HashMap<K, Strikes>>, key: &K, now: i64) -> i64 {
    map.lock()
        .unwrap()
        .get(key)
        .map_or(0, |s| (s.until - now).max(0))
}

impl Throttle {
    /// No failures yet.
    pub fn new(policy: Policy) -> Self {
        Throttle {
            policy,
            users: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a sign-in as `user` from `addr` must wait (the longer of the two blocks).
    pub fn check(&self, user: &str, addr: Option<IpAddr>, now: i64) -> Option<Blocked> {
        let by_addr = addr.map_or(0, |a| wait_of(&self.addrs, &a, now));
        let by_user = wait_of(&self.users, &user.to_string(), now);
        let (what, wait_ms) = if by_addr >= by_user {
            ("this address".to_string(), by_addr)
        } else {
            (format!("user '{user}'"), by_user)
        };
        (wait_ms > 0).then_some(Blocked { what, wait_ms })
    }

    /// Records a failed sign-in as `user` from `addr`.
    pub fn failed(&self, user: &str, addr: Option<IpAddr>, now: i64) {
        let p = &self.policy;
        strike(&self.users, user.to_string(), now, p, p.user_max);
        if let Some(a) = addr {
            strike(&self.addrs, a, now, p, p.addr_max);
        }
    }

    /// A successful sign-in: its user and address start afresh.
    pub fn succeeded(&self, user: &str, addr: Option<IpAddr>) {
        self.users.lock().unwrap().remove(user);
        if let Some(a) = addr {
            self.addrs.lock().unwrap().remove(&a);
        }
    }
}

fn strike<K: Eq + Hash>(
    map: &Mutex<HashMap<K, Strikes>>,
    key: K,
    now: i64,
    policy: &Policy,
    max: Duration,
) {
    let forget = policy.forget.as_millis() as i64;
    let mut map = map.lock().unwrap();
    if map.len() >= policy.max_keys {
        map.retain(|_, s| now - s.last < forget || s.until > now);
        if map.len() >= policy.max_keys {
            // Still full: drop the stalest half.
            let mut lasts: Vec<i64> = map.values().map(|s| s.last).collect();
            lasts.sort_unstable();
            let cut = lasts[lasts.len() / 2];
            map.retain(|_, s| s.last > cut);
        }
    }
    let s = map.entry(key).or_default();
    if now - s.last >= forget {
        s.failures = 0;
    }
    s.failures = s.failures.saturating_add(1);
    s.last = now;
    s.until = now + policy.block_ms(s.failures, max);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_double_after_the_free_failures_and_stop_growing_at_the_cap() {
        let p = Policy::default();
        let user_max = p.user_max;
        let blocks: Vec<i64> = (1..=14).map(|n| p.block_ms(n, user_max)).collect();
        assert_eq!(
            blocks,
            [
                0, 0, 0, 0, 0, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000
            ]
        );
        assert_eq!(p.block_ms(u32::MAX, p.addr_max), 900_000);
    }

    #[test]
    fn a_user_is_blocked_whoever_fails_but_never_long_and_a_success_clears_it() {
        let t = Throttle::new(Policy::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut now = 1_000_000;
        for _ in 0..5 {
            assert_eq!(t.check("ada", Some(a), now), None);
            t.failed("ada", Some(a), now);
        }
        assert_eq!(t.check("ada", Some(a), now), None, "five failures are free");
        t.failed("ada", Some(a), now);
        let blocked = t.check("ada", Some(b), now).unwrap();
        assert_eq!(blocked.what, "user 'ada'");
        assert_eq!(blocked.wait_ms, 500);
        // An attacker failing without end keeps the user's block at 30 s at most.
        for _ in 0..40 {
            t.failed("ada", Some(a), now);
        }
        assert_eq!(t.check("ada", Some(b), now).unwrap().wait_ms, 30_000);
        assert_eq!(t.check("ada", Some(a), now).unwrap().what, "this address");
        assert_eq!(t.check("ada", Some(a), now).unwrap().wait_ms, 900_000);
        now += 30_000;
        assert_eq!(t.check("ada", Some(b), now), None, "the real user gets in");
        t.succeeded("ada", Some(b));
        assert!(
            t.check("ada", Some(a), now).is_some(),
            "the attacker stays blocked"
        );
        assert_eq!(t.check("bob", Some(b), now), None);
    }

    #[test]
    fn failures_are_forgotten_and_memory_stays_bounded() {
        let t = Throttle::new(Policy {
            max_keys: 100,
            ..Policy::default()
        });
        let now = 1_000_000;
        for _ in 0..6 {
            t.failed("ada", None, now);
        }
        assert!(t.check("ada", None, now).is_some());
        let later = now + 901_000;
        t.failed("ada", None, later);
        assert_eq!(t.check("ada", None, later), None, "counted afresh");
        for i in 0..1_000 {
            t.failed(&format!("user{i}"), None, later + i);
        }
        assert!(t.users.lock().unwrap().len() <= 100);
    }
}
