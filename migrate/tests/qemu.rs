//! The QEMU backend against real QEMU (`accel = "tcg"`) and the Linux test guest built by
//! tests/guest/build: boot, console, agent, checks, echo from the switch's namespace, ACPI
//! stop and restart with the disk sequence intact, re-attach after the handle was dropped,
//! pause/resume, power-off fallback, a killed QEMU, firmware disk boot, and refusals.

mod qemu_common;

use std::time::{Duration, Instant};

use qemu_common::*;
use vmgate_guest::agent::READY_MARKER;
use vmgate_migrate::qemu::{
    Attached, ExitKind, QemuVm, QemuVmDefinition, StartMode, StopOutcome, VmState,
};

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// A Linux guest boots (kernel and marker on its console), reports its boot id and uptime,
/// passes its checks, answers on its echo service from the switch's namespace, shuts down
/// on an ACPI request, and after a new start finds the sequence it wrote intact on its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_boots_serves_echo_passes_checks_and_keeps_its_disk() {
    let switch = Switch::new();
    let t = TestHost::new(vec![switch.config("Lab")]).await;
    t.qcow2("linux/disk.qcow2", "64M");
    let vm = t.validate(&linux_toml("linux", Some("linux/disk.qcow2"), true, ""));
    let started = Instant::now();
    let h = t.start(&vm, StartMode::Run).await;
    let console = wait_for_text(&t.console("linux"), READY_MARKER, 1, BOOT_TIMEOUT).await;
    eprintln!(
        "booted to the marker in {:.1} s",
        started.elapsed().as_secs_f32()
    );
    assert!(
        console.contains("Linux version"),
        "no kernel banner on the console"
    );
    assert_eq!(h.state().await, VmState::Running);
    assert!(h.qemu_version().major >= 7, "{}", h.qemu_version());

    let status = h.guest_status().await.expect("guest status");
    assert!(is_uuid(&status.boot_id), "boot id {:?}", status.boot_id);
    assert!(console.contains(&format!("boot_id={}", status.boot_id)));
    assert!(status.uptime_ms > 0);
    let disk = status.disk.clone().expect("the guest writes its disk");
    assert_eq!(disk.boot_seq, 0, "a fresh disk");

    let report = h.guest_check().await.expect("guest check");
    assert!(report.passed(), "checks failed: {report:?}");
    assert_eq!(
        report
            .checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["memory", "disk"]
    );

    let reply = switch
        .echo("hello through the virtual switch", Duration::from_secs(60))
        .expect("echo from the switch's namespace");
    assert_eq!(reply, "hello through the virtual switch");

    // Stop: ACPI power button; the guest makes its last write durable and powers off.
    let before = h.guest_status().await.unwrap();
    let durable_before = before.disk.unwrap().durable_seq;
    assert!(durable_before > 0, "the guest wrote nothing");
    let outcome = h.shutdown(Duration::from_secs(90)).await.expect("shutdown");
    let StopOutcome::ShutDown(reason) = outcome else {
        panic!("the guest did not shut down by itself: {outcome:?}");
    };
    assert_eq!(reason.kind, ExitKind::GuestShutdown, "{reason}");
    assert!(matches!(h.state().await, VmState::Off(_)));
    let console = std::fs::read_to_string(t.console("linux")).unwrap();
    assert!(console.contains("power button pressed"), "{console}");

    // Start again: a new boot, the disk's sequence intact up to (at least) the last write
    // the guest reported durable.
    let h2 = t.start(&vm, StartMode::Run).await;
    wait_for_text(&t.console("linux"), READY_MARKER, 2, BOOT_TIMEOUT).await;
    let after = h2.guest_status().await.unwrap();
    assert_ne!(after.boot_id, before.boot_id, "a restart is a new boot");
    let disk = after.disk.unwrap();
    assert!(
        disk.boot_seq >= durable_before,
        "the disk held sequence {} at boot, but {durable_before} had been durable",
        disk.boot_seq
    );
    let report = h2.guest_check().await.unwrap();
    assert!(report.passed(), "checks after the restart: {report:?}");
    let power = h2.power_off().await.unwrap();
    assert_eq!(power.kind, ExitKind::PoweredOff, "{power}");
}

