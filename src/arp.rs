//! Gratuitous ARP after a move: the network learns that the VM's MAC address is now behind
//! this host's port.
//!
//! When a VM resumes on a new host, the switches of the physical network still send its
//! traffic to the old host's port until they see a frame from its MAC on the new one. The
//! destination sends that frame for the VM, as QEMU's self-announce and Hyper-V do: a
//! broadcast ARP request (ethertype 0x0806) whose sender hardware address is the VM's MAC.
//! The host does not know the guest's IP address, so the sender and target protocol
//! addresses are 0.0.0.0 (an ARP probe): switches learn the MAC from the frame's source
//! address, and no host updates an IP mapping from it. The frame goes out
//! [`ANNOUNCE_ROUNDS`] times, [`ANNOUNCE_GAP`] apart, in case one is lost.
//!
//! The frame is written with an `AF_PACKET` raw socket on the switch's interface (needs root
//! or `CAP_NET_RAW`), which receives nothing (protocol 0).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How many times [`announce`] sends the frame.
pub const ANNOUNCE_ROUNDS: u32 = 3;
/// The pause between two frames of [`announce`].
pub const ANNOUNCE_GAP: Duration = Duration::from_millis(50);

/// Bytes of the frame: an Ethernet header and an ARP packet, padded to Ethernet's minimum
/// frame length (without the checksum, which the interface adds).
pub const FRAME_LEN: usize = 60;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Why a gratuitous ARP could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    /// The interface does not exist here.
    #[error(
        "network interface {interface:?} does not exist on this host: check the switch's interface in vmgated.toml ([[switch]] interface = ...)"
    )]
    UnknownInterface {
        /// The name asked for.
        interface: String,
    },
    /// The raw socket could not be opened.
    #[error("opening a raw packet socket failed (gratuitous ARP needs root or CAP_NET_RAW)")]
    Socket(#[source] std::io::Error),
    /// Writing the frame failed.
    #[error("sending the gratuitous ARP for {mac} on {interface} failed")]
    Send {
        /// The interface.
        interface: String,
        /// The VM's MAC address.
        mac: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// Sends the gratuitous ARP for `mac` on `interface`, [`ANNOUNCE_ROUNDS`] times,
/// [`ANNOUNCE_GAP`] apart. Parse a configured MAC with
/// [`vmgate_migrate::vm::config::parse_mac`].
pub fn announce(interface: &str, mac: [u8; 6]) -> Result<(), ArpError> {
    announce_rounds(interface, mac, ANNOUNCE_ROUNDS, ANNOUNCE_GAP)
}

/// [`announce`] with its own number of frames and gap (`rounds` = 0 only checks the
/// interface and the socket).
pub fn announce_rounds(
    interface: &str,
    mac: [u8; 6],
    rounds: u32,
    gap: Duration,
) -> Result<(), ArpError> {
    let index = interface_index(interface)?;
    let socket = packet_socket()?;
    let frame = gratuitous_arp(mac);
    let to = link_address(index);
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(gap);
        }
        send_to(&socket, &frame, &to).map_err(|source| ArpError::Send {
            interface: interface.to_owned(),
            mac: mac_text(mac),
            source,
        })?;
    }
    Ok(())
}

/// The frame [`announce`] sends for `mac`.
pub fn gratuitous_arp(mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        if let Some(dst) = f.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        at += bytes.len();
    };
    // Ethernet: destination, source, type.
    put(&BROADCAST);
    put(&mac);
    put(&ETH_P_ARP.to_be_bytes());
    // ARP: Ethernet/IPv4, request.
    put(&ARPHRD_ETHER.to_be_bytes());
    put(&ETH_P_IP.to_be_bytes());
    put(&[6, 4]);
    put(&ARPOP_REQUEST.to_be_bytes());
    put(&mac); // sender hardware address
    put(&[0; 4]); // sender protocol address: unknown to the host
    put(&[0; 6]); // target hardware address
    put(&[0; 4]); // target protocol address
    // The rest stays zero (padding).
    f
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn interface_index(interface: &str) -> Result<libc::c_int, ArpError> {
    let unknown = || ArpError::UnknownInterface {
        interface: interface.to_owned(),
    };
    if interface.is_empty() || interface.len() >= libc::IFNAMSIZ {
        return Err(unknown());
    }
    let name = CString::new(interface).map_err(|_| unknown())?;
    // SAFETY: `name` is a valid NUL-terminated string that lives across the call;
    // if_nametoindex only reads it and returns 0 when no interface has that name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    match libc::c_int::try_from(index) {
        Ok(i) if i > 0 => Ok(i),
        _ => Err(unknown()),
    }
}

