//! The micro-VM on real /dev/kvm, in this process: memstress and its staircase at any
//! pause, the vCPU state machine, dirty harvesting, throttling, CPUID, and a qcow2 disk with
//! a 3-layer backing chain made by qemu-img.

mod vm_common;

use std::path::Path;
use std::time::{Duration, Instant};

use vm_common::{count_byte, qcow2_on, require_kvm, s, tool};
use vmgate_migrate::disk::{Disk, DiskFormat, DiskSpec};
use vmgate_migrate::vm::check::{check_staircase, check_vm};
use vmgate_migrate::vm::{
    GuestProgram, PAGE_BYTES, VcpuRequest, VcpuResponse, VcpuRunState, Vm, VmConfig, VmError,
    VmOptions,
};

fn config(text: &str, dir: &Path) -> VmConfig {
    VmConfig::from_toml(text, Some(dir)).expect("valid test config")
}

const MEMSTRESS_2: &str = r#"
name = "memstress"
memory_mib = 256
vcpus = 2
[[vcpu]]
program = "memstress"
start_mib = 4
size_mib = 32
marker_every = 4
[[vcpu]]
program = "memstress"
start_mib = 128
size_mib = 32
marker_every = 4
"#;

/// Waits until every vCPU in `vcpus` has counted `n` more than `from` (first passes touch
/// fresh memory, which is slow under kvm_pvm: tens of µs per page).
fn wait_progress(vm: &Vm, vcpus: &[u32], n: u64) {
    let from: Vec<u64> = vcpus
        .iter()
        .map(|&i| vm.mailbox(i).unwrap().counter)
        .collect();
    let t = Instant::now();
    while vcpus
        .iter()
        .zip(&from)
        .any(|(&i, f)| vm.mailbox(i).unwrap().counter < f + n)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest made no progress in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn memstress_runs_markers_arrive_and_staircase_holds_at_every_pause() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let vm = Vm::create(
        config(MEMSTRESS_2, dir.path()),
        &VmOptions {
            console_log: Some(console.clone()),
            ..VmOptions::default()
        },
    )
    .unwrap();
    assert_eq!(vm.layout().total_pages(), 65536);
    vm.resume().unwrap();
    wait_progress(&vm, &[0, 1], 1);
    let mut last = [0u64; 2];
    let mut steps_inside = 0;
    // Pauses at uneven moments; every one must leave a valid staircase on both vCPUs.
    for (round, ms) in [400u64, 37, 113, 250, 71, 190].iter().enumerate() {
        std::thread::sleep(Duration::from_millis(*ms));
        let report = vm.pause().unwrap();
        assert!(report.stopped.is_empty(), "{report:?}");
        let checks = check_vm(&vm).unwrap();
        assert_eq!(checks.len(), 2);
        for (i, c) in checks.iter().enumerate() {
            assert!(c.ok, "round {round}: {c}");
            assert_eq!(c.check, "staircase");
            assert!(c.counter >= last[i], "pass counter went back: {c}");
            last[i] = c.counter;
            if c.summary.contains("step at") {
                steps_inside += 1;
            }
        }
        vm.resume().unwrap();
    }
    vm.pause().unwrap();
    let last = [
        vm.mailbox(0).unwrap().counter,
        vm.mailbox(1).unwrap().counter,
    ];
    assert!(
        last[0] >= 4 && last[1] >= 4,
        "the guests made too few passes: {last:?}"
    );
    // Each memstress vCPU writes its marker every 4 passes.
    let a = count_byte(&console, b'A');
    let b = count_byte(&console, b'B');
    assert!(a >= 1 && b >= 1, "markers A={a} B={b}");
    // A pause may fall between counting the 4th pass and writing its marker.
    for (markers, passes) in [(a as u64, last[0]), (b as u64, last[1])] {
        assert!(
            markers == passes / 4 || markers + 1 == passes / 4,
            "{markers} markers for {passes} passes"
        );
    }
    assert_eq!(vm.serial_bytes(), (a + b) as u64);
    // Not every pause can land exactly between two passes.
    assert!(steps_inside > 0, "no pause landed inside a pass");
}

#[test]
fn a_page_changed_behind_the_guests_back_breaks_the_staircase() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::create(config(MEMSTRESS_2, dir.path()), &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    wait_progress(&vm, &[0], 2);
    vm.pause().unwrap();
    let GuestProgram::Memstress(m) = vm.config().program(0).clone() else {
        panic!("vCPU 0 runs memstress")
    };
    assert!(check_staircase(&vm, 0, &m).unwrap().ok);
    // Emulate a lost page: byte 0 of one page goes back by 3.
    let gpa = m.start_gpa() + 1000 * 4096;
    let index = vm.layout().index_of(gpa).unwrap();
    let mut page = vec![0u8; PAGE_BYTES];
    vm.read_page(index, &mut page).unwrap();
    page[0] = page[0].wrapping_sub(3);
    vm.write_page(index, &page).unwrap();
    let r = check_staircase(&vm, 0, &m).unwrap();
    assert!(!r.ok);
    assert_eq!(r.bad_count, 1);
    assert_eq!(r.bad[0].gpa, Some(gpa), "{r}");
    // The VMM's own write is in the next harvest even though KVM's log does not have it.
    let dirty = vm.harvest_dirty().unwrap();
    assert!(dirty.is_set(index));
}

