//! QEMU's command line, built only from a [`ValidatedVm`] and the runtime files this backend
//! chose: nothing a user or a peer wrote is passed as an option.
//!
//! What it always contains, and why:
//! - `-sandbox on,...=deny`: QEMU's seccomp filter, with spawning, privilege changes,
//!   resource control and obsolete system calls denied;
//! - `-nodefaults -no-user-config -display none`: no default devices (no VGA, no default NIC,
//!   no default serial or monitor), no configuration file, no display, hence no VNC or SPICE
//!   listener; no gdbstub;
//! - one monitor, QMP, on a UNIX socket in the VM's runtime folder;
//! - disks as `-blockdev` nodes, one per file of each backing chain, the chain given by node
//!   names (QEMU never opens a backing file by a name found inside an image), serialized from
//!   QEMU's own schema types (qapi) as JSON;
//! - NICs as taps the backend opened (`fd=`), so QEMU creates no network interface and opens
//!   no socket;
//! - the serial port written to a file; the agent channel a virtio-serial port whose chardev
//!   is a UNIX socket in the runtime folder, served by QEMU to the daemon only;
//! - `-S` (and `-incoming defer` for a move's destination): the guest starts only when the
//!   backend says `cont`.
//!
//! Values inside QEMU's `key=value,...` options (paths) are escaped (`,` → `,,`); JSON options
//! need no escaping.

use std::os::fd::RawFd;

use qapi::qmp::{
    BlockdevDiscardOptions, BlockdevOptions, BlockdevOptionsBase, BlockdevOptionsFile,
    BlockdevOptionsGenericCOWFormat, BlockdevOptionsGenericFormat, BlockdevOptionsQcow2,
    BlockdevOptionsRaw, BlockdevRef, BlockdevRefOrNull, Netdev, NetdevTapOptions,
};
use serde::Serialize;

use super::definition::{Accel, Boot, ResolvedDisk, ValidatedVm};
use super::process::RuntimePaths;
use crate::disk::DiskFormat;

/// The seccomp sandbox.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The name of the virtio-serial bus of the agent.
const AGENT_BUS: &str = "vser0";

/// How the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// Run once the backend attached (the normal start).
    Run,
    /// Stay paused after the start (`vm show` says paused; resume runs it).
    Paused,
    /// Wait for an incoming migration (`-incoming defer`; the stream is given later with
    /// `migrate-incoming`), and stay paused once it arrived (`-S`) until `cont`: the
    /// destination of a move runs the guest only when the move says so (after the disks'
    /// mirror is complete).
    Incoming,
}

/// The node name of a disk's top layer (what `-device` and block jobs name).
pub fn disk_node(disk: usize) -> String {
    format!("disk{disk}")
}

/// The node name of a disk's layer (0: the top).
pub fn layer_node(disk: usize, layer: usize) -> String {
    if layer == 0 {
        disk_node(disk)
    } else {
        format!("disk{disk}-backing{layer}")
    }
}

/// The QOM id of a disk's device.
pub fn disk_device(disk: usize) -> String {
    format!("vdisk{disk}")
}

/// The QOM id of a NIC's device.
pub fn nic_device(nic: usize) -> String {
    format!("nic{nic}")
}

/// `,` doubled, as QEMU's `key=value,...` option syntax wants inside a value.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn json<T: Serialize>(value: &T) -> String {
    // Our own plain structs and qapi's types serialize without error.
    serde_json::to_string(value).unwrap_or_default()
}