/// The daemon's side (the handle) goes away while the guest runs and comes back: the guest
/// never noticed (same boot id, uptime continuous). Then pause and resume, and a stop whose
/// ACPI request a paused guest cannot answer falls back to power off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handle_reattaches_to_the_running_guest() {
    let t = TestHost::new(vec![]).await;
    t.qcow2("linux/disk.qcow2", "64M");
    let vm = t.validate(&linux_toml("reattach", Some("linux/disk.qcow2"), false, ""));
    let h = t.start(&vm, StartMode::Run).await;
    wait_for_text(&t.console("reattach"), READY_MARKER, 1, BOOT_TIMEOUT).await;
    let pid = h.pid();
    let first = h.guest_status().await.unwrap();
    let dropped_at = Instant::now();
    drop(h);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let Attached::Running(h) = QemuVm::attach(&t.host, "reattach").await.expect("attach") else {
        panic!("the guest is not running any more");
    };
    assert_eq!(h.pid(), pid);
    assert_eq!(h.state().await, VmState::Running);
    let second = h.guest_status().await.unwrap();
    let elapsed = u64::try_from(dropped_at.elapsed().as_millis()).unwrap();
    assert_eq!(second.boot_id, first.boot_id, "the guest rebooted");
    assert!(
        second.uptime_ms >= first.uptime_ms + 1500,
        "uptime {} -> {} ms across {elapsed} ms",
        first.uptime_ms,
        second.uptime_ms
    );
    assert!(second.uptime_ms <= first.uptime_ms + elapsed + 1000);
    assert!(second.memory.passes > first.memory.passes);
    let report = h.guest_check().await.unwrap();
    assert!(report.passed(), "{report:?}");

    h.pause().await.unwrap();
    assert_eq!(h.state().await, VmState::Paused);
    let paused = h.guest_status().await;
    // A paused guest does not answer its agent.
    assert!(paused.is_err(), "a paused guest answered: {paused:?}");
    h.resume().await.unwrap();
    assert_eq!(h.state().await, VmState::Running);
    let third = h.guest_status().await.unwrap();
    assert_eq!(third.boot_id, first.boot_id);

    h.pause().await.unwrap();
    let outcome = h.shutdown(Duration::from_secs(2)).await.unwrap();
    let StopOutcome::PoweredOff(reason) = outcome else {
        panic!("a paused guest cannot shut down by itself: {outcome:?}");
    };
    assert_eq!(reason.kind, ExitKind::PoweredOff, "{reason}");
    match QemuVm::attach(&t.host, "reattach").await.unwrap() {
        Attached::Off(Some(r)) => assert_eq!(r.kind, ExitKind::PoweredOff, "{r}"),
        other => panic!("expected off with a reason: {other:?}"),
    }
}

/// A QEMU killed under the backend shows as off with the reason, whether the backend started
/// it (it knows the signal) or attached to it later; attaching afterwards reports the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_off_with_the_reason() {
    let t = TestHost::new(vec![]).await;
    let vm = t.validate(&linux_toml("victim", None, false, ""));
    let kill = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    };

    let h = t.start(&vm, StartMode::Run).await;
    kill(h.pid());
    let reason = tokio::time::timeout(Duration::from_secs(20), h.wait_exit())
        .await
        .expect("the death was noticed");
    assert_eq!(reason.kind, ExitKind::Killed { signal: 9 }, "{reason}");
    assert!(
        reason.to_string().contains("killed by signal 9 (SIGKILL)"),
        "{reason}"
    );
    assert_eq!(h.state().await, VmState::Off(reason.clone()));
    assert!(matches!(
        h.pause().await,
        Err(vmgate_migrate::qemu::QemuError::NotRunning { .. })
    ));
    match QemuVm::attach(&t.host, "victim").await.unwrap() {
        Attached::Off(Some(r)) => assert_eq!(r, reason),
        other => panic!("expected off with the reason: {other:?}"),
    }

    // Started, handle dropped, re-attached, then killed: no exit status, but no shutdown
    // either.
    let h = t.start(&vm, StartMode::Run).await;
    drop(h);
    let Attached::Running(h) = QemuVm::attach(&t.host, "victim").await.unwrap() else {
        panic!("not running");
    };
    kill(h.pid());
    let reason = tokio::time::timeout(Duration::from_secs(20), h.wait_exit())
        .await
        .expect("the death was noticed");
    assert!(
        matches!(
            reason.kind,
            ExitKind::Vanished | ExitKind::Killed { signal: 9 }
        ),
        "{reason}"
    );
    assert!(reason.to_string().contains("SIGKILL"), "{reason}");
}

