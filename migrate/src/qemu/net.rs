//! NICs on a virtual switch: a tap the backend creates in the switch's network namespace,
//! attaches to its bridge and hands to QEMU as an open descriptor (`-netdev tap,fd=N`).
//!
//! QEMU thus never creates an interface, runs a script or opens a socket for the network.
//! The tap is not persistent: it disappears when QEMU (its last holder) exits. Creating it
//! needs CAP_NET_ADMIN.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use super::host::VirtualSwitch;

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

// From <linux/sockios.h>: add an interface to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Errors of creating a NIC's tap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The switch's namespace cannot be entered.
    #[error("cannot enter the network namespace {netns:?} of virtual switch {switch:?}")]
    Netns {
        /// The switch.
        switch: String,
        /// The namespace.
        netns: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tap cannot be created.
    #[error("cannot create a tap for virtual switch {switch:?}")]
    Tap {
        /// The switch.
        switch: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tap cannot be put on the bridge.
    #[error("cannot attach tap {tap} to bridge {bridge:?} of virtual switch {switch:?}")]
    Bridge {
        /// The switch.
        switch: String,
        /// The bridge.
        bridge: String,
        /// The tap.
        tap: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A tap on a switch's bridge.
#[derive(Debug)]
pub struct Tap {
    /// The open tap (QEMU's end).
    pub fd: OwnedFd,
    /// Its interface name (inside the switch's namespace).
    pub name: String,
}

/// Runs `f` on a new thread inside the network namespace `netns` (a name under
/// [`NETNS_DIR`]; `None`: ours). Only that thread changes namespace; it ends with `f`.
pub fn in_netns<T, F>(netns: Option<&str>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns_file = match netns {
        Some(name) => Some(File::open(Path::new(NETNS_DIR).join(name))?),
        None => None,
    };
    std::thread::spawn(move || -> io::Result<T> {
        if let Some(ns) = ns_file {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// Creates a tap in the switch's namespace, attaches it to the bridge and brings it up.
pub fn open_tap(switch: &VirtualSwitch) -> Result<Tap, NetError> {
    let sw = switch.clone();
    let ns_error = |source| NetError::Netns {
        switch: switch.name.clone(),
        netns: switch.netns.clone().unwrap_or_default(),
        source,
    };
    in_netns(switch.netns.as_deref(), move || create_and_attach(&sw)).map_err(ns_error)?
}

fn ifname(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *o = b as libc::c_char;
    }
    out
}

fn ifreq(name: &str) -> libc::ifreq {
    libc::ifreq {
        ifr_name: ifname(name),
        // SAFETY: ifr_ifru is a plain C union of integers, arrays and pointers, for which all
        // zero bytes is a valid value.
        ifr_ifru: unsafe { std::mem::zeroed() },
    }
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn create_and_attach(sw: &VirtualSwitch) -> Result<Tap, NetError> {
    let tap_error = |source| NetError::Tap {
        switch: sw.name.clone(),
        source,
    };
    let tun: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(tap_error)?
        .into();
    let mut req = ifreq("vmgtap%d");
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap_or(0);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, alive for the
    // call; `tun` is an open /dev/net/tun descriptor.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(tap_error(io::Error::last_os_error()));
    }
    let name = name_of(&req);
    let bridge_error = |source| NetError::Bridge {
        switch: sw.name.clone(),
        bridge: sw.bridge.clone(),
        tap: name.clone(),
        source,
    };

    // A socket of this namespace for the interface ioctls.
    // SAFETY: socket() takes no pointers and returns a new descriptor or -1.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(bridge_error(io::Error::last_os_error()));
    }
    // SAFETY: `sock` was just returned by socket() and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };

    let cname = CString::new(name.clone()).map_err(|e| bridge_error(io::Error::other(e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string alive for the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(bridge_error(io::Error::last_os_error()));
    }
    let mut br = ifreq(&sw.bridge);
    br.ifr_ifru.ifru_ifindex = libc::c_int::try_from(index).unwrap_or(0);
    // SAFETY: SIOCBRADDIF reads one `struct ifreq` (bridge name, interface index), which `br`
    // is, alive for the call; `sock` is an open socket.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut br) };
    if r < 0 {
        return Err(bridge_error(io::Error::last_os_error()));
    }
    let mut up = ifreq(&name);
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`, which `up` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut up) } < 0 {
        return Err(bridge_error(io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS has just set the flags member of the union.
    let current = unsafe { up.ifr_ifru.ifru_flags };
    up.ifr_ifru.ifru_flags = current | libc::c_short::try_from(libc::IFF_UP).unwrap_or(0);
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq` (name, flags), which `up` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut up) } < 0 {
        return Err(bridge_error(io::Error::last_os_error()));
    }
    Ok(Tap { fd: tun, name })
}
