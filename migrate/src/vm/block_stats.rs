//! Request statistics of the paravirtual block devices: how many reads, writes and flushes
//! each device served, and how long each took, as latency histograms.
//!
//! ## What is measured
//! The device serves a request synchronously on the vCPU thread, inside the doorbell's MMIO
//! exit (see [`super::devices`]). A request's latency here is the time from the vCPU
//! thread's handling of the doorbell write (after `KVM_RUN` returned and the exit was
//! decoded) to the status written back into the request: waiting for the device's lock
//! (held briefly by a disk swap or a flush from another thread), reading the request and
//! the guest's data, the disk call (and whatever the disk layer does on a write, such as
//! marking blocks dirty for a storage move), and the status write. It does not include the
//! VM exit and re-entry, nor the guest's own time between requests: what the guest waits
//! for is this plus one exit round trip. Times come from the monotonic clock
//! ([`Instant`]).
//!
//! ## Histogram
//! [`LatencyHistogram`] is log-linear over nanoseconds, HDR style: values below 32 ns have a
//! bucket each, then every power of two is split into 16 equal buckets, up to 2^40 ns
//! (~18 minutes; longer requests count in the last bucket). A percentile is reported as the
//! highest value of its bucket, clamped to the observed minimum and maximum, so it is never
//! below the true value and at most 1/16 (6.25 %) above it; `percentile(100)` is the exact
//! maximum.
//!
//! ## Lifetime
//! The statistics live next to the devices, not in them: they are not part of
//! [`super::devices::DeviceState`], so they are neither saved nor migrated (a moved or
//! restored VM starts counting from zero), and a disk swap keeps counting on the same
//! device. [`Vm::block_stats`] copies them while the VM runs; [`Vm::take_block_stats`]
//! copies and restarts them in one step (for per-phase figures).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::Vm;

/// Values below this have a bucket each.
const LINEAR: u64 = 32;
/// Buckets per power of two above [`LINEAR`] (2^SUB_BITS).
const SUB_BITS: u32 = 4;
/// Values at or above 2^MAX_BITS ns count in the last bucket.
const MAX_BITS: u32 = 40;
/// Number of buckets.
pub const BUCKETS: usize = 16 * (MAX_BITS as usize - 3);

/// The bucket of a value in nanoseconds.
fn bucket_of(ns: u64) -> usize {
    if ns < LINEAR {
        return usize::try_from(ns).unwrap_or(0);
    }
    let e = 63 - ns.leading_zeros(); // 5 ..= 63
    if e >= MAX_BITS {
        return BUCKETS - 1;
    }
    let sub = (ns >> (e - SUB_BITS)) & 15;
    usize::try_from(16 * u64::from(e - 3) + sub).unwrap_or(BUCKETS - 1)
}

/// The values of bucket `i`: `lower..upper` in nanoseconds.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = u64::try_from(i).unwrap_or(u64::MAX);
    if i < LINEAR {
        return (i, i + 1);
    }
    let e = i / 16 + 3;
    let sub = i % 16;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    let lower = (16 + sub) * width;
    (lower, lower + width)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A latency histogram (see the module documentation for its buckets and precision).
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u64,
    min_ns: u64,
    max_ns: u64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |q| self.percentile(q).unwrap_or_default();
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("mean", &self.mean().unwrap_or_default())
            .field("p50", &p(50.0))
            .field("p99", &p(99.0))
            .field("max", &self.max().unwrap_or_default())
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> LatencyHistogram {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    /// Adds one observation.
    pub fn record(&mut self, d: Duration) {
        let ns = nanos(d);
        if let Some(b) = self.buckets.get_mut(bucket_of(ns)) {
            *b += 1;
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of all observations.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }

    /// Mean (exact), if there is any observation.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.sum_ns / self.count))
    }

    /// Smallest observation (exact).
    pub fn min(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.min_ns))
    }

    /// Largest observation (exact).
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// The `p`-th percentile (`p` from 0 to 100; outside, clamped): the smallest bucket
    /// value `v` such that at least `p` % of the observations are at most `v`, reported as
    /// its bucket's highest value clamped to the observed min and max. `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        // Rank of the observation asked for, 1-based; computed in f64, which is exact for
        // counts below 2^53.
        let rank = ((p / 100.0) * self.count as f64).ceil();
        let rank = if rank < 1.0 {
            1
        } else if rank >= self.count as f64 {
            self.count
        } else {
            // In range 1..count, so the conversion cannot truncate.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let r = rank as u64;
            r
        };
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (_, upper) = bucket_range(i);
                let v = (upper - 1).clamp(self.min_ns, self.max_ns);
                return Some(Duration::from_nanos(v));
            }
        }
        Some(Duration::from_nanos(self.max_ns))
    }

    /// Adds `other`'s observations.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Non-empty buckets as (lower bound, upper bound exclusive, count), fastest first.
    pub fn buckets(&self) -> Vec<(Duration, Duration, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                let (lo, hi) = bucket_range(i);
                (Duration::from_nanos(lo), Duration::from_nanos(hi), *n)
            })
            .collect()
    }
}