/// A definition that booting from a disk with the firmware: SeaBIOS runs the disk's boot
/// sector, which prints a marker on the serial port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_boots_a_disk() {
    let t = TestHost::new(vec![]).await;
    let image = t.root.join("boot/disk.raw");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let mut disk = vec![0u8; 1 << 20];
    let sector = boot_sector("vmgate-bootsector-ok\r\n");
    disk[..512].copy_from_slice(&sector);
    std::fs::write(&image, disk).unwrap();
    let vm = t.validate(
        r#"
name = "bios"
backend = "qemu"
memory_mib = 64
vcpus = 1
cpu_model = "qemu64"
accel = "tcg"
machine = "pc"
serial_log = "boot/console.log"

[boot]
firmware = "bios"
disk = 0

[[disk]]
path = "boot/disk.raw"
format = "raw"
"#,
    );
    let h = t.start(&vm, StartMode::Run).await;
    wait_for_text(
        &t.root.join("boot/console.log"),
        "vmgate-bootsector-ok",
        1,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(h.power_off().await.unwrap().kind, ExitKind::PoweredOff);
}

/// A 512-byte MBR that writes `text` to COM1 and halts.
fn boot_sector(text: &str) -> Vec<u8> {
    use iced_x86::code_asm::*;
    // The text sits at offset 0x100 of the sector, loaded at 0x7c00.
    const TEXT_AT: usize = 0x100;
    let mut a = CodeAssembler::new(16).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.cli().unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(si, 0x7c00u32 + u32::try_from(TEXT_AT).unwrap())
        .unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.set_label(&mut next).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut done).unwrap();
    a.hlt().unwrap();
    a.jmp(done).unwrap();
    let mut sector = a.assemble(0x7c00).unwrap();
    assert!(sector.len() <= TEXT_AT && TEXT_AT + text.len() < 510);
    sector.resize(TEXT_AT, 0);
    sector.extend_from_slice(text.as_bytes());
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    sector
}