/// The arguments (without the binary) that start `vm`. `tap_fds[i]` is the open tap of NIC
/// `i`, inherited by QEMU under the same number.
pub fn command_line(
    vm: &ValidatedVm,
    paths: &RuntimePaths,
    tap_fds: &[RawFd],
    mode: StartMode,
) -> Vec<String> {
    let def = &vm.definition;
    let mut a: Vec<String> = Vec::new();
    let mut arg = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    arg(&["-name", &format!("guest={},debug-threads=on", def.name)]);
    arg(&["-sandbox", SANDBOX]);
    arg(&["-nodefaults", "-no-user-config", "-display", "none"]);
    arg(&["-msg", "timestamp=on"]);
    // The reason of every shutdown request lands in QEMU's log, where it can be read even when
    // no daemon was connected to see the SHUTDOWN event.
    arg(&["-trace", "enable=qemu_system_shutdown_request"]);
    arg(&["-pidfile", &paths.pidfile.to_string_lossy()]);
    arg(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&paths.qmp.to_string_lossy())
        ),
    ]);
    arg(&["-mon", "chardev=qmp,mode=control"]);

    arg(&["-machine", &vm.machine_type]);
    arg(&[
        "-accel",
        match def.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        },
    ]);
    arg(&["-cpu", &def.cpu_model]);
    arg(&["-smp", &def.vcpus.to_string()]);
    arg(&["-m", &format!("{}M", def.memory_mib)]);

    match &vm.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            arg(&["-kernel", &kernel.to_string_lossy()]);
            if let Some(initrd) = initrd {
                arg(&["-initrd", &initrd.to_string_lossy()]);
            }
            if !cmdline.is_empty() {
                arg(&["-append", cmdline]);
            }
        }
        Boot::Firmware { .. } => arg(&["-boot", "strict=on"]),
    }
    let boot_disk = match vm.boot {
        Boot::Firmware { disk, .. } => disk,
        Boot::Kernel { .. } => None,
    };

    for (i, d) in vm.disks.iter().enumerate() {
        for node in blockdevs(i, d) {
            arg(&["-blockdev", &json(&node)]);
        }
        arg(&[
            "-device",
            &json(&VirtioBlk {
                driver: "virtio-blk-pci",
                id: disk_device(i),
                drive: disk_node(i),
                bootindex: (boot_disk == Some(i)).then_some(1),
            }),
        ]);
    }

    for (i, (nic, fd)) in vm.nics.iter().zip(tap_fds).enumerate() {
        let netdev = Netdev::tap {
            id: format!("net{i}"),
            tap: NetdevTapOptions {
                br: None,
                downscript: None,
                fd: Some(fd.to_string()),
                fds: None,
                helper: None,
                ifname: None,
                poll_us: None,
                queues: None,
                script: None,
                sndbuf: None,
                vhost: None,
                vhostfd: None,
                vhostfds: None,
                vhostforce: None,
                vnet_hdr: None,
            },
        };
        arg(&["-netdev", &json(&netdev)]);
        arg(&[
            "-device",
            &json(&VirtioNet {
                driver: "virtio-net-pci",
                id: nic_device(i),
                netdev: format!("net{i}"),
                mac: nic.mac.to_string(),
            }),
        ]);
    }

    let console = vm.serial_log.as_ref().unwrap_or(&paths.console_log);
    arg(&[
        "-chardev",
        &format!(
            "file,id=serial0,path={},append=on",
            escape(&console.to_string_lossy())
        ),
    ]);
    arg(&["-serial", "chardev:serial0"]);

    if def.agent {
        arg(&[
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                escape(&paths.agent.to_string_lossy())
            ),
        ]);
        arg(&[
            "-device",
            &json(&Device {
                driver: "virtio-serial-pci",
                id: AGENT_BUS.to_string(),
            }),
        ]);
        arg(&[
            "-device",
            &json(&SerialPort {
                driver: "virtserialport",
                bus: format!("{AGENT_BUS}.0"),
                chardev: "agent",
                name: vmgate_guest::agent::PORT_NAME,
            }),
        ]);
    }

    match mode {
        StartMode::Run | StartMode::Paused => arg(&["-S"]),
        StartMode::Incoming => arg(&["-S", "-incoming", "defer"]),
    }
    a
}

/// The `-blockdev` nodes of a disk, bottom layer first (each node refers only to nodes
/// already defined).
fn blockdevs(disk: usize, d: &ResolvedDisk) -> Vec<BlockdevOptions> {
    let mut nodes = Vec::new();
    let n = d.layers.len();
    for k in (0..n).rev() {
        let layer = &d.layers[k];
        let read_only = k > 0 || d.read_only;
        let node = layer_node(disk, k);
        let file_node = format!("{node}-file");
        let base = |name: String| BlockdevOptionsBase {
            auto_read_only: None,
            cache: None,
            detect_zeroes: None,
            discard: Some(BlockdevDiscardOptions::unmap),
            force_share: None,
            node_name: Some(name),
            read_only: Some(read_only),
        };
        nodes.push(BlockdevOptions::file {
            base: base(file_node.clone()),
            file: BlockdevOptionsFile {
                aio: None,
                aio_max_batch: None,
                drop_cache: None,
                locking: None,
                pr_manager: None,
                x_check_cache_dropped: None,
                filename: layer.path.to_string_lossy().into_owned(),
            },
        });
        let file = BlockdevOptionsGenericFormat {
            file: BlockdevRef::reference(file_node),
        };
        nodes.push(match layer.format {
            DiskFormat::Raw => BlockdevOptions::raw {
                base: base(node),
                raw: BlockdevOptionsRaw {
                    base: file,
                    offset: None,
                    size: None,
                },
            },
            DiskFormat::Qcow2 => BlockdevOptions::qcow2 {
                base: base(node),
                qcow2: BlockdevOptionsQcow2 {
                    base: BlockdevOptionsGenericCOWFormat {
                        base: file,
                        // The chain as validated, by node name; `null`: no backing file, even
                        // if the image names one.
                        backing: Some(if k + 1 < n {
                            BlockdevRefOrNull::reference(layer_node(disk, k + 1))
                        } else {
                            BlockdevRefOrNull::null(())
                        }),
                    },
                    cache_clean_interval: None,
                    cache_size: None,
                    data_file: None,
                    discard_no_unref: None,
                    encrypt: None,
                    l2_cache_entry_size: None,
                    l2_cache_size: None,
                    lazy_refcounts: None,
                    overlap_check: None,
                    pass_discard_other: None,
                    pass_discard_request: None,
                    pass_discard_snapshot: None,
                    refcount_cache_size: None,
                },
            },
        });
    }
    nodes
}