/// The kind of a block request, as the device decoded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into guest memory.
    Read,
    /// Write from guest memory.
    Write,
    /// Flush.
    Flush,
    /// Not a request the device serves (unknown op, unreadable request).
    Invalid,
}

/// One served request, as the device reports it for the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// What it was.
    pub kind: RequestKind,
    /// Bytes transferred (0 for a flush or a failed request).
    pub bytes: u64,
    /// Whether it completed with `STATUS_OK`.
    pub ok: bool,
}

/// Statistics of one block device since it was created or its statistics were last taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Requests the device rejected before any I/O (unknown op, request not in RAM).
    pub rejected: u64,
    /// Reads, writes and flushes that did not complete with `STATUS_OK`.
    pub failed: u64,
    /// Bytes read successfully.
    pub bytes_read: u64,
    /// Bytes written successfully.
    pub bytes_written: u64,
    /// Latency of reads.
    pub read_hist: LatencyHistogram,
    /// Latency of writes.
    pub write_hist: LatencyHistogram,
    /// Latency of flushes.
    pub flush_hist: LatencyHistogram,
    /// How long these statistics were collected (from the start or the last take to the
    /// copy).
    pub window: Duration,
}

impl BlockStats {
    /// Counts one served request that took `took`.
    pub fn record(&mut self, served: Served, took: Duration) {
        match served.kind {
            RequestKind::Read => {
                self.reads += 1;
                self.read_hist.record(took);
                if served.ok {
                    self.bytes_read += served.bytes;
                }
            }
            RequestKind::Write => {
                self.writes += 1;
                self.write_hist.record(took);
                if served.ok {
                    self.bytes_written += served.bytes;
                }
            }
            RequestKind::Flush => {
                self.flushes += 1;
                self.flush_hist.record(took);
            }
            RequestKind::Invalid => {
                self.rejected += 1;
                return;
            }
        }
        if !served.ok {
            self.failed += 1;
        }
    }

    /// The `p`-th percentile of the write latency (see [`LatencyHistogram::percentile`]).
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        self.write_hist.percentile(p)
    }

    /// Mean write latency.
    pub fn mean(&self) -> Option<Duration> {
        self.write_hist.mean()
    }

    /// Writes per second over [`BlockStats::window`].
    pub fn writes_per_sec(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 { self.writes as f64 / s } else { 0.0 }
    }

    /// Fraction of the window the device spent serving writes (0 to 1): how much of the
    /// vCPU's time went to the host side of its disk writes.
    pub fn write_busy(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 {
            self.write_hist.total().as_secs_f64() / s
        } else {
            0.0
        }
    }
}

#[derive(Debug)]
struct Running {
    stats: BlockStats,
    since: Instant,
}

/// The live statistics of one device: recorded by its vCPU thread after each request,
/// copied or taken by any thread. The lock is held for a few additions (recording) or one
/// copy of about 14 KiB (reading), never during I/O, and a request's time is taken before
/// the lock, so reading the statistics does not show in them.
#[derive(Debug)]
pub struct BlockStatsCell {
    running: Mutex<Running>,
}