/// Refused definitions name the field at fault, and nothing is started or created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_definitions_name_the_field_and_start_nothing() {
    let switch = Switch::new();
    let t = TestHost::new(vec![switch.config("Lab")]).await;
    t.qcow2("linux/disk.qcow2", "64M");
    let outside = t.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("vmlinuz"), b"x").unwrap();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            outside.join("base.qcow2").to_str().unwrap(),
            "64M",
        ],
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            outside.join("base.qcow2").to_str().unwrap(),
            t.root.join("linux/child.qcow2").to_str().unwrap(),
        ],
    );
    std::os::unix::fs::symlink(outside.join("vmlinuz"), t.root.join("linux/link")).unwrap();
    let good = linux_toml("refused", Some("linux/disk.qcow2"), true, "");

    let cases: Vec<(&str, String)> = vec![
        (
            "boot.kernel",
            good.replace(
                "kernel = \"linux/vmlinuz\"",
                &format!("kernel = \"{}\"", outside.join("vmlinuz").display()),
            ),
        ),
        (
            "boot.kernel",
            good.replace(
                "kernel = \"linux/vmlinuz\"",
                "kernel = \"linux/../../outside/vmlinuz\"",
            ),
        ),
        (
            "boot.initrd",
            good.replace("initrd = \"linux/initrd.img\"", "initrd = \"linux/link\""),
        ),
        (
            "disk[0].path (backing file 1)",
            good.replace("linux/disk.qcow2", "linux/child.qcow2"),
        ),
        (
            "disk[0].path",
            good.replace("linux/disk.qcow2", "/etc/passwd"),
        ),
        (
            "cpu_model",
            good.replace("cpu_model = \"qemu64\"", "cpu_model = \"Pentium9000\""),
        ),
        (
            "cpu_model",
            good.replace("cpu_model = \"qemu64\"", "cpu_model = \"host\""),
        ),
        (
            "memory_mib",
            good.replace("memory_mib = 256", "memory_mib = 1000000000"),
        ),
        ("vcpus", good.replace("vcpus = 1", "vcpus = 4096")),
        (
            "nic[0].switch",
            good.replace("switch = \"Lab\"", "switch = \"Internet\""),
        ),
        (
            "nic[0].mac",
            good.replace("52:54:00:12:34:57", "01:00:5e:00:00:01"),
        ),
        (
            "machine",
            good.replace("accel = \"tcg\"", "accel = \"tcg\"\nmachine = \"microvm\""),
        ),
    ];
    for (field, toml) in &cases {
        let def = QemuVmDefinition::from_toml(toml).unwrap();
        let e = t
            .host
            .validate(&def)
            .expect_err(&format!("{field} should be refused"));
        let text = e.to_string();
        eprintln!("refused: {}", chain(&e));
        assert!(
            text.starts_with(&format!("{field}: ")),
            "expected the field {field:?} named: {text}"
        );
    }
    // A key QEMU would take as an option is not part of the format at all.
    let e = QemuVmDefinition::from_toml(&format!("{good}\nextra_args = [\"-vnc\", \":0\"]\n"))
        .unwrap_err();
    assert!(chain(&e).contains("extra_args"), "{}", chain(&e));
    // Nothing was started: no runtime folder, no QEMU.
    assert!(!t.host.vm_run_dir("refused").exists());
    let ps = tool("ps", &["-eo", "args"]);
    assert!(
        !ps.contains("guest=refused"),
        "a QEMU for the refused VM runs"
    );
}

/// A VM cannot be started twice, and a second QEMU on an image another QEMU writes is refused
/// with QEMU's own reason (its image locking), leaving the first one untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_and_a_second_writer_are_refused() {
    let t = TestHost::new(vec![]).await;
    t.qcow2("linux/disk.qcow2", "64M");
    let vm = t.validate(&linux_toml("first", Some("linux/disk.qcow2"), false, ""));
    let h = t.start(&vm, StartMode::Paused).await;
    assert_eq!(h.state().await, VmState::Paused);

    let e = QemuVm::start(&t.host, &vm, StartMode::Run)
        .await
        .unwrap_err();
    assert!(
        matches!(e, vmgate_migrate::qemu::QemuError::AlreadyRunning { pid, .. } if pid == h.pid()),
        "{}",
        chain(&e)
    );

    let other = t.validate(&linux_toml("second", Some("linux/disk.qcow2"), false, ""));
    let e = QemuVm::start(&t.host, &other, StartMode::Run)
        .await
        .unwrap_err();
    let text = chain(&e);
    assert!(
        matches!(e, vmgate_migrate::qemu::QemuError::StartFailed { .. }),
        "{text}"
    );
    eprintln!("refused as: {text}");
    assert!(text.contains("QEMU did not start"), "{text}");
    assert!(text.contains("lock"), "QEMU's reason is missing: {text}");
    // The first one is unharmed.
    assert_eq!(h.state().await, VmState::Paused);
    assert_eq!(h.power_off().await.unwrap().kind, ExitKind::PoweredOff);
}
