//! A read from a TUN device with IFF_VNET_HDR, handled as the TX thread handles it
//! (engine/tx.rs): the virtio-net header, then either a checksum to complete
//! (`complete_csum`) or a TCP/IPv6 super packet to cut into MSS-sized segments (`Tcp6Gso`).
//!
//! Input: the bytes of one TUN read, virtio header first (`VnetHdr::parse`, native endian), at
//! most as many as the TX thread's read buffer takes.
//!
//! Promises: no panic; a completed checksum verifies (for the even offsets the kernel uses);
//! every segment is as long as `segment_len` says and fits the TX slot, is IPv6 with a
//! payload length field that matches, carries the super packet's payload in order with the
//! right sequence number, FIN/PSH only on the last segment and CWR only on the first, and a
//! TCP checksum that verifies.

use btmm_fast::esp::{HEADER_LEN, MAX_TRAILER};
use btmm_fast::offload::{
    complete_csum, Tcp6Gso, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV6, VNET_HDR_LEN,
};

use crate::{ones_sum, upper_checksum_ok};

/// engine/mod.rs: `MAX_READ` (a 64 KiB packet, its virtio header and room), and the TX slot
/// a segment is written into after the ESP header's room.
pub const MAX_READ: usize = 65535 + 1 + 256;
const SEGMENT_ROOM: usize = MAX_READ + MAX_TRAILER + 3;
/// The TX thread reads at HEADER_LEN - VNET_HDR_LEN up to HEADER_LEN + MAX_READ.
pub const MAX_INPUT: usize = HEADER_LEN + MAX_READ - (HEADER_LEN - VNET_HDR_LEN);

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A virtio-net header as the kernel writes it (native endian).
pub fn vnet_header(h: &VnetHdr) -> [u8; VNET_HDR_LEN] {
    let mut b = [0u8; VNET_HDR_LEN];
    b[0] = h.flags;
    b[1] = h.gso_type;
    b[2..4].copy_from_slice(&h.hdr_len.to_ne_bytes());
    b[4..6].copy_from_slice(&h.gso_size.to_ne_bytes());
    b[6..8].copy_from_slice(&h.csum_start.to_ne_bytes());
    b[8..10].copy_from_slice(&h.csum_offset.to_ne_bytes());
    b
}

pub fn run(data: &[u8]) {
    // The TX thread drops a read shorter than the virtio header; longer than its buffer the
    // kernel cannot return.
    if data.len() < VNET_HDR_LEN || data.len() > MAX_INPUT {
        return;
    }
    let hdr = VnetHdr::parse(&data[..VNET_HDR_LEN]);
    let mut pkt = data[VNET_HDR_LEN..].to_vec();
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM == 0 {
                return;
            }
            let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
            let before = pkt.clone();
            match complete_csum(&mut pkt, start, offset) {
                Err(_) => {
                    assert!(
                        start + offset + 2 > pkt.len(),
                        "refused a field inside the packet"
                    );
                    assert_eq!(pkt, before, "a refused packet was changed");
                }
                Ok(()) => {
                    let at = start + offset;
                    assert!(at + 2 <= pkt.len());
                    assert_eq!(pkt[..at], before[..at]);
                    assert_eq!(pkt[at + 2..], before[at + 2..]);
                    if offset % 2 == 0 {
                        // The field held the pseudo-header's sum: that sum plus the bytes
                        // from `start` now (checksum included) is zero in ones' complement.
                        let s = ones_sum(&[&before[at..at + 2], &pkt[start..]]);
                        assert!(s == 0xffff || s == 0, "checksum does not verify: {s:#x}");
                    }
                    if offset == 6 {
                        assert_ne!(&pkt[at..at + 2], &[0, 0], "UDP checksum 0 is 'none'");
                    }
                }
            }
        }
        GSO_TCPV6 => {
            let Ok(gso) = Tcp6Gso::layout(&pkt, &hdr) else {
                return;
            };
            check_segments(&pkt, &gso);
        }
        _ => {}
    }
}

fn check_segments(pkt: &[u8], gso: &Tcp6Gso) {
    let h = gso.header;
    assert!((60..=100).contains(&h) && h <= pkt.len() && gso.mss > 0 && gso.segments >= 1);
    let payload = &pkt[h..];
    assert_eq!(gso.segments, payload.len().div_ceil(gso.mss).max(1));
    let seq0 = u32::from_be_bytes([pkt[44], pkt[45], pkt[46], pkt[47]]);
    let mut out = vec![0u8; SEGMENT_ROOM];
    let mut at = 0;
    for i in 0..gso.segments {
        let want = gso.segment_len(i);
        assert!(want <= SEGMENT_ROOM, "segment {i} does not fit the TX slot");
        out.fill(0xee);
        let n = gso.write_segment(pkt, i, &mut out);
        assert_eq!(n, want, "segment {i}: written length");
        let seg = &out[..n];
        let chunk = &seg[h..];
        assert_eq!(
            chunk,
            &payload[at..at + chunk.len()],
            "segment {i}: payload"
        );
        assert!(!chunk.is_empty() || payload.is_empty());
        assert_eq!(seg[0] >> 4, 6);
        assert_eq!(
            usize::from(u16::from_be_bytes([seg[4], seg[5]])),
            n - 40,
            "segment {i}: IPv6 payload length"
        );
        let seq = u32::from_be_bytes([seg[44], seg[45], seg[46], seg[47]]);
        assert_eq!(
            seq,
            seq0.wrapping_add(at as u32),
            "segment {i}: sequence number"
        );
        let flags = seg[53];
        if i + 1 != gso.segments {
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH),
                0,
                "segment {i}: FIN/PSH before the end"
            );
        }
        if i != 0 {
            assert_eq!(flags & TCP_CWR, 0, "segment {i}: CWR after the first");
        }
        assert_eq!(
            flags | TCP_FIN | TCP_PSH | TCP_CWR,
            pkt[53] | TCP_FIN | TCP_PSH | TCP_CWR
        );
        assert!(upper_checksum_ok(seg, 6), "segment {i}: TCP checksum");
        at += chunk.len();
    }
    assert_eq!(at, payload.len(), "the segments do not cover the payload");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds::tcp6;

    #[test]
    fn a_super_packet_longer_than_an_ipv6_payload_is_refused() {
        // 64 KiB of TCP payload behind 72 bytes of headers is more than the 16-bit IPv6
        // payload length can say: the kernel never hands such a read over, and if it did,
        // segments with a wrapped length field must not be sealed.
        let pkt = tcp6(1, 0x10, 12, &vec![0u8; MAX_READ - 72]);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: 65535,
            csum_start: 40,
            csum_offset: 16,
        };
        run(&[&vnet_header(&hdr)[..], &pkt].concat());
    }
}
