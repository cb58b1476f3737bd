//! Block device request statistics on real KVM: a diskstress guest writes to a raw image made
//! by qemu-img, and the device's counters and latency figures are read while it runs. What
//! is checked is what someone reading the figures would check: every write the guest
//! completed is counted once (the guest's own sequence number says how many), the bytes
//! match, nothing else is counted, the percentiles are ordered and non-zero, and taking the
//! figures starts a new window without losing or doubling a request.

mod vm_common;

use std::path::Path;
use std::time::Duration;

use vm_common::{require_kvm, s, tool, wait_counter};
use vmgate_migrate::vm::block_stats::BlockStats;
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

/// A running VM whose vCPU 0 runs diskstress over 256 blocks of 4 KiB of a fresh 8 MiB raw
/// image made by qemu-img.
fn diskstress_vm(dir: &Path) -> Vm {
    require_kvm();
    let image = dir.join("disk.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&image), "8M"]);
    let text = format!(
        r#"
name = "block-stats"
memory_mib = 32
vcpus = 1
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 256
marker_every = 1000
[[disk]]
path = "{}"
format = "raw"
"#,
        s(&image)
    );
    let config = VmConfig::from_toml(&text, Some(dir)).expect("valid test config");
    let vm = Vm::create(config, &VmOptions::default()).expect("VM starts");
    vm.resume().expect("resume");
    vm
}

/// Only 4 KiB writes, all successful, with ordered non-zero percentiles.
fn assert_plausible(st: &BlockStats) {
    assert!(st.writes > 0, "{st:?}");
    assert_eq!(
        (st.reads, st.flushes, st.rejected, st.failed),
        (0, 0, 0, 0),
        "diskstress only writes, and every write succeeds: {st:?}"
    );
    assert_eq!(st.bytes_written, st.writes * 4096);
    assert_eq!(st.write_hist.count(), st.writes);
    assert_eq!(st.read_hist.count(), 0);
    let p = |q: f64| st.percentile(q).expect("writes were timed");
    let (min, p50, p90, p99, max) = (
        st.write_hist.min().unwrap(),
        p(50.0),
        p(90.0),
        p(99.0),
        st.write_hist.max().unwrap(),
    );
    assert!(min > Duration::ZERO, "a write cannot take no time: {st:?}");
    assert!(
        min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "percentiles out of order: min {min:?} p50 {p50:?} p90 {p90:?} p99 {p99:?} max {max:?}"
    );
    assert_eq!(p(100.0), max);
    let mean = st.mean().unwrap();
    assert!(
        min <= mean && mean <= max,
        "mean {mean:?} outside {min:?}..{max:?}"
    );
    // A 4 KiB write into the page cache: far below a second even on a loaded machine.
    assert!(p50 < Duration::from_secs(1), "{st:?}");
    assert!(st.window > Duration::ZERO);
    assert!(st.writes_per_sec() > 0.0);
    let busy = st.write_busy();
    assert!(busy > 0.0 && busy <= 1.0, "busy fraction {busy}");
}

#[test]
fn every_guest_write_is_counted_and_timed() {
    let dir = tempfile::tempdir().unwrap();
    let vm = diskstress_vm(dir.path());
    wait_counter(&vm, 0, 2000);
    // Figures can be read while the guest writes.
    let live = vm.block_stats(0).expect("disk 0 exists");
    assert!(live.writes >= 2000, "{live:?}");
    assert_plausible(&live);

    // Paused, the device has served every write the guest saw complete (the guest stores
    // its sequence number after the status came back) and at most one more (a pause can
    // fall between the doorbell's exit and that store), and the statistics counted exactly
    // the requests the device completed.
    vm.pause().unwrap();
    let counter = vm.mailbox(0).unwrap().counter;
    let st = vm.block_stats(0).unwrap();
    let completed = vm.save_state().unwrap().devices.block[0].completed;
    assert_eq!(st.writes, completed, "{st:?}");
    assert!(
        counter <= completed && completed <= counter + 1,
        "the guest completed {counter} writes, the device {completed}"
    );
    assert_plausible(&st);
    assert!(vm.block_stats(1).is_none(), "the VM has one disk");
    assert!(vm.take_block_stats(1).is_none());

    // Take: the same figures, then a new window that starts from zero.
    let taken = vm.take_block_stats(0).unwrap();
    assert_eq!(taken.writes, completed);
    let empty = vm.block_stats(0).unwrap();
    assert_eq!((empty.writes, empty.write_hist.count()), (0, 0));
    assert_eq!(empty.percentile(50.0), None);

    // The next window holds exactly the requests completed in it.
    vm.resume().unwrap();
    wait_counter(&vm, 0, 500);
    vm.pause().unwrap();
    let second = vm.take_block_stats(0).unwrap();
    let completed2 = vm.save_state().unwrap().devices.block[0].completed;
    assert_eq!(second.writes, completed2 - completed, "{second:?}");
    assert!(second.writes >= 500);
    assert_plausible(&second);
    assert!(vm.block_errors().is_empty(), "{:?}", vm.block_errors());
}
