//! Packets held for a peer without a transmit SA: the engine's half of on-demand tunnels.
//!
//! A packet routed to a peer that has no transmit SA is copied into that peer's hold ring
//! (`HOLD_SLOTS` fixed slots, allocated once on the peer's first held packet, never per
//! packet; like WireGuard's staged packets). The first packet held since the peer was last
//! idle queues one `Event::Wanted` for the control plane, which starts the key exchange; a
//! full ring drops its oldest packet and counts `hold_overflow`. When the transmit SA is
//! installed, the held packets are sealed in their slots and sent, oldest first, before the
//! TX thread can seal anything newer (both happen under the peer table's lock). When the
//! handshake fails, `reject_held` answers each held packet with an ICMPv6 Destination
//! Unreachable, code 3 "address unreachable" (RFC 4443 §3.1), written to the TUN so the
//! sending program learns at once; `clear_tx_sa` takes a tunnel that went idle back to holding.
//!
//! The Python engine's twin is btmm_core/dataplane/hold.py; both build the same ICMPv6 bytes.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::{lock, Engine, Event, Inner, PeerEntry, Shared, Tally};
use crate::error::EngineError;
use crate::esp::{self, DropReason, HEADER_LEN};
use crate::offload::VNET_HDR_LEN;

/// Packets held per peer while its tunnel opens.
pub const HOLD_SLOTS: usize = 16;
/// An ICMPv6 error message never makes its packet longer than the IPv6 minimum MTU
/// (RFC 4443 §2.4 (c)).
const ICMP_MAX: usize = 1280;
const IPV6_HEADER: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACHABLE: u8 = 1;
const CODE_ADDRESS_UNREACHABLE: u8 = 3;

/// The held packets of one peer. Each slot has the ESP header's headroom and the trailer's
/// room around the inner packet, so a held packet is sealed where it lies.
#[derive(Default)]
pub(super) struct HoldRing {
    buf: Vec<u8>,
    lens: [usize; HOLD_SLOTS],
    /// Slot of the oldest held packet.
    head: usize,
    count: usize,
    /// `Event::Wanted` was queued for this opening.
    wanted: bool,
}

/// What holding one packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Held, and it is the first since idle: tell the control plane.
    First,
    Queued,
    /// Held in place of the oldest, which was dropped.
    Overflow,
    /// Longer than the MTU: dropped as malformed.
    TooLong,
}