fn packet_socket() -> Result<OwnedFd, ArpError> {
    // SAFETY: socket() takes no pointers; the returned descriptor is checked below before it
    // is used. Protocol 0: the socket sends only and never queues received frames.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(ArpError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a descriptor socket() just returned (checked non-negative above), open
    // and owned by nobody else, so the OwnedFd becomes its only owner and closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_address(index: libc::c_int) -> libc::sockaddr_ll {
    let mut addr = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET).unwrap_or(17),
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex: index,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    if let Some(dst) = addr.sll_addr.get_mut(..6) {
        dst.copy_from_slice(&BROADCAST);
    }
    addr
}

fn send_to(socket: &OwnedFd, frame: &[u8], to: &libc::sockaddr_ll) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
        .map_err(|_| std::io::Error::other("the link address does not fit a socklen_t"))?;
    // SAFETY: the descriptor is open (owned by `socket`, borrowed for the call); `frame`
    // is valid for reads of `frame.len()` bytes; `to` points to a fully initialized
    // sockaddr_ll and `len` is exactly its size. sendto does not keep any of the pointers.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(to).cast(),
            len,
        )
    };
    match usize::try_from(sent) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => Err(std::io::Error::other(format!(
            "only {n} of {} bytes were sent",
            frame.len()
        ))),
        Err(_) => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_a_broadcast_arp_probe_from_the_vms_mac() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = gratuitous_arp(mac);
        assert_eq!(f[0..6], [0xff; 6], "broadcast");
        assert_eq!(f[6..12], mac, "source: the VM");
        assert_eq!(f[12..14], [0x08, 0x06], "ARP");
        assert_eq!(
            f[14..22],
            [0, 1, 0x08, 0x00, 6, 4, 0, 1],
            "Ethernet/IPv4 request"
        );
        assert_eq!(f[22..28], mac, "sender hardware address");
        assert_eq!(f[28..32], [0; 4], "sender IP unknown");
        assert_eq!(f[32..42], [0; 10], "target unknown");
        assert_eq!(f[42..], [0; 18], "padding");
        assert_eq!(mac_text(mac), "52:54:00:12:34:56");
    }

    /// A socket that captures ARP frames arriving on `lo`.
    fn capture_on_lo() -> OwnedFd {
        // SAFETY: no pointers; the descriptor is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(ETH_P_ARP.to_be()),
            )
        };
        assert!(
            fd >= 0,
            "opening a packet socket failed (run the tests as root): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr = link_address(interface_index("lo").unwrap());
        addr.sll_halen = 0;
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
        // SAFETY: the descriptor is open; `addr` is an initialized sockaddr_ll of `len` bytes.
        let r = unsafe { libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let tlen = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap();
        // SAFETY: the descriptor is open; `timeout` is an initialized timeval of `tlen` bytes.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                tlen,
            )
        };
        assert_eq!(r, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        sock
    }

    /// Frames captured until 200 ms pass without one.
    fn captured(sock: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 2048];
            // SAFETY: the descriptor is open; `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            match usize::try_from(n) {
                Ok(n) => out.push(buf.get(..n).unwrap_or(&[]).to_vec()),
                Err(_) => return out,
            }
        }
    }

    #[test]
    fn announce_puts_the_frame_on_the_interface() {
        // A locally administered unicast MAC unique to this run.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            .to_le_bytes();
        let pid = std::process::id().to_le_bytes();
        let mac = [0x02, pid[0], pid[1], t[0], t[1], t[2]];
        let sock = capture_on_lo();
        announce("lo", mac).unwrap();
        let ours: Vec<Vec<u8>> = captured(&sock)
            .into_iter()
            .filter(|f| f.get(6..12) == Some(&mac[..]))
            .collect();
        assert_eq!(ours.len(), ANNOUNCE_ROUNDS as usize, "one frame per round");
        for f in &ours {
            assert_eq!(f.get(12..14), Some(&[0x08, 0x06][..]), "ethertype ARP");
            assert_eq!(f.get(0..6), Some(&[0xff; 6][..]), "broadcast");
            assert_eq!(f.get(22..28), Some(&mac[..]), "sender hardware address");
            assert_eq!(f.as_slice(), gratuitous_arp(mac).as_slice());
        }
    }

    #[test]
    fn an_unknown_interface_is_named() {
        let mac = [0x02, 0, 0, 0, 0, 1];
        for name in [
            "vmgate-nope0",
            "",
            "an-interface-name-too-long",
            "bad\0name",
        ] {
            let e = announce(name, mac).unwrap_err();
            assert!(matches!(e, ArpError::UnknownInterface { .. }), "{e:?}");
            let text = e.to_string();
            assert!(text.contains(&format!("{name:?}")), "{text}");
            assert!(text.contains("does not exist on this host"), "{text}");
        }
    }
}
