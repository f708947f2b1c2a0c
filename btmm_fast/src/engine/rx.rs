//! The RX thread: recvmmsg -> keepalive / control / ESP open (in place) -> checks -> TUN,
//! merging in-order TCP segments into one write when the TUN takes virtio headers
//! (offload.rs).
//!
//! Buffers: the thread owns one `RecvBatch`; every datagram is opened in place in its slot and
//! the inner packet is written to the TUN from there.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    is_ipv6, lock, pack, unpack, wait_readable, Event, Peer, Shared, Tally, BATCH,
    MAX_CONTROL_MESSAGE, RX_SLOT,
};
use crate::esp::{self, DropReason};
use crate::offload::{self, TcpSeg, VNET_HDR_LEN};
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
                    if *payload == [0xff] {
                        tally.keepalives_in += 1;
                        continue;
                    }
                    if trunc {
                        tally.drops[DropReason::Malformed as usize] += 1;
                        continue;
                    }
                    if payload.len() >= 4 && payload[..4] == [0, 0, 0, 0] {
                        tally.control_in += 1;
                        if payload.len() - 4 > MAX_CONTROL_MESSAGE {
                            tally.drops[DropReason::ControlOversize as usize] += 1;
                            continue;
                        }
                        events.push((
                            Event::Control {
                                source: src,
                                payload: payload[4..].to_vec(),
                            },
                            None,
                        ));
                        continue;
                    }
                    if esp::check_length(payload.len()).is_err() {
                        tally.drops[DropReason::Malformed as usize] += 1;
                        continue;
                    }
                    let spi = esp::payload_spi(payload).unwrap_or(0);
                    let Some(entry) = rx.get_mut(&spi) else {
                        tally.drops[DropReason::UnknownSpi as usize] += 1;
                        continue;
                    };
                    let peer = &entry.peer;
                    let opened = match entry.sa.open_in_place(payload) {
                        Ok(o) => o,
                        Err(e) => {
                            tally.drops[e.reason as usize] += 1;
                            peer.counters.drop(e.reason);
                            continue;
                        }
                    };
                    let inner = &payload[opened.inner.clone()];
                    let reason = if !is_ipv6(inner) {
                        Some(DropReason::Malformed)
                    } else if inner[8..24] != peer.inner {
                        Some(DropReason::SourceMismatch)
                    } else {
                        None
                    };
                    if let Some(r) = reason {
                        tally.drops[r as usize] += 1;
                        peer.counters.drop(r);
                        continue;
                    }
                    if opened.advanced {
                        let new = pack(Some(src));
                        let old = peer.endpoint.load(Ordering::Relaxed);
                        if old != new {
                            peer.endpoint.store(new, Ordering::Relaxed);
                            let ev = Event::Roamed {
                                inner: peer.inner,
                                old: unpack(old),
                                new: src,
                            };
                            events.push((ev, Some(Arc::clone(peer))));
                        }
                    }
                    deliver.push((i, opened.inner, Arc::clone(peer)));
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
