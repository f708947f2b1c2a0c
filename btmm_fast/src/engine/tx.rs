//! The TX thread: TUN -> (finish checksums, cut TCP super packets) -> route by inner
//! destination -> ESP seal (in place) -> sendmmsg, with UDP GSO for runs to one endpoint.
//!
//! Buffers: the thread owns `BATCH` slots of `TX_SLOT` bytes; a TUN read lands at
//! `HEADER_LEN` (its virtio header, if any, in the ESP header's headroom) and is sealed in
//! place, so the sender sends straight from the slots.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    hold, inner_at, is_ipv6, lock, wait_readable, Event, Peer, Shared, Tally, BATCH, MAX_READ,
    TX_SLOT,
};
use crate::esp::{self, DropReason, HEADER_LEN};
use crate::offload::{
    self, Tcp6Gso, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV6, VNET_HDR_LEN,
};
use crate::udp::{Outgoing, SendBatch, Udp, MAX_UDP_PAYLOAD};

/// The TX thread's preallocated state for sealing and sending one batch.
struct TxBatch {
    out: Vec<Outgoing>,
    owners: Vec<Arc<Peer>>,
    inner_lens: Vec<usize>,
    sent: [bool; BATCH],
    sender: SendBatch,
    tally: Tally,
    /// Events of this batch, queued once its counters are published, so that the control
    /// plane never sees an event before the counts that go with it.
    events: Vec<(Event, Option<Arc<Peer>>)>,
}

