//! The RX thread: recvmmsg -> keepalive / control / ESP open (in place) -> checks -> TUN,
//! merging in-order TCP segments into one write when the TUN takes virtio headers
//! (offload.rs).
//!
//! Buffers: the thread owns one `RecvBatch`; every datagram is opened in place in its slot and
//! the inner packet is written to the TUN from there.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    is_ipv6, lock, wait_readable, Event, Peer, RxEntry, Shared, Tally, BATCH, MAX_CONTROL_MESSAGE,
    RX_SLOT,
};
use crate::endpoint::Endpoint;
use crate::esp::{self, DropReason, CONTROL_MARKER, KEEPALIVE};
use crate::offload::{self, TcpSeg, VNET_HDR_LEN};
use crate::stun;
use crate::udp::RecvBatch;

fn count_in(tally: &mut Tally, peer: &Peer, len: usize) {
    tally.packets_in += 1;
    tally.bytes_in += len as u64;
    peer.counters.packets_in.fetch_add(1, Ordering::Relaxed);
    peer.counters
        .bytes_in
        .fetch_add(len as u64, Ordering::Relaxed);
}

/// Writes the authenticated inner packets of a batch to a TUN device that takes virtio
/// headers, merging runs of consecutive segments of one TCP flow into one super packet
/// (see offload.rs). Counters still count the inner packets one by one.
pub(super) fn write_coalesced(
    tun: RawFd,
    batch: &mut RecvBatch,
    deliver: &[(usize, std::ops::Range<usize>, Arc<Peer>)],
    iovs: &mut Vec<libc::iovec>,
    tally: &mut Tally,
) -> usize {
    let mut writes = 0;
    let mut k = 0;
    while k < deliver.len() {
        writes += 1;
        let (i0, ref r0, _) = deliver[k];
        let mut end = k + 1;
        let mut run: Option<(TcpSeg, usize, bool)> = None;
        {
            let first = &batch.payload(i0)[r0.clone()];
            if let Some(f) = TcpSeg::parse(first) {
                let (mut last, mut total) = (f, f.payload);
                while end < deliver.len() {
                    let (i, ref r, _) = deliver[end];
                    let next = &batch.payload(i)[r.clone()];
                    match TcpSeg::parse(next) {
                        Some(n) if offload::continues(first, &f, &last, total, next, &n) => {
                            total += n.payload;
                            last = n;
                            end += 1;
                        }
                        _ => break,
                    }
                }
                run = Some((f, total, last.psh));
            }
        }
        let header_at = r0.start - VNET_HDR_LEN;
        // The first segment's headers are rewritten for the super packet; keep the original
        // to fall back to single writes if the kernel refuses the merged one.
        let mut saved = [0u8; 40 + 60];
        let vh = match run {
            Some((f, total, psh)) if end - k > 1 => {
                let (payload, _, _) = batch.get_mut(i0);
                saved[..f.header].copy_from_slice(&payload[r0.start..r0.start + f.header]);
                offload::coalesced_header(&mut payload[r0.clone()], &f, total, psh)
            }
            _ => {
                end = k + 1;
                [0u8; VNET_HDR_LEN]
            }
        };
        let (payload, _, _) = batch.get_mut(i0);
        payload[header_at..r0.start].copy_from_slice(&vh);
        iovs.clear();
        let head = &batch.payload(i0)[header_at..r0.end];
        iovs.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        if let (Some((f, _, _)), true) = (run, end - k > 1) {
            for (i, r, _) in &deliver[k + 1..end] {
                let tail = &batch.payload(*i)[r.start + f.header..r.end];
                iovs.push(libc::iovec {
                    iov_base: tail.as_ptr() as *mut libc::c_void,
                    iov_len: tail.len(),
                });
            }
        }
        // SAFETY: every iovec points into `batch`'s receive buffers, which are not touched
        // until the call returns; the TUN descriptor stays open until this thread is joined.
        let w = unsafe { libc::writev(tun, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if w >= 0 {
            for (_, r, p) in &deliver[k..end] {
                count_in(tally, p, r.len());
            }
        } else if let (Some((f, _, _)), true) = (run, end - k > 1) {
            let (payload, _, _) = batch.get_mut(i0);
            payload[r0.start..r0.start + f.header].copy_from_slice(&saved[..f.header]);
            for (i, r, p) in &deliver[k..end] {
                let (payload, _, _) = batch.get_mut(*i);
                payload[r.start - VNET_HDR_LEN..r.start].fill(0);
                let pkt = &payload[r.start - VNET_HDR_LEN..r.end];
                // SAFETY: writes `pkt.len()` bytes from `pkt` to the TUN descriptor, open until
                // this thread is joined.
                if unsafe { libc::write(tun, pkt.as_ptr().cast(), pkt.len()) } >= 0 {
                    count_in(tally, p, r.len());
                }
            }
        }
        k = end;
    }
    writes
}

/// An authenticated packet moved its peer to a new outer endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Roam {
    pub old: Option<Endpoint>,
    pub new: Endpoint,
}

/// What to do with one received datagram: the RX thread's per-packet decision, the twin of
/// `PythonEngine.inbound` in btmm_core/dataplane/pyengine.py. Ranges index the datagram.
pub(super) enum RxDecision<'t> {
    /// A NAT keepalive (RFC 3948 §2.3): counted, nothing else.
    Keepalive,
    /// A control message for the control plane (the non-ESP marker stripped).
    Control(Range<usize>),
    /// A STUN message (RFC 8489) for the control plane: the whole datagram.
    Stun,
    /// Refused; `peer` is set when the drop is attributable to a peer (its SA matched).
    Drop {
        reason: DropReason,
        peer: Option<&'t Arc<Peer>>,
    },
    /// An authenticated inner packet of `peer`, for the TUN; `roam` when it moves the peer.
    Deliver {
        inner: Range<usize>,
        peer: &'t Arc<Peer>,
        roam: Option<Roam>,
    },
}