#[test]
fn state_machine_answers_requests_it_does_not_allow() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::create(config(MEMSTRESS_2, dir.path()), &VmOptions::default()).unwrap();
    assert_eq!(
        vm.vcpu_states().unwrap(),
        vec![VcpuRunState::Paused, VcpuRunState::Paused]
    );
    // Paused: pause is refused by the VM and by the vCPU, with an answer.
    assert!(matches!(
        vm.pause(),
        Err(VmError::WrongState {
            op: "pause",
            state: "paused"
        })
    ));
    match vm.vcpu_request(0, VcpuRequest::Pause).unwrap() {
        VcpuResponse::NotAllowed { request, state } => {
            assert_eq!(request, "pause");
            assert_eq!(state, VcpuRunState::Paused);
        }
        other => panic!("{other:?}"),
    }
    vm.resume().unwrap();
    assert_eq!(
        vm.vcpu_states().unwrap(),
        vec![VcpuRunState::Running, VcpuRunState::Running]
    );
    // Running: saving and resuming are refused, the guest keeps running.
    let e = vm.save_state().unwrap_err();
    assert_eq!(
        e.to_string(),
        "the VM cannot save state while it is running"
    );
    assert!(matches!(vm.resume(), Err(VmError::WrongState { .. })));
    for req in [VcpuRequest::SaveState, VcpuRequest::Resume] {
        let name = req.name();
        match vm.vcpu_request(1, req).unwrap() {
            VcpuResponse::NotAllowed { request, state } => {
                assert_eq!(request, name);
                assert_eq!(state, VcpuRunState::Running);
            }
            other => panic!("{other:?}"),
        }
    }
    let before = vm.mailbox(1).unwrap().counter;
    wait_progress(&vm, &[1], 1);
    // Pausing is prompt while ring-3 code runs (no exits for whole passes).
    let t = Instant::now();
    vm.pause().unwrap();
    let pause_time = t.elapsed();
    assert!(
        vm.mailbox(1).unwrap().counter > before,
        "the guest did not run"
    );
    let frozen = vm.mailbox(1).unwrap().counter;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.mailbox(1).unwrap().counter, frozen, "a paused guest ran");
    let state = vm.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert!(!state.vcpus[0].msrs.is_empty());
    assert!(!state.vcpus[0].cpuid.is_empty());
    // The registers are those of the memstress loop, in ring 3.
    assert_eq!(state.vcpus[0].sregs.cs.dpl, 3);
    assert_eq!(state.vcpus[0].regs.rdi, 4 << 20);
    eprintln!("pause took {pause_time:?}");
}

#[test]
fn harvest_reports_guest_writes_then_clears() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
name = "h"
memory_mib = 64
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 16
"#;
    let vm = Vm::create(config(text, dir.path()), &VmOptions::default()).unwrap();
    // Nothing ran yet: building the VM is not guest progress.
    assert_eq!(vm.harvest_dirty().unwrap().count(), 0);
    vm.resume().unwrap();
    wait_progress(&vm, &[0], 1);
    vm.pause().unwrap();
    let dirty = vm.harvest_dirty().unwrap();
    let first = vm.layout().index_of(8 << 20).unwrap();
    let range: Vec<u64> = (first..first + 4096).collect();
    assert!(
        range.iter().all(|&i| dirty.is_set(i)),
        "every memstress page is dirty"
    );
    assert!(
        !dirty.is_set(vm.layout().index_of(40 << 20).unwrap()),
        "untouched page"
    );
    // The mailbox page (pass counter) is dirty too; nothing else outside the range but
    // the mailbox and the stack-free system area.
    assert!(dirty.is_set(vm.layout().index_of(0x2000).unwrap()));
    assert_eq!(vm.harvest_dirty().unwrap().count(), 0, "harvest clears");
    // Host memory exists behind the touched pages only: a copy may skip the rest unread.
    let populated = vm.populated_pages();
    assert!(range.iter().all(|&i| populated.is_set(i)));
    let untouched = vm.layout().index_of(40 << 20).unwrap();
    assert!(!populated.is_set(untouched));
    assert!(
        populated.count() < vm.layout().total_pages() / 2,
        "{}",
        populated.count()
    );
}

#[test]
fn throttle_slows_the_guest_down() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
name = "t"
memory_mib = 32
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 4
marker_every = 1000000
"#;
    let vm = Vm::create(config(text, dir.path()), &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    wait_progress(&vm, &[0], 2); // past the first (faulting) pass
    let rate = |vm: &Vm| {
        let a = vm.mailbox(0).unwrap().counter;
        std::thread::sleep(Duration::from_millis(500));
        vm.mailbox(0).unwrap().counter - a
    };
    let free = rate(&vm);
    vm.set_throttle(0.9);
    assert_eq!(vm.throttle(), 0.9);
    let throttled = rate(&vm);
    vm.set_throttle(0.0);
    vm.pause().unwrap();
    assert!(free > 0);
    assert!(
        throttled * 3 < free,
        "90% throttle should cut passes by far more than 3x: free {free}, throttled {throttled}"
    );
}