#[derive(Serialize)]
struct VirtioBlk {
    driver: &'static str,
    id: String,
    drive: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    bootindex: Option<u32>,
}

#[derive(Serialize)]
struct VirtioNet {
    driver: &'static str,
    id: String,
    netdev: String,
    mac: String,
}

#[derive(Serialize)]
struct Device {
    driver: &'static str,
    id: String,
}

#[derive(Serialize)]
struct SerialPort {
    driver: &'static str,
    bus: String,
    chardev: &'static str,
    name: &'static str,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::qemu::definition::{
        BootDefinition, DiskDefinition, Firmware, MacAddress, NicDefinition, QemuVmDefinition,
        ResolvedLayer, ResolvedNic,
    };
    use crate::qemu::host::VirtualSwitch;

    fn vm(boot: Boot) -> ValidatedVm {
        let definition = QemuVmDefinition {
            name: "linux".into(),
            backend: crate::qemu::definition::Backend::Qemu,
            memory_mib: 256,
            vcpus: 2,
            cpu_model: "qemu64".into(),
            accel: Accel::Tcg,
            machine: None,
            agent: true,
            serial_log: None,
            autostart: false,
            boot: BootDefinition::default(),
            disks: vec![DiskDefinition {
                path: "d.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
            }],
            nics: vec![NicDefinition {
                mac: "52:54:00:00:00:01".into(),
                switch: "Lab".into(),
            }],
        };
        ValidatedVm {
            definition,
            machine_type: "pc-q35-10.0".into(),
            boot,
            disks: vec![ResolvedDisk {
                layers: vec![
                    ResolvedLayer {
                        path: "/r/vm,1/top.qcow2".into(),
                        format: DiskFormat::Qcow2,
                    },
                    ResolvedLayer {
                        path: "/r/base.raw".into(),
                        format: DiskFormat::Raw,
                    },
                ],
                read_only: false,
                virtual_size: 1 << 20,
            }],
            nics: vec![ResolvedNic {
                mac: MacAddress([0x52, 0x54, 0, 0, 0, 1]),
                switch: VirtualSwitch {
                    name: "Lab".into(),
                    bridge: "br0".into(),
                    netns: None,
                },
            }],
            serial_log: None,
        }
    }

    fn paths() -> RuntimePaths {
        RuntimePaths::new(PathBuf::from("/run/vmgate/qemu/lin,ux"))
    }

    fn kernel_boot() -> Boot {
        Boot::Kernel {
            kernel: "/r/vmlinuz".into(),
            initrd: Some("/r/initrd.img".into()),
            cmdline: "console=ttyS0 vmgate.ip=10.0.0.2/24".into(),
        }
    }

    fn value_of<'a>(args: &'a [String], opt: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == opt)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_command_line_is_sandboxed_and_listens_nowhere() {
        let args = command_line(&vm(kernel_boot()), &paths(), &[17], StartMode::Run);
        assert_eq!(value_of(&args, "-sandbox"), [SANDBOX]);
        for flag in ["-nodefaults", "-no-user-config", "-S"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing: {args:?}");
        }
        assert_eq!(value_of(&args, "-display"), ["none"]);
        for forbidden in [
            "-vnc",
            "-spice",
            "-gdb",
            "-s",
            "-monitor",
            "-qmp",
            "-daemonize",
            "-incoming",
        ] {
            assert!(
                !args.iter().any(|a| a == forbidden),
                "{forbidden} present: {args:?}"
            );
        }
        // One monitor: QMP on our socket (the comma in the folder name escaped).
        assert_eq!(value_of(&args, "-mon"), ["chardev=qmp,mode=control"]);
        let chardevs = value_of(&args, "-chardev");
        assert!(
            chardevs.contains(
                &"socket,id=qmp,path=/run/vmgate/qemu/lin,,ux/qmp.sock,server=on,wait=off"
            ),
            "{chardevs:?}"
        );
        // No chardev or netdev that opens a network socket.
        assert!(
            chardevs
                .iter()
                .all(|c| !c.contains("host=") && !c.contains("port=")),
            "{chardevs:?}"
        );
        assert!(
            chardevs
                .iter()
                .all(|c| c.starts_with("socket,") || c.starts_with("file,"))
        );
        let netdevs = value_of(&args, "-netdev");
        assert_eq!(netdevs, [r#"{"type":"tap","id":"net0","fd":"17"}"#]);
        assert_eq!(value_of(&args, "-kernel"), ["/r/vmlinuz"]);
        assert_eq!(
            value_of(&args, "-append"),
            ["console=ttyS0 vmgate.ip=10.0.0.2/24"]
        );
        assert_eq!(value_of(&args, "-machine"), ["pc-q35-10.0"]);
        assert_eq!(value_of(&args, "-accel"), ["tcg"]);
        assert_eq!(value_of(&args, "-m"), ["256M"]);
    }

    #[test]
    fn disks_are_explicit_chains_of_nodes() {
        let args = command_line(&vm(kernel_boot()), &paths(), &[17], StartMode::Run);
        let nodes: Vec<serde_json::Value> = value_of(&args, "-blockdev")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(nodes.len(), 4);
        // Bottom first: the raw parent, read-only.
        assert_eq!(nodes[0]["driver"], "file");
        assert_eq!(nodes[0]["filename"], "/r/base.raw");
        assert_eq!(nodes[0]["read-only"], true);
        assert_eq!(nodes[1]["driver"], "raw");
        assert_eq!(nodes[1]["node-name"], "disk0-backing1");
        // The top, writable, its backing given by node name.
        assert_eq!(nodes[2]["filename"], "/r/vm,1/top.qcow2");
        assert_eq!(nodes[3]["driver"], "qcow2");
        assert_eq!(nodes[3]["node-name"], "disk0");
        assert_eq!(nodes[3]["read-only"], false);
        assert_eq!(nodes[3]["backing"], "disk0-backing1");
        assert_eq!(nodes[3]["file"], "disk0-file");
        let devices = value_of(&args, "-device");
        assert!(
            devices.contains(&r#"{"driver":"virtio-blk-pci","id":"vdisk0","drive":"disk0"}"#),
            "{devices:?}"
        );
    }

    #[test]
    fn a_single_qcow2_layer_has_no_backing() {
        let mut v = vm(kernel_boot());
        v.disks[0].layers.truncate(1);
        let args = command_line(&v, &paths(), &[17], StartMode::Run);
        let top: serde_json::Value = serde_json::from_str(value_of(&args, "-blockdev")[1]).unwrap();
        assert_eq!(top["backing"], serde_json::Value::Null);
        assert!(top.as_object().unwrap().contains_key("backing"));
    }

    #[test]
    fn firmware_boot_marks_the_boot_disk_and_incoming_waits() {
        let v = vm(Boot::Firmware {
            firmware: Firmware::Bios,
            disk: Some(0),
        });
        let args = command_line(&v, &paths(), &[17], StartMode::Incoming);
        assert!(value_of(&args, "-kernel").is_empty());
        assert_eq!(value_of(&args, "-boot"), ["strict=on"]);
        assert!(
            value_of(&args, "-device")
                .iter()
                .any(|d| d.contains(r#""bootindex":1"#))
        );
        assert_eq!(value_of(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"));
    }

    #[test]
    fn the_agent_is_a_local_socket_and_absent_when_not_asked_for() {
        let args = command_line(&vm(kernel_boot()), &paths(), &[17], StartMode::Run);
        assert!(value_of(&args, "-chardev").contains(
            &"socket,id=agent,path=/run/vmgate/qemu/lin,,ux/agent.sock,server=on,wait=off"
        ));
        assert!(
            value_of(&args, "-device")
                .iter()
                .any(|d| d.contains("org.vmgate.agent.0"))
        );
        let mut v = vm(kernel_boot());
        v.definition.agent = false;
        let args = command_line(&v, &paths(), &[17], StartMode::Run);
        assert!(!args.iter().any(|a| a.contains("agent")));
    }
}