impl Default for BlockStatsCell {
    fn default() -> BlockStatsCell {
        BlockStatsCell::new()
    }
}

impl BlockStatsCell {
    /// Empty statistics, starting now.
    pub fn new() -> BlockStatsCell {
        BlockStatsCell {
            running: Mutex::new(Running {
                stats: BlockStats::default(),
                since: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        // A panic while recording leaves counters that are still usable figures.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one request.
    pub fn record(&self, served: Served, took: Duration) {
        self.lock().stats.record(served, took);
    }

    /// A copy of the statistics so far.
    pub fn snapshot(&self) -> BlockStats {
        let r = self.lock();
        let mut s = r.stats.clone();
        s.window = r.since.elapsed();
        s
    }

    /// The statistics so far; counting starts again from zero.
    pub fn take(&self) -> BlockStats {
        let mut r = self.lock();
        let now = Instant::now();
        let mut s = std::mem::take(&mut r.stats);
        s.window = now.duration_since(r.since);
        r.since = now;
        s
    }
}

impl Vm {
    /// Request statistics of block device `index` since the VM was built (or since the
    /// last [`Vm::take_block_stats`]); `None` if there is no such device. Works while the
    /// VM runs. Not part of the VM's saved or migrated state.
    pub fn block_stats(&self, index: usize) -> Option<BlockStats> {
        self.devices
            .block_stats(index)
            .map(BlockStatsCell::snapshot)
    }

    /// Like [`Vm::block_stats`], and restarts the device's statistics from zero in the
    /// same step (no request is lost or counted twice between two takes).
    pub fn take_block_stats(&self, index: usize) -> Option<BlockStats> {
        self.devices.block_stats(index).map(BlockStatsCell::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn buckets_cover_every_value_once_in_order() {
        // Consecutive buckets touch; every value lands in the bucket whose range holds it.
        let mut prev_upper = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert_eq!(lo, prev_upper, "bucket {i}");
            assert!(hi > lo);
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi - 1), i);
            prev_upper = hi;
        }
        assert_eq!(prev_upper, 1 << MAX_BITS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of(1 << MAX_BITS), BUCKETS - 1);
        // Above the linear part, a bucket is at most 1/16 of its lower bound wide.
        for i in usize::try_from(LINEAR).unwrap()..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert!((hi - lo) * 16 <= lo, "bucket {i}: {lo}..{hi}");
        }
    }

    #[test]
    fn empty_histogram_has_no_figures() {
        let h = LatencyHistogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(50.0), None);
        assert_eq!(h.mean(), None);
        assert_eq!(h.max(), None);
        assert_eq!(h.min(), None);
        assert!(h.buckets().is_empty());
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_microseconds() {
        let mut h = LatencyHistogram::new();
        // 1000 observations: 1 µs, 2 µs, ... 1000 µs, in shuffled order.
        for k in 0..1000u64 {
            h.record(us((k * 617) % 1000 + 1));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.min(), Some(us(1)));
        assert_eq!(h.max(), Some(us(1000)));
        assert_eq!(h.mean(), Some(Duration::from_nanos(500_500)));
        assert_eq!(h.total(), Duration::from_nanos(500_500_000));
        for (p, exact) in [(50.0, 500u64), (90.0, 900), (99.0, 990), (99.9, 999)] {
            let got = h.percentile(p).unwrap();
            let exact = us(exact);
            // Never below the true value, at most 1/16 above it.
            assert!(got >= exact, "p{p}: {got:?} < {exact:?}");
            assert!(
                got <= exact + exact / 16,
                "p{p}: {got:?} too far above {exact:?}"
            );
        }
        assert_eq!(h.percentile(100.0), Some(us(1000)));
        assert_eq!(h.percentile(250.0), Some(us(1000)));
        // The lowest percentiles are the fastest bucket's highest value.
        let p0 = h.percentile(0.0).unwrap();
        assert!(p0 >= us(1) && p0 <= us(1) + us(1) / 16, "{p0:?}");
        assert_eq!(h.percentile(-3.0), Some(p0));
        assert_eq!(h.percentile(f64::NAN), Some(us(1000)));
    }

    #[test]
    fn a_tail_shows_in_the_high_percentiles_only() {
        let mut h = LatencyHistogram::new();
        for _ in 0..990 {
            h.record(us(20));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(5));
        }
        let p50 = h.percentile(50.0).unwrap();
        let p99 = h.percentile(99.0).unwrap();
        let p999 = h.percentile(99.9).unwrap();
        assert!(p50 >= us(20) && p50 <= us(22), "{p50:?}");
        assert_eq!(p99, p50, "990 of 1000 are 20 µs");
        assert_eq!(p999, Duration::from_millis(5));
        assert_eq!(h.max(), Some(Duration::from_millis(5)));
        let b = h.buckets();
        assert_eq!(b.len(), 2);
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 1000);
        assert!(b[0].0 <= us(20) && us(20) < b[0].1);
    }

