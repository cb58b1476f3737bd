//! The gateway's handshakes in progress, with two limits: at most `per_peer` from one address
//! (a further connection from it is refused at once), and at most `total` in all (when full,
//! the oldest handshake of the address that holds the most is dropped). So one address that
//! opens connections and sends nothing cannot evict the handshakes of the others; it only
//! competes with itself.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Handshakes from one address at once, by default.
pub const DEFAULT_PER_PEER: usize = 8;

#[derive(Debug)]
struct Entry<T> {
    started: Instant,
    peer: IpAddr,
    guard: T,
}

/// The address already has its share of handshakes in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{peer} already has {pending} handshakes in progress, the most one address may have")]
pub struct PeerBusy {
    /// The address.
    pub peer: IpAddr,
    /// Its handshakes in progress.
    pub pending: usize,
}

/// Handshakes in progress; `T` is what closes one (its socket).
#[derive(Debug)]
pub struct Pending<T> {
    total: usize,
    per_peer: usize,
    next: u64,
    entries: HashMap<u64, Entry<T>>,
    evicted: Vec<u64>,
}

impl<T> Pending<T> {
    /// A table for at most `total` handshakes, `per_peer` from one address.
    pub fn new(total: usize, per_peer: usize) -> Pending<T> {
        Pending {
            total: total.max(1),
            per_peer: per_peer.max(1),
            next: 0,
            entries: HashMap::new(),
            evicted: Vec::new(),
        }
    }

    /// Handshakes in progress.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn count(&self, peer: IpAddr) -> usize {
        self.entries.values().filter(|e| e.peer == peer).count()
    }

    /// Registers a handshake from `peer` started `now`. Returns its id and the handshakes
    /// dropped to make room (the caller closes them), or [`PeerBusy`].
    pub fn register(
        &mut self,
        peer: IpAddr,
        guard: T,
        now: Instant,
    ) -> Result<(u64, Vec<(IpAddr, T)>), PeerBusy> {
        let pending = self.count(peer);
        if pending >= self.per_peer {
            return Err(PeerBusy { peer, pending });
        }
        let mut dropped = Vec::new();
        while self.entries.len() >= self.total {
            let Some(victim) = self.victim() else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.evicted.push(victim);
                dropped.push((e.peer, e.guard));
            }
        }
        let id = self.next;
        self.next += 1;
        self.entries.insert(
            id,
            Entry {
                started: now,
                peer,
                guard,
            },
        );
        Ok((id, dropped))
    }

    /// The oldest handshake of the address with the most in progress.
    fn victim(&self) -> Option<u64> {
        let mut per: HashMap<IpAddr, usize> = HashMap::new();
        for e in self.entries.values() {
            *per.entry(e.peer).or_default() += 1;
        }
        let most = per.values().copied().max()?;
        self.entries
            .iter()
            .filter(|(_, e)| per.get(&e.peer) == Some(&most))
            .min_by_key(|(id, e)| (e.started, **id))
            .map(|(id, _)| *id)
    }

    /// What closes handshake `id`, while it is in progress.
    pub fn guard(&self, id: u64) -> Option<&T> {
        self.entries.get(&id).map(|e| &e.guard)
    }

    /// Removes a finished handshake; true if it had been dropped to make room.
    pub fn finish(&mut self, id: u64) -> bool {
        self.entries.remove(&id);
        match self.evicted.iter().position(|e| *e == id) {
            Some(pos) => {
                self.evicted.swap_remove(pos);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let t0 = Instant::now();
        let mut p: Pending<u32> = Pending::new(10, 3);
        for i in 0..3 {
            p.register(ip(66), i, t0).unwrap();
        }
        let busy = p.register(ip(66), 9, t0).unwrap_err();
        assert_eq!(busy.pending, 3);
        assert!(
            busy.to_string().contains("127.0.0.66 already has 3"),
            "{busy}"
        );
        // Another address still gets in.
        assert!(p.register(ip(21), 0, t0).is_ok());
    }

    #[test]
    fn a_full_table_drops_the_oldest_of_the_busiest_address_not_the_others() {
        let t0 = Instant::now();
        let mut p: Pending<&str> = Pending::new(4, 3);
        let (alice, _) = p.register(ip(21), "alice", t0).unwrap();
        // The flooder's handshakes are newer than alice's, and there are more of them.
        let mut flood = Vec::new();
        for i in 0..3u64 {
            let (id, dropped) = p
                .register(ip(66), "flood", t0 + Duration::from_millis(10 + i))
                .unwrap();
            assert!(dropped.is_empty());
            flood.push(id);
        }
        assert_eq!(p.len(), 4);
        // A new peer arrives with the table full: one of the flooder's goes, the oldest.
        let (bob, dropped) = p
            .register(ip(22), "bob", t0 + Duration::from_millis(50))
            .unwrap();
        assert_eq!(dropped, [(ip(66), "flood")]);
        assert!(
            p.finish(flood[0]),
            "the dropped handshake is reported as evicted"
        );
        assert!(!p.finish(alice), "alice's handshake was kept");
        assert!(!p.finish(bob));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn with_one_each_the_oldest_goes() {
        let t0 = Instant::now();
        let mut p: Pending<u8> = Pending::new(2, 2);
        let (a, _) = p.register(ip(1), 1, t0).unwrap();
        p.register(ip(2), 2, t0 + Duration::from_millis(1)).unwrap();
        let (_, dropped) = p.register(ip(3), 3, t0 + Duration::from_millis(2)).unwrap();
        assert_eq!(dropped, [(ip(1), 1)]);
        assert!(p.finish(a));
    }
}
