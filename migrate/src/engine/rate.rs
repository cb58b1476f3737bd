//! The bandwidth cap shared by a move's channels.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How far the schedule may fall behind the clock: a burst of at most this much time's worth
/// of bytes after an idle spell.
const BURST: Duration = Duration::from_millis(20);

/// A pacing limiter: each `acquire(n)` reserves `n` bytes of the link's time and sleeps until
/// that time comes. Shared by all sender threads, so the cap holds for the whole move.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_s: u64,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_s` (at least 1).
    pub fn new(bytes_per_s: u64) -> RateLimiter {
        RateLimiter {
            bytes_per_s: bytes_per_s.max(1),
            next: Mutex::new(None),
        }
    }

    /// The rate.
    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        let start = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let floor = now.checked_sub(BURST).unwrap_or(now);
            let start = match *next {
                Some(t) if t > floor => t,
                _ => floor,
            };
            *next = Some(start + cost);
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let r = RateLimiter::new(10 * 1024 * 1024);
        let t = Instant::now();
        for _ in 0..20 {
            r.acquire(256 * 1024);
        }
        // 5 MiB at 10 MiB/s: 0.5 s, less the 20 ms burst allowance (a loaded machine may
        // only make it slower).
        let e = t.elapsed().as_secs_f64();
        assert!(e >= 0.45, "5 MiB passed a 10 MiB/s cap in {e} s");
    }
}