/// Decides what one datagram is, in the order fixed by btmm_core/dataplane/api.py: keepalive,
/// truncated, control (bounded by `MAX_CONTROL_MESSAGE`), STUN (same bound) unless its first
/// four bytes name one of our receive SAs, ESP length, SPI, ICV and replay (which moves the
/// SA's window), then the inner packet's checks. ESP is opened in place in
/// `payload`; nothing is allocated and no shared state but `sas` is touched, so the caller
/// applies the counters, the endpoint move and the events.
pub(super) fn rx_classify<'t>(
    payload: &mut [u8],
    src: Endpoint,
    truncated: bool,
    sas: &'t mut HashMap<u32, RxEntry>,
) -> RxDecision<'t> {
    let drop = |reason| RxDecision::Drop { reason, peer: None };
    if *payload == KEEPALIVE {
        return RxDecision::Keepalive;
    }
    if truncated {
        return drop(DropReason::Malformed);
    }
    if payload.starts_with(&CONTROL_MARKER) {
        if payload.len() - CONTROL_MARKER.len() > MAX_CONTROL_MESSAGE {
            return drop(DropReason::ControlOversize);
        }
        return RxDecision::Control(CONTROL_MARKER.len()..payload.len());
    }
    let spi = esp::payload_spi(payload).unwrap_or(0);
    // STUN shares the port so that the reflexive address the daemon learns is this socket's.
    // STUN's shape cannot rule out ESP: ESP's bytes 4..8 are the low half of its sequence
    // number, which does reach the magic cookie, and its first four bytes (the SPI) can read
    // as a STUN type and length. So a datagram that names one of our receive SAs is ESP,
    // whatever it looks like, and only one that names none and has STUN's shape is STUN. The
    // reverse collision (a real STUN message whose type and length spell one of our SPIs, odds
    // about one in 2^32 per SA) is dropped as ESP until a rekey replaces that SPI; the STUN
    // client then times out and asks again, which is what it does for any lost answer.
    if stun::looks_like_stun(payload) && !sas.contains_key(&spi) {
        if payload.len() > MAX_CONTROL_MESSAGE {
            return drop(DropReason::ControlOversize);
        }
        return RxDecision::Stun;
    }
    if esp::check_length(payload.len()).is_err() {
        return drop(DropReason::Malformed);
    }
    let Some(RxEntry { peer, sa }) = sas.get_mut(&spi) else {
        return drop(DropReason::UnknownSpi);
    };
    let peer: &'t Arc<Peer> = peer;
    let opened = match sa.open_in_place(payload) {
        Ok(o) => o,
        Err(e) => {
            return RxDecision::Drop {
                reason: e.reason,
                peer: Some(peer),
            }
        }
    };
    let inner = &payload[opened.inner.clone()];
    let refused = if !is_ipv6(inner) {
        Some(DropReason::Malformed)
    } else if inner[8..24] != peer.inner {
        Some(DropReason::SourceMismatch)
    } else {
        None
    };
    if let Some(reason) = refused {
        return RxDecision::Drop {
            reason,
            peer: Some(peer),
        };
    }
    // Only the newest authenticated packet moves the endpoint: an older (reordered) one from
    // where the peer was must not drag it back.
    // The TX thread may read it meanwhile: a sequence lock, no lock shared with TX. A peer
    // that moves between families (IPv4 Wi-Fi to an IPv6-only network) moves the same way.
    let roam = if opened.advanced {
        let old = peer.endpoint.load();
        (old != Some(src)).then_some(Roam { old, new: src })
    } else {
        None
    };
    RxDecision::Deliver {
        inner: opened.inner,
        peer,
        roam,
    }
}

