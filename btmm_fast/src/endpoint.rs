//! Outer (underlay) endpoints of either family, and the per-peer endpoint shared between the
//! TX thread (reads it for every packet) and the RX thread and control plane (move it).
//!
//! Every endpoint is a `SocketAddrV6`: the socket is dual-stack (udp.rs), so an IPv4 peer is
//! its v4-mapped address ::ffff:a.b.c.d (RFC 4291 §2.5.5.2). At the Python boundary a
//! v4-mapped address is shown as plain IPv4 (`display`) and IPv4 text is mapped (`from_ip`).

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// An outer endpoint: a v4-mapped address for IPv4, the address itself for IPv6.
pub type Endpoint = SocketAddrV6;

/// The endpoint of `ip` and `port` (IPv4 v4-mapped; the unspecified IPv4 address becomes
/// `[::]`, so that "0.0.0.0" means "every address" on the dual-stack socket as well).
pub fn from_ip(ip: IpAddr, port: u16) -> Endpoint {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0)
        }
        IpAddr::V4(a) => SocketAddrV6::new(a.to_ipv6_mapped(), port, 0, 0),
        IpAddr::V6(a) => SocketAddrV6::new(a, port, 0, 0),
    }
}

/// The endpoint as the rest of the world writes it: v4-mapped addresses as plain IPv4.
pub fn display(ep: Endpoint) -> SocketAddr {
    match ep.ip().to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), ep.port()),
        None => SocketAddr::new(IpAddr::V6(*ep.ip()), ep.port()),
    }
}

/// Bit of the `meta` word: an endpoint is present.
const PRESENT: u64 = 1 << 32;
/// Bit of the `meta` word: the endpoint is IPv6 (not v4-mapped); kept for readers that only
/// want the family (the address bytes already say it).
const FAMILY_V6: u64 = 1 << 33;

/// One peer's endpoint, read without a lock or an allocation per packet: a sequence lock
/// over three words (the 16 address bytes and a word with the port, the family and whether an
/// endpoint is set). A writer makes the sequence odd, stores the words and makes it even
/// again; a reader retries until it saw the same even sequence before and after its reads.
/// Every word is an atomic, so a torn read is impossible to act upon, only to retry; writers
/// (the RX thread roaming and the control plane) exclude each other on the odd sequence.
pub struct AtomicEndpoint {
    seq: AtomicU64,
    hi: AtomicU64,
    lo: AtomicU64,
    meta: AtomicU64,
}

fn words(ep: Option<Endpoint>) -> (u64, u64, u64) {
    match ep {
        None => (0, 0, 0),
        Some(a) => {
            let bits = u128::from_be_bytes(a.ip().octets());
            let family = if a.ip().to_ipv4_mapped().is_some() {
                0
            } else {
                FAMILY_V6
            };
            (
                (bits >> 64) as u64,
                bits as u64,
                PRESENT | family | u64::from(a.port()),
            )
        }
    }
}

impl AtomicEndpoint {
    pub fn new(ep: Option<Endpoint>) -> AtomicEndpoint {
        let (hi, lo, meta) = words(ep);
        AtomicEndpoint {
            seq: AtomicU64::new(0),
            hi: AtomicU64::new(hi),
            lo: AtomicU64::new(lo),
            meta: AtomicU64::new(meta),
        }
    }

    pub fn load(&self) -> Option<Endpoint> {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let hi = self.hi.load(Ordering::Relaxed);
            let lo = self.lo.load(Ordering::Relaxed);
            let meta = self.meta.load(Ordering::Relaxed);
            // Orders the word loads before the second look at the sequence.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != before {
                continue;
            }
            if meta & PRESENT == 0 {
                return None;
            }
            let ip = std::net::Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo));
            return Some(SocketAddrV6::new(ip, meta as u16, 0, 0));
        }
    }

    pub fn store(&self, ep: Option<Endpoint>) {
        let (hi, lo, meta) = words(ep);
        let mut seq = self.seq.load(Ordering::Relaxed);
        loop {
            if seq & 1 == 0 {
                match self.seq.compare_exchange_weak(
                    seq,
                    seq + 1,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => seq = now,
                }
            } else {
                std::hint::spin_loop();
                seq = self.seq.load(Ordering::Relaxed);
            }
        }
        // Orders the odd sequence before the word stores, for readers.
        fence(Ordering::Release);
        self.hi.store(hi, Ordering::Relaxed);
        self.lo.store(lo, Ordering::Relaxed);
        self.meta.store(meta, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn round_trip_both_families() {
        let v4 = from_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 4500);
        let v6 = from_ip("2001:db8::7".parse().unwrap(), 65535);
        for ep in [
            None,
            Some(v4),
            Some(v6),
            Some(from_ip(Ipv4Addr::UNSPECIFIED.into(), 0)),
        ] {
            let a = AtomicEndpoint::new(ep);
            assert_eq!(a.load(), ep);
            a.store(None);
            assert_eq!(a.load(), None);
            a.store(ep);
            assert_eq!(a.load(), ep);
        }
        assert_eq!(display(v4).to_string(), "192.0.2.7:4500");
        assert_eq!(display(v6).to_string(), "[2001:db8::7]:65535");
        assert_eq!(
            *from_ip(Ipv4Addr::UNSPECIFIED.into(), 1).ip(),
            Ipv6Addr::UNSPECIFIED
        );
    }

    #[test]
    fn readers_never_see_a_torn_endpoint() {
        // Two writers alternate between endpoints whose every word differs; a reader must only
        // ever see one of them whole.
        let a = from_ip("2001:db8::1".parse().unwrap(), 1111);
        let b = from_ip(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)), 2222);
        let shared = Arc::new(AtomicEndpoint::new(Some(a)));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = [a, b]
            .into_iter()
            .map(|ep| {
                let (s, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        s.store(Some(ep));
                    }
                })
            })
            .collect();
        let mut seen = [0u32; 2];
        for _ in 0..200_000 {
            match shared.load() {
                Some(x) if x == a => seen[0] += 1,
                Some(x) if x == b => seen[1] += 1,
                other => panic!("torn or lost endpoint {other:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(seen[0] + seen[1] == 200_000);
    }
}