    #[test]
    fn a_single_value_is_every_percentile_exactly() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_nanos(123_456));
        for p in [0.0, 1.0, 50.0, 99.0, 100.0] {
            assert_eq!(h.percentile(p), Some(Duration::from_nanos(123_456)));
        }
        let mut huge = LatencyHistogram::new();
        huge.record(Duration::from_secs(100_000));
        assert_eq!(huge.percentile(50.0), Some(Duration::from_secs(100_000)));
    }

    #[test]
    fn merge_adds_observations() {
        let (mut a, mut b) = (LatencyHistogram::new(), LatencyHistogram::new());
        a.record(us(10));
        b.record(us(30));
        b.record(us(50));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), Some(us(10)));
        assert_eq!(a.max(), Some(us(50)));
        assert_eq!(a.mean(), Some(us(30)));
        a.merge(&LatencyHistogram::new());
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), Some(us(10)));
    }

    #[test]
    fn stats_count_by_kind_and_take_restarts_them() {
        let cell = BlockStatsCell::new();
        let w = Served {
            kind: RequestKind::Write,
            bytes: 4096,
            ok: true,
        };
        cell.record(w, us(30));
        cell.record(w, us(40));
        cell.record(
            Served {
                kind: RequestKind::Read,
                bytes: 512,
                ok: true,
            },
            us(5),
        );
        cell.record(
            Served {
                kind: RequestKind::Flush,
                bytes: 0,
                ok: true,
            },
            us(900),
        );
        cell.record(
            Served {
                kind: RequestKind::Write,
                bytes: 0,
                ok: false,
            },
            us(2),
        );
        cell.record(
            Served {
                kind: RequestKind::Invalid,
                bytes: 0,
                ok: false,
            },
            us(1),
        );
        std::thread::sleep(Duration::from_millis(2));
        let s = cell.snapshot();
        assert_eq!(
            (s.reads, s.writes, s.flushes, s.rejected, s.failed),
            (1, 3, 1, 1, 1)
        );
        assert_eq!((s.bytes_read, s.bytes_written), (512, 8192));
        assert_eq!(s.write_hist.count(), 3);
        assert_eq!(s.read_hist.count(), 1);
        assert_eq!(s.flush_hist.max(), Some(us(900)));
        assert_eq!(s.mean(), Some(us(24)));
        assert_eq!(s.percentile(100.0), Some(us(40)));
        assert!(s.window >= Duration::from_millis(2));
        assert!(s.writes_per_sec() > 0.0);
        assert!(s.write_busy() > 0.0 && s.write_busy() < 1.0);
        // A snapshot leaves the figures; take returns them and starts again.
        assert_eq!(cell.snapshot().writes, 3);
        let taken = cell.take();
        assert_eq!(taken.writes, 3);
        let after = cell.snapshot();
        assert_eq!((after.writes, after.reads), (0, 0));
        assert_eq!(after.percentile(50.0), None);
        assert!(after.window < taken.window);
    }
}