pub(super) fn rx_loop(
    shared: &Shared,
    tun: RawFd,
    vnet: bool,
    udp: RawFd,
    wake: RawFd,
    event_fd: RawFd,
) {
    let mut batch = RecvBatch::new(BATCH, RX_SLOT);
    let mut deliver: Vec<(usize, std::ops::Range<usize>, Arc<Peer>)> = Vec::with_capacity(BATCH);
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH + 1);
    // Queued after the batch's counters are published (see TxBatch::events).
    let mut events: Vec<(Event, Option<Arc<Peer>>)> = Vec::with_capacity(BATCH);
    let mut tally = Tally::default();
    while wait_readable(shared, udp, wake) {
        loop {
            // A socket error (an ICMP report) is consumed by the failing call; nothing to do.
            let n = batch.recv(udp).unwrap_or(0);
            if n == 0 {
                break;
            }
            deliver.clear();
            {
                let mut rx = lock(&shared.rx);
                for i in 0..n {
                    let (payload, src, trunc) = batch.get_mut(i);
                    match rx_classify(payload, src, trunc, &mut rx) {
                        RxDecision::Keepalive => tally.keepalives_in += 1,
                        RxDecision::Control(message) => {
                            tally.control_in += 1;
                            let ev = Event::Control {
                                source: src,
                                payload: payload[message].to_vec(),
                            };
                            events.push((ev, None));
                        }
                        RxDecision::Stun => {
                            tally.control_in += 1;
                            let ev = Event::Stun {
                                source: src,
                                payload: payload.to_vec(),
                            };
                            events.push((ev, None));
                        }
                        RxDecision::Drop { reason, peer } => {
                            // An oversize control (or STUN) message is still control
                            // traffic.
                            if reason == DropReason::ControlOversize {
                                tally.control_in += 1;
                            }
                            tally.drops[reason as usize] += 1;
                            if let Some(p) = peer {
                                p.counters.drop(reason);
                            }
                        }
                        RxDecision::Deliver { inner, peer, roam } => {
                            if let Some(Roam { old, new }) = roam {
                                peer.endpoint.store(Some(new));
                                let ev = Event::Roamed {
                                    inner: peer.inner,
                                    old,
                                    new,
                                };
                                events.push((ev, Some(Arc::clone(peer))));
                            }
                            deliver.push((i, inner, Arc::clone(peer)));
                        }
                    }
                }
            }
            if vnet {
                write_coalesced(tun, &mut batch, &deliver, &mut iovs, &mut tally);
                deliver.clear();
            }
            for (i, range, peer) in deliver.drain(..) {
                let (payload, _, _) = batch.get_mut(i);
                let pkt = &payload[range];
                // SAFETY: writes `pkt.len()` bytes from `pkt` to the TUN descriptor, which
                // stays open until this thread is joined.
                let r = unsafe { libc::write(tun, pkt.as_ptr().cast(), pkt.len()) };
                if r >= 0 {
                    count_in(&mut tally, &peer, pkt.len());
                }
            }
            tally.flush(&shared.counters);
            for (ev, peer) in events.drain(..) {
                shared.push_event(ev, event_fd, peer.as_deref());
            }
            if n < batch.capacity() || !shared.running.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! `rx_classify` on its own: every branch, with real SAs and no socket, TUN or root.

    use crate::endpoint::AtomicEndpoint;

    use super::*;
    use crate::engine::{Counters, Inner};
    use crate::esp::{RxSa, TxSa};

    const KEY: [u8; 36] = [0x33; 36];
    const SPI: u32 = 0x4242;
    const OTHER_SPI: u32 = 0x4343;

    fn inner(last: u8) -> Inner {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = last;
        a
    }

    fn addr(port: u16) -> Endpoint {
        crate::endpoint::from_ip([192, 0, 2, 1].into(), port)
    }

    /// Peer fd00::<last> with the receive SA `spi`.
    fn entry(spi: u32, last: u8, ep: Option<Endpoint>) -> RxEntry {
        RxEntry {
            peer: Arc::new(Peer {
                inner: inner(last),
                endpoint: AtomicEndpoint::new(ep),
                counters: Counters::default(),
            }),
            sa: RxSa::new(spi, &KEY).unwrap(),
        }
    }

    /// Peer fd00::2 with receive SA `SPI`, and peer fd00::3 with `OTHER_SPI`.
    fn table(endpoint: Option<Endpoint>) -> HashMap<u32, RxEntry> {
        HashMap::from([
            (SPI, entry(SPI, 2, endpoint)),
            (OTHER_SPI, entry(OTHER_SPI, 3, None)),
        ])
    }

    /// An IPv6 packet (no next header) from `src` to fd00::1.
    fn packet(src: Inner) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 4, 59, 64];
        p.extend_from_slice(&src);
        p.extend_from_slice(&inner(1));
        p.extend_from_slice(b"data");
        p
    }

    fn sealed(spi: u32, seq: u128, inner_pkt: &[u8]) -> Vec<u8> {
        TxSa::new(spi, &KEY, seq).unwrap().seal(inner_pkt).unwrap()
    }

    /// A decision in a form tests can compare: drops say whether a peer was blamed, deliveries
    /// which peer and the inner packet.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Keepalive,
        Control(Vec<u8>),
        Stun(Vec<u8>),
        Drop(DropReason, Option<Inner>),
        Deliver(Inner, Vec<u8>, Option<Roam>),
    }

    fn see(
        sas: &mut HashMap<u32, RxEntry>,
        datagram: &[u8],
        src: Endpoint,
        truncated: bool,
    ) -> Seen {
        let mut buf = datagram.to_vec();
        match rx_classify(&mut buf, src, truncated, sas) {
            RxDecision::Keepalive => Seen::Keepalive,
            RxDecision::Control(r) => Seen::Control(buf[r].to_vec()),
            RxDecision::Stun => Seen::Stun(buf),
            RxDecision::Drop { reason, peer } => Seen::Drop(reason, peer.map(|p| p.inner)),
            RxDecision::Deliver { inner, peer, roam } => {
                Seen::Deliver(peer.inner, buf[inner].to_vec(), roam)
            }
        }
    }

    fn control(message: &[u8]) -> Vec<u8> {
        [&CONTROL_MARKER[..], message].concat()
    }

    #[test]
    fn keepalive_is_one_0xff_byte() {
        let mut sas = table(None);
        assert_eq!(see(&mut sas, &KEEPALIVE, addr(1), false), Seen::Keepalive);
        assert_eq!(
            see(&mut sas, &[0xff, 0xff], addr(1), false),
            Seen::Drop(DropReason::Malformed, None)
        );
    }

    #[test]
    fn truncated_datagram_is_malformed() {
        let mut sas = table(None);
        let p = sealed(SPI, 1, &packet(inner(2)));
        assert_eq!(
            see(&mut sas, &p, addr(1), true),
            Seen::Drop(DropReason::Malformed, None)
        );
        // Refused before the SA saw it: the same packet, whole, is still fresh.
        assert!(matches!(
            see(&mut sas, &p, addr(1), false),
            Seen::Deliver(..)
        ));
    }

    #[test]
    fn control_messages_up_to_the_limit() {
        let mut sas = table(None);
        assert_eq!(
            see(&mut sas, &control(b"hi"), addr(1), false),
            Seen::Control(b"hi".to_vec())
        );
        assert_eq!(
            see(&mut sas, &CONTROL_MARKER, addr(1), false),
            Seen::Control(Vec::new())
        );
        let largest = vec![7u8; MAX_CONTROL_MESSAGE];
        assert_eq!(
            see(&mut sas, &control(&largest), addr(1), false),
            Seen::Control(largest.clone())
        );
        assert_eq!(
            see(
                &mut sas,
                &control(&[largest, vec![7]].concat()),
                addr(1),
                false
            ),
            Seen::Drop(DropReason::ControlOversize, None)
        );
    }

    #[test]
    fn bad_esp_length_is_malformed() {
        let mut sas = table(None);
        let p = sealed(SPI, 1, &packet(inner(2)));
        for bad in [&p[..3], &p[..esp::MIN_PAYLOAD - 1], &p[..p.len() - 1]] {
            assert_eq!(
                see(&mut sas, bad, addr(1), false),
                Seen::Drop(DropReason::Malformed, None)
            );
        }
    }

    #[test]
    fn unknown_spi() {
        let mut sas = table(None);
        let p = sealed(0x9999, 1, &packet(inner(2)));
        assert_eq!(
            see(&mut sas, &p, addr(1), false),
            Seen::Drop(DropReason::UnknownSpi, None)
        );
    }

    #[test]
    fn forged_and_replayed_packets_are_blamed_on_the_sa_peer() {
        let mut sas = table(Some(addr(1)));
        let p = sealed(SPI, 1, &packet(inner(2)));
        let mut forged = p.clone();
        forged[30] ^= 1;
        assert_eq!(
            see(&mut sas, &forged, addr(1), false),
            Seen::Drop(DropReason::Auth, Some(inner(2)))
        );
        assert!(matches!(
            see(&mut sas, &p, addr(1), false),
            Seen::Deliver(..)
        ));
        assert_eq!(
            see(&mut sas, &p, addr(1), false),
            Seen::Drop(DropReason::Replay, Some(inner(2)))
        );
    }

    #[test]
    fn inner_packet_must_be_ipv6_from_the_peer() {
        let mut sas = table(Some(addr(1)));
        let mut v4 = packet(inner(2));
        v4[0] = 0x45;
        assert_eq!(
            see(&mut sas, &sealed(SPI, 1, &v4), addr(1), false),
            Seen::Drop(DropReason::Malformed, Some(inner(2)))
        );
        assert_eq!(
            see(
                &mut sas,
                &sealed(SPI, 2, &packet(inner(2))[..39]),
                addr(1),
                false
            ),
            Seen::Drop(DropReason::Malformed, Some(inner(2)))
        );
        // Peer fd00::2's SA carrying a packet from fd00::3: a spoof, blamed on fd00::2.
        assert_eq!(
            see(&mut sas, &sealed(SPI, 3, &packet(inner(3))), addr(1), false),
            Seen::Drop(DropReason::SourceMismatch, Some(inner(2)))
        );
    }

    #[test]
    fn roaming_across_families_on_authenticated_packets_only() {
        let v4 = addr(1);
        let v6 = crate::endpoint::from_ip("2001:db8::1".parse().unwrap(), 4500);
        let mut sas = table(Some(v4));
        let pkt = packet(inner(2));
        // A forged packet from IPv6 moves nothing.
        let mut forged = sealed(SPI, 2, &pkt);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(
            see(&mut sas, &forged, v6, false),
            Seen::Drop(DropReason::Auth, Some(inner(2)))
        );
        // The newest authenticated one from IPv6 moves the peer there...
        let to_v6 = Roam {
            old: Some(v4),
            new: v6,
        };
        assert_eq!(
            see(&mut sas, &sealed(SPI, 2, &pkt), v6, false),
            Seen::Deliver(inner(2), pkt.clone(), Some(to_v6))
        );
        sas[&SPI].peer.endpoint.store(Some(v6));
        // ...its replay from IPv4 does not move it back, a newer packet from IPv4 does.
        assert_eq!(
            see(&mut sas, &sealed(SPI, 2, &pkt), v4, false),
            Seen::Drop(DropReason::Replay, Some(inner(2)))
        );
        let to_v4 = Roam {
            old: Some(v6),
            new: v4,
        };
        assert_eq!(
            see(&mut sas, &sealed(SPI, 3, &pkt), v4, false),
            Seen::Deliver(inner(2), pkt, Some(to_v4))
        );
    }

    #[test]
    fn delivery_and_roaming() {
        let mut sas = table(Some(addr(1)));
        let pkt = packet(inner(2));
        // From where the peer is: delivered, no roam.
        assert_eq!(
            see(&mut sas, &sealed(SPI, 5, &pkt), addr(1), false),
            Seen::Deliver(inner(2), pkt.clone(), None)
        );
        // The newest packet from elsewhere moves the peer.
        let moved = Roam {
            old: Some(addr(1)),
            new: addr(2),
        };
        assert_eq!(
            see(&mut sas, &sealed(SPI, 6, &pkt), addr(2), false),
            Seen::Deliver(inner(2), pkt.clone(), Some(moved))
        );
        // The caller applies the move, not rx_classify: the endpoint is unchanged.
        assert_eq!(sas[&SPI].peer.endpoint.load(), Some(addr(1)));
        // An older (reordered) packet from elsewhere is delivered but moves nothing.
        assert_eq!(
            see(&mut sas, &sealed(SPI, 4, &pkt), addr(3), false),
            Seen::Deliver(inner(2), pkt.clone(), None)
        );
        // A peer without an endpoint gets its first one.
        let pkt3 = packet(inner(3));
        assert_eq!(
            see(&mut sas, &sealed(OTHER_SPI, 1, &pkt3), addr(9), false),
            Seen::Deliver(
                inner(3),
                pkt3,
                Some(Roam {
                    old: None,
                    new: addr(9)
                })
            )
        );
    }
    /// A STUN message of type `kind` with `attrs` bytes of attributes (RFC 8489 §5).
    fn stun_message(kind: u16, attrs: usize) -> Vec<u8> {
        let mut m = kind.to_be_bytes().to_vec();
        m.extend_from_slice(&(attrs as u16).to_be_bytes());
        m.extend_from_slice(&stun::MAGIC_COOKIE);
        m.extend_from_slice(&[0x5a; 12]);
        m.extend(std::iter::repeat_n(0x11u8, attrs));
        m
    }

    #[test]
    fn stun_messages_go_to_the_control_plane_whole() {
        let mut sas = table(None);
        for m in [stun_message(0x0001, 0), stun_message(0x0101, 12)] {
            assert_eq!(see(&mut sas, &m, addr(1), false), Seen::Stun(m.clone()));
        }
        let largest = stun_message(0x0101, MAX_CONTROL_MESSAGE - stun::HEADER_LEN);
        assert_eq!(
            see(&mut sas, &largest, addr(1), false),
            Seen::Stun(largest.clone())
        );
        let over = stun_message(0x0101, MAX_CONTROL_MESSAGE - stun::HEADER_LEN + 4);
        assert_eq!(
            see(&mut sas, &over, addr(1), false),
            Seen::Drop(DropReason::ControlOversize, None)
        );
        // A wrong length field makes it not STUN: then it is judged as ESP, as before (32
        // bytes are too short for ESP; 40 are long enough, and name no SA).
        for attrs in [12, 20] {
            let mut bad = stun_message(0x0101, attrs);
            bad[3] += 4;
            let reason = if attrs == 12 {
                DropReason::Malformed
            } else {
                DropReason::UnknownSpi
            };
            assert_eq!(
                see(&mut sas, &bad, addr(1), false),
                Seen::Drop(reason, None)
            );
        }
        // A truncated datagram is malformed even when its head looks like STUN.
        assert_eq!(
            see(&mut sas, &stun_message(1, 0), addr(1), true),
            Seen::Drop(DropReason::Malformed, None)
        );
    }

    #[test]
    fn esp_for_one_of_our_spis_is_esp_even_when_it_looks_like_stun() {
        // An ESP packet whose SPI reads as "Binding request, length 60" and whose sequence
        // number's low half is the magic cookie: STUN's shape exactly (80 bytes on the wire).
        let spi = 0x0001_003c;
        let pkt = packet(inner(2));
        let esp = sealed(spi, 0x2112_a442, &pkt);
        assert_eq!(esp.len(), 80);
        assert!(stun::looks_like_stun(&esp));
        let mut ours = HashMap::from([(spi, entry(spi, 2, Some(addr(1))))]);
        // A forged one under our SPI is an ESP drop charged to the peer, never STUN ...
        let mut forged = esp.clone();
        forged[40] ^= 1;
        assert!(stun::looks_like_stun(&forged));
        assert_eq!(
            see(&mut ours, &forged, addr(1), false),
            Seen::Drop(DropReason::Auth, Some(inner(2)))
        );
        // ... and the genuine one is delivered.
        assert_eq!(
            see(&mut ours, &esp, addr(1), false),
            Seen::Deliver(inner(2), pkt.clone(), None)
        );
        // The same bytes when that SPI is not ours: STUN, for the control plane to judge.
        let mut theirs = table(None);
        assert_eq!(see(&mut theirs, &esp, addr(1), false), Seen::Stun(esp));
    }
}