impl TxBatch {
    /// Routes, seals and sends `slots[..lens.len()]` (inner packets at HEADER_LEN).
    fn flush(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        event_fd: RawFd,
        slots: &mut [Vec<u8>],
        lens: &[usize],
    ) {
        self.out.clear();
        self.owners.clear();
        self.inner_lens.clear();
        {
            let mut peers = lock(&shared.peers);
            for (slot, &len) in slots.iter_mut().zip(lens) {
                let pkt = &slot[HEADER_LEN..HEADER_LEN + len];
                // Oversize: the sealed packet would not fit one UDP datagram (the TUN MTU
                // was raised behind the engine's back).
                if !is_ipv6(pkt) || esp::sealed_len(len) > MAX_UDP_PAYLOAD {
                    self.tally.drops[DropReason::Malformed as usize] += 1;
                    continue;
                }
                let Some(e) = peers.get_mut(&inner_at(pkt, 24)) else {
                    self.tally.drops[DropReason::NoRoute as usize] += 1;
                    continue;
                };
                let ep = e.peer.endpoint.load();
                if e.tx.is_none() {
                    hold::hold(e, pkt, shared.mtu, &mut self.tally, &mut self.events);
                    continue;
                }
                let (Some(tx), Some(dst)) = (e.tx.as_ref(), ep) else {
                    self.tally.drops[DropReason::NoSa as usize] += 1;
                    e.peer.counters.drop(DropReason::NoSa);
                    continue;
                };
                match tx.sa.seal_in_place(slot, len) {
                    Ok(total) => {
                        self.out.push(Outgoing {
                            ptr: slot.as_ptr(),
                            len: total,
                            dst,
                        });
                        self.owners.push(Arc::clone(&e.peer));
                        self.inner_lens.push(len);
                    }
                    Err(esp::Exhausted) => {
                        self.tally.drops[DropReason::SaExhausted as usize] += 1;
                        e.peer.counters.drop(DropReason::SaExhausted);
                        if !tx.reported.swap(true, Ordering::Relaxed) {
                            let ev = Event::Exhausted {
                                inner: e.peer.inner,
                                spi: tx.sa.spi(),
                            };
                            self.events.push((ev, Some(Arc::clone(&e.peer))));
                        }
                    }
                }
            }
        }
        if !self.out.is_empty() {
            let n = self.out.len();
            self.sent[..n].iter_mut().for_each(|s| *s = false);
            self.sender.send(udp, &self.out, &mut self.sent[..n]);
            for ((peer, &len), &ok) in self.owners.iter().zip(&self.inner_lens).zip(&self.sent) {
                if ok {
                    self.tally.packets_out += 1;
                    self.tally.bytes_out += len as u64;
                    peer.counters.packets_out.fetch_add(1, Ordering::Relaxed);
                    peer.counters
                        .bytes_out
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
            }
        }
        self.tally.flush(&shared.counters);
        for (ev, peer) in self.events.drain(..) {
            let wanted = match ev {
                Event::Wanted { inner } => Some(inner),
                _ => None,
            };
            if !shared.push_event(ev, event_fd, peer.as_deref()) {
                if let Some(inner) = wanted {
                    hold::wanted_lost(shared, &inner);
                }
            }
        }
    }
}

pub(super) fn tx_loop(
    shared: &Shared,
    tun: RawFd,
    vnet: bool,
    udp: Arc<Udp>,
    wake: RawFd,
    event_fd: RawFd,
) {
    let mut slots: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; TX_SLOT]).collect();
    // A super packet is moved here (by swapping buffers) while its segments fill the slots.
    let mut spare = vec![0u8; TX_SLOT];
    let mut lens = [0usize; BATCH];
    let mut batch = TxBatch {
        out: Vec::with_capacity(BATCH),
        owners: Vec::with_capacity(BATCH),
        inner_lens: Vec::with_capacity(BATCH),
        sent: [false; BATCH],
        sender: SendBatch::new(BATCH),
        tally: Tally::default(),
        events: Vec::with_capacity(BATCH),
    };
    // The virtio header, when there is one, lands in the ESP header's headroom.
    let read_at = if vnet {
        HEADER_LEN - VNET_HDR_LEN
    } else {
        HEADER_LEN
    };
    let read_end = HEADER_LEN + MAX_READ;
    let mut n = 0;
    while wait_readable(shared, tun, wake) {
        loop {
            let mut drained = false;
            for _ in 0..BATCH {
                if n == BATCH {
                    batch.flush(shared, &udp, event_fd, &mut slots, &lens);
                    n = 0;
                }
                let slot = &mut slots[n][read_at..read_end];
                // SAFETY: reads at most `slot.len()` bytes into `slot`.
                let r = unsafe { libc::read(tun, slot.as_mut_ptr().cast(), slot.len()) };
                if r < 0 {
                    // EAGAIN: drained. Other errors (device gone) end this round; poll decides.
                    drained = true;
                    break;
                }
                let r = r as usize;
                if !vnet {
                    lens[n] = r;
                    n += 1;
                    continue;
                }
                if r < VNET_HDR_LEN {
                    batch.tally.drops[DropReason::Malformed as usize] += 1;
                    continue;
                }
                let hdr = VnetHdr::parse(&slots[n][read_at..HEADER_LEN]);
                let len = r - VNET_HDR_LEN;
                match hdr.gso_type & !GSO_ECN {
                    GSO_NONE => {
                        let pkt = &mut slots[n][HEADER_LEN..HEADER_LEN + len];
                        if hdr.flags & F_NEEDS_CSUM != 0
                            && offload::complete_csum(
                                pkt,
                                usize::from(hdr.csum_start),
                                usize::from(hdr.csum_offset),
                            )
                            .is_err()
                        {
                            batch.tally.drops[DropReason::Malformed as usize] += 1;
                            continue;
                        }
                        lens[n] = len;
                        n += 1;
                    }
                    GSO_TCPV6 => {
                        std::mem::swap(&mut slots[n], &mut spare);
                        let pkt = &spare[HEADER_LEN..HEADER_LEN + len];
                        let Ok(gso) = Tcp6Gso::layout(pkt, &hdr) else {
                            batch.tally.drops[DropReason::Malformed as usize] += 1;
                            continue;
                        };
                        for i in 0..gso.segments {
                            if n == BATCH {
                                batch.flush(shared, &udp, event_fd, &mut slots, &lens);
                                n = 0;
                            }
                            lens[n] = gso.write_segment(pkt, i, &mut slots[n][HEADER_LEN..]);
                            n += 1;
                        }
                    }
                    _ => batch.tally.drops[DropReason::Malformed as usize] += 1,
                }
            }
            if n > 0 {
                batch.flush(shared, &udp, event_fd, &mut slots, &lens[..n]);
                n = 0;
            }
            batch.tally.flush(&shared.counters);
            if drained || !shared.running.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}