#[test]
fn cpuid_is_recorded_and_compat_mode_masks_the_configured_table() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
name = "c"
memory_mib = 16
vcpus = 2
cpu_compat = true
"#;
    let vm = Vm::create(config(text, dir.path()), &VmOptions::default()).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    for (i, v) in state.vcpus.iter().enumerate() {
        let leaf1 = v.cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(u64::from(leaf1.ebx >> 24), i as u64, "APIC ID of vCPU {i}");
    }
    // What was configured is the baseline; what the guest sees is recorded (under kvm_pvm
    // ring-3 CPUID is native, so the recorded table can hold more: see cpuid's module doc).
    let configured = vmgate_migrate::vm::cpuid::guest_cpuid(vm.supported_cpuid(), 0, 2, true);
    let leaf7 = configured.iter().find(|e| e.function == 7 && e.index == 0);
    assert!(leaf7.is_none_or(|e| e.ebx == 0 && e.ecx == 0 && e.edx == 0));
    let leaf0 = configured.iter().find(|e| e.function == 0).unwrap();
    assert!(leaf0.eax <= 0xD);
    // The idle program halts: both vCPUs are still paused, not stopped.
    assert_eq!(
        vm.vcpu_states().unwrap(),
        vec![VcpuRunState::Paused, VcpuRunState::Paused]
    );
}

#[test]
fn qcow2_three_layer_chain_guest_writes_land_in_the_top_layer() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, mid, top) = (
        d.join("base.qcow2"),
        d.join("mid.qcow2"),
        d.join("top.qcow2"),
    );
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "16M"],
    );
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 8M 64k", s(&base)],
    );
    qcow2_on(&mid, "base.qcow2", "qcow2");
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 12M 64k", s(&mid)],
    );
    qcow2_on(&top, "mid.qcow2", "qcow2");
    let sum = |p: &Path| tool("sha256sum", &[s(p)]);
    let (base_sum, mid_sum) = (sum(&base), sum(&mid));

    let text = r#"
name = "q"
memory_mib = 32
vcpus = 2
[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 200
marker_every = 50
[[vcpu]]
program = "memstress"
start_mib = 8
size_mib = 8
[[disk]]
path = "top.qcow2"
format = "qcow2"
"#;
    let console = d.join("console.log");
    let vm = Vm::create(
        config(text, d),
        &VmOptions {
            console_log: Some(console.clone()),
            ..VmOptions::default()
        },
    )
    .unwrap();
    vm.resume().unwrap();
    wait_progress(&vm, &[0], 450);
    let p = vm.pause().unwrap();
    assert!(p.stopped.is_empty(), "{p:?}");
    assert!(vm.block_errors().is_empty(), "{:?}", vm.block_errors());
    let last = vm.mailbox(0).unwrap().counter;
    assert!(
        last > 200,
        "the guest wrapped around its 200 blocks at least once: {last}"
    );
    assert!(count_byte(&console, b'a') >= 4);
    let checks = check_vm(&vm).unwrap();
    assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
    assert_eq!(checks[0].check, "disk-sequence");
    vm.flush_disks().unwrap();
    drop(vm);

    // The lower layers are untouched; the top holds the guest's blocks.
    assert_eq!(sum(&base), base_sum);
    assert_eq!(sum(&mid), mid_sum);
    let map = tool("qemu-img", &["map", "--output=json", s(&top)]);
    let entries: serde_json::Value = serde_json::from_str(&map).unwrap();
    let in_top: u64 = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        in_top >= 200 * 4096,
        "top layer holds {in_top} bytes of data"
    );
    tool("qemu-img", &["check", "-q", "-f", "qcow2", s(&top)]);

    // Reading through the chain still shows the lower layers' data outside the region.
    let disk = Disk::open(
        &DiskSpec {
            path: top.clone(),
            format: DiskFormat::Qcow2,
        },
        false,
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 8 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0x11));
    disk.read_at(&mut buf, 12 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0x22));
}

#[test]
fn config_errors_reach_the_user_before_kvm() {
    let e = VmConfig::from_toml(
        "name = \"x\"\nmemory_mib = 64\nvcpus = 1\n[[vcpu]]\nprogram = \"memstress\"\nstart_mib = 60\nsize_mib = 8\n",
        None,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "vCPU 0: memstress range 60..68 MiB is not inside guest RAM above the 4 MiB system area (RAM: 0..64 MiB)"
    );
    // A region past the end of its disk is refused when the disk is opened.
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            s(&dir.path().join("d.raw")),
            "1M",
        ],
    );
    let text = r#"
name = "r"
memory_mib = 16
vcpus = 1
[[vcpu]]
program = "diskstress"
disk = 0
blocks = 300
[[disk]]
path = "d.raw"
format = "raw"
"#;
    let e = Vm::create(config(text, dir.path()), &VmOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "vCPU 0: diskstress blocks 0..300 of 4096 bytes do not fit disk 0 (256 blocks)"
    );
}