impl HoldRing {
    fn slot_len(mtu: usize) -> usize {
        esp::sealed_len(mtu)
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn push(&mut self, pkt: &[u8], mtu: usize) -> Held {
        if pkt.len() > mtu {
            return Held::TooLong;
        }
        let slot = Self::slot_len(mtu);
        if self.buf.len() != slot * HOLD_SLOTS {
            self.buf = vec![0u8; slot * HOLD_SLOTS];
            self.count = 0;
            self.head = 0;
        }
        let overflow = self.count == HOLD_SLOTS;
        let at = if overflow {
            let at = self.head;
            self.head = (self.head + 1) % HOLD_SLOTS;
            at
        } else {
            self.count += 1;
            (self.head + self.count - 1) % HOLD_SLOTS
        };
        self.buf[at * slot + HEADER_LEN..at * slot + HEADER_LEN + pkt.len()].copy_from_slice(pkt);
        self.lens[at] = pkt.len();
        if overflow {
            Held::Overflow
        } else if !self.wanted {
            self.wanted = true;
            Held::First
        } else {
            Held::Queued
        }
    }

    /// Hands each held packet, oldest first, to `f` as (its slot, inner length; the packet at
    /// `HEADER_LEN`), then empties the ring and ends the opening.
    pub(super) fn take(&mut self, mtu: usize, mut f: impl FnMut(&mut [u8], usize)) {
        let slot = Self::slot_len(mtu);
        for k in 0..self.count {
            let at = (self.head + k) % HOLD_SLOTS;
            f(&mut self.buf[at * slot..(at + 1) * slot], self.lens[at]);
        }
        self.reset();
    }

    pub(super) fn reset(&mut self) {
        self.count = 0;
        self.head = 0;
        self.wanted = false;
    }

    /// The queued `Wanted` event was lost (queue full): let the next packet ask again.
    pub(super) fn unwant(&mut self) {
        self.wanted = false;
    }
}

/// The TX thread's hook: hold `pkt` for the peer `e` (which has no transmit SA).
pub(super) fn hold(
    e: &mut PeerEntry,
    pkt: &[u8],
    mtu: usize,
    tally: &mut Tally,
    events: &mut Vec<(Event, Option<std::sync::Arc<super::Peer>>)>,
) {
    match e.hold.push(pkt, mtu) {
        Held::First => {
            let ev = Event::Wanted {
                inner: e.peer.inner,
            };
            events.push((ev, Some(std::sync::Arc::clone(&e.peer))));
        }
        Held::Queued => {}
        Held::Overflow => {
            tally.drops[DropReason::HoldOverflow as usize] += 1;
            e.peer.counters.drop(DropReason::HoldOverflow);
        }
        Held::TooLong => {
            tally.drops[DropReason::Malformed as usize] += 1;
            e.peer.counters.drop(DropReason::Malformed);
        }
    }
}

/// After a `Wanted` event could not be queued: the peer may ask again.
pub(super) fn wanted_lost(shared: &Shared, inner: &Inner) {
    if let Some(e) = lock(&shared.peers).get_mut(inner) {
        e.hold.unwant();
    }
}

fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes into `out` (at least 1280 bytes) the ICMPv6 Destination Unreachable, code 3, that
/// answers `pkt` (RFC 4443 §3.1): from the unreachable destination to the packet's source,
/// quoting as much of `pkt` as fits in 1280 bytes. None where RFC 4443 §2.4 (e) forbids an
/// answer: the packet is an ICMPv6 error itself, or its source is unspecified or multicast,
/// or its destination multicast; or it is not IPv6.
pub fn icmp6_unreachable(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    if pkt.len() < IPV6_HEADER || pkt[0] >> 4 != 6 {
        return None;
    }
    let (src, dst) = (&pkt[8..24], &pkt[24..40]);
    if src.iter().all(|&b| b == 0) || src[0] == 0xff || dst[0] == 0xff {
        return None;
    }
    if pkt[6] == NEXT_HEADER_ICMPV6 && pkt.len() > IPV6_HEADER && pkt[IPV6_HEADER] < 128 {
        return None;
    }
    let quoted = pkt.len().min(ICMP_MAX - IPV6_HEADER - 8);
    let icmp_len = 8 + quoted;
    let total = IPV6_HEADER + icmp_len;
    let out = &mut out[..total];
    out[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    out[6] = NEXT_HEADER_ICMPV6;
    out[7] = 255;
    out[8..24].copy_from_slice(dst);
    out[24..40].copy_from_slice(src);
    let m = IPV6_HEADER;
    out[m] = ICMP_DEST_UNREACHABLE;
    out[m + 1] = CODE_ADDRESS_UNREACHABLE;
    out[m + 2..m + 8].fill(0);
    out[m + 8..].copy_from_slice(&pkt[..quoted]);
    // The checksum covers the pseudo-header (RFC 8200 §8.1) and the message.
    let mut sum = checksum_add(0, &out[8..40]);
    sum += icmp_len as u32;
    sum += u32::from(NEXT_HEADER_ICMPV6);
    sum = checksum_add(sum, &out[m..]);
    out[m + 2..m + 4].copy_from_slice(&fold(sum).to_be_bytes());
    Some(total)
}

impl Engine {
    /// Seals and sends the packets held for `e`, which just got its transmit SA. Called with
    /// the peer table locked, so nothing newer is sealed before them.
    pub(super) fn send_held(&self, e: &mut PeerEntry) {
        if e.hold.len() == 0 {
            e.hold.reset();
            return;
        }
        let fds = self.shared.fds.read().unwrap_or_else(|p| p.into_inner());
        let (Some(f), Some(tx), Some(dst)) = (fds.as_ref(), e.tx.as_ref(), e.peer.endpoint.load())
        else {
            let n = e.hold.len() as u64;
            e.hold.reset();
            self.shared.counters.drops[DropReason::NoSa as usize].fetch_add(n, Ordering::Relaxed);
            e.peer.counters.drops[DropReason::NoSa as usize].fetch_add(n, Ordering::Relaxed);
            return;
        };
        let udp = &f.udp;
        let (peer, shared) = (&e.peer, &self.shared);
        e.hold.take(self.shared.mtu, |slot, len| {
            let sent = match tx.sa.seal_in_place(slot, len) {
                Ok(total) => udp_send(udp, &slot[..total], dst),
                Err(esp::Exhausted) => {
                    shared.counters.drop(DropReason::SaExhausted);
                    peer.counters.drop(DropReason::SaExhausted);
                    false
                }
            };
            if sent {
                for c in [&shared.counters, &peer.counters] {
                    c.packets_out.fetch_add(1, Ordering::Relaxed);
                    c.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
        });
    }

    /// Answers every packet held for `inner` with ICMPv6 address unreachable (written to the
    /// TUN) and empties its ring; returns how many answers were written.
    pub fn reject_held(&self, inner: Inner) -> Result<usize, EngineError> {
        let fds = self.shared.fds.read().unwrap_or_else(|p| p.into_inner());
        let f = fds.as_ref().ok_or_else(Self::stopped)?;
        let tun = f.tun.as_raw_fd();
        let mut peers = lock(&self.shared.peers);
        let e = peers.get_mut(&inner).ok_or_else(|| Self::unknown(&inner))?;
        let head = if self.vnet { VNET_HDR_LEN } else { 0 };
        let mut out = [0u8; VNET_HDR_LEN + ICMP_MAX];
        let mut written = 0;
        e.hold.take(self.shared.mtu, |slot, len| {
            let pkt = &slot[HEADER_LEN..HEADER_LEN + len];
            if let Some(n) = icmp6_unreachable(pkt, &mut out[head..]) {
                // A zero virtio header (no offload) when the TUN takes one.
                out[..head].fill(0);
                let msg = &out[..head + n];
                // SAFETY: writes `msg.len()` bytes from `msg` to the TUN descriptor, which
                // stays open while `fds` is read-locked.
                if unsafe { libc::write(tun, msg.as_ptr().cast(), msg.len()) } >= 0 {
                    written += 1;
                }
            }
        });
        Ok(written)
    }

    /// Removes the peer's transmit SA (the tunnel went idle): its next packet is held again
    /// and asks for a new opening. Receive SAs are the control plane's to retire.
    pub fn clear_tx_sa(&self, inner: Inner) -> Result<(), EngineError> {
        let mut peers = lock(&self.shared.peers);
        let e = peers.get_mut(&inner).ok_or_else(|| Self::unknown(&inner))?;
        e.tx = None;
        e.hold.reset();
        Ok(())
    }

    /// How many packets are held for `inner`.
    pub fn held(&self, inner: Inner) -> Result<usize, EngineError> {
        let peers = lock(&self.shared.peers);
        let e = peers.get(&inner).ok_or_else(|| Self::unknown(&inner))?;
        Ok(e.hold.len())
    }
}

fn udp_send(udp: &crate::udp::Udp, buf: &[u8], dst: crate::endpoint::Endpoint) -> bool {
    udp.send_to(buf, dst, 1000).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: u8, dst: u8, nh: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        p[6] = nh;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = src;
        p[24] = 0xfd;
        p[39] = dst;
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn ring_keeps_the_newest_in_order_and_asks_once() {
        let mut r = HoldRing::default();
        let mut seen = Vec::new();
        for i in 0..20u8 {
            seen.push(r.push(&packet(1, 2, 17, &[i]), 1280));
        }
        assert_eq!(seen[0], Held::First);
        assert!(seen[1..16].iter().all(|&h| h == Held::Queued));
        assert!(seen[16..].iter().all(|&h| h == Held::Overflow));
        assert_eq!(r.len(), HOLD_SLOTS);
        let mut bodies = Vec::new();
        r.take(1280, |slot, len| bodies.push(slot[HEADER_LEN + len - 1]));
        assert_eq!(bodies, (4..20).collect::<Vec<u8>>());
        assert_eq!(r.len(), 0);
        // The opening ended: the next packet asks again.
        assert_eq!(r.push(&packet(1, 2, 17, &[0]), 1280), Held::First);
        assert_eq!(r.push(&[0x60; 1281], 1280), Held::TooLong);
    }

    #[test]
    fn icmp_answer_shape_and_checksum() {
        let p = packet(1, 2, 17, &[9; 2000]);
        let mut out = [0u8; ICMP_MAX];
        let n = icmp6_unreachable(&p, &mut out).unwrap();
        assert_eq!(n, ICMP_MAX);
        let m = &out[..n];
        assert_eq!(m[6], 58);
        assert_eq!(&m[8..24], &p[24..40]);
        assert_eq!(&m[24..40], &p[8..24]);
        assert_eq!((m[40], m[41]), (1, 3));
        assert_eq!(&m[48..], &p[..ICMP_MAX - 48]);
        // A correct checksum sums (with the pseudo-header) to all ones.
        let mut sum = checksum_add(0, &m[8..40]);
        sum += (n - 40) as u32 + 58;
        sum = checksum_add(sum, &m[40..]);
        assert_eq!(fold(sum), 0);
        // Never about an ICMPv6 error, nor to multicast or the unspecified source.
        assert!(icmp6_unreachable(&packet(1, 2, 58, &[1, 0, 0, 0]), &mut out).is_none());
        assert!(icmp6_unreachable(&packet(1, 2, 58, &[128, 0, 0, 0]), &mut out).is_some());
        let mut mc = packet(1, 2, 17, &[]);
        mc[24] = 0xff;
        assert!(icmp6_unreachable(&mc, &mut out).is_none());
        let mut unspec = packet(0, 2, 17, &[]);
        unspec[8] = 0;
        assert!(icmp6_unreachable(&unspec, &mut out).is_none());
    }
}
