//! TUN offloads (virtio-net header, Linux Documentation/networking/tuntap.rst and
//! include/uapi/linux/virtio_net.h): with IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO6) the kernel
//! hands the engine TCP/IPv6 "super packets" of up to 64 KiB and leaves checksums partial. The
//! engine then finishes checksums and cuts super packets into MSS-sized segments (as a NIC
//! would, RFC 9293 §3.1 for the TCP checksum, RFC 8200 §8.1 for the IPv6 pseudo-header) before
//! sealing each one. On the wire nothing changes: every ESP packet carries one ordinary IPv6
//! packet, exactly as without offloads.
//!
//! In the other direction the engine coalesces consecutive in-order segments of one TCP flow
//! from a receive batch into one super packet (what a NIC's GRO does) and writes it with a
//! TCPV6 GSO header, so the local TCP stack handles one packet instead of dozens.

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

const IPV6_LEN: usize = 40;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (native endian on TUN unless TUNSETVNETBE/LE is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> VnetHdr {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }
}

/// Ones' complement sum of `data` as big-endian 16-bit words, unfolded.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Why a packet from an offloading TUN cannot be completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadOffload;

/// Finishes a CHECKSUM_PARTIAL packet: the field at `start + offset` holds the pseudo-header
/// sum; the checksum covers everything from `start` to the end.
pub fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), BadOffload> {
    let at = start.checked_add(offset).ok_or(BadOffload)?;
    if at + 2 > pkt.len() {
        return Err(BadOffload);
    }
    let mut c = !fold(sum(&pkt[start..], 0));
    // A UDP checksum (offset 6) of zero means "none", which IPv6 forbids (RFC 8200 §8.1).
    if offset == 6 && c == 0 {
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Where the parts of a TCP/IPv6 super packet are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcp6Gso {
    /// IPv6 + TCP header length (copied in front of every segment).
    pub header: usize,
    pub mss: usize,
    pub segments: usize,
    payload: usize,
}

impl Tcp6Gso {
    /// Checks a super packet (without its virtio header). Only plain IPv6 + TCP (no extension
    /// headers) is segmented; the kernel does not build anything else for TSO6 on a TUN. A
    /// packet longer than a 16-bit payload length can say (no jumbograms here) is refused:
    /// its segments' length fields would wrap.
    pub fn layout(pkt: &[u8], hdr: &VnetHdr) -> Result<Tcp6Gso, BadOffload> {
        if pkt.len() < IPV6_LEN + 20 || pkt[0] >> 4 != 6 || pkt[6] != PROTO_TCP {
            return Err(BadOffload);
        }
        if pkt.len() > IPV6_LEN + usize::from(u16::MAX) {
            return Err(BadOffload);
        }
        if hdr.flags & F_NEEDS_CSUM != 0 && usize::from(hdr.csum_start) != IPV6_LEN {
            return Err(BadOffload);
        }
        let th = usize::from(pkt[IPV6_LEN + 12] >> 4) * 4;
        let header = IPV6_LEN + th;
        let mss = usize::from(hdr.gso_size);
        if th < 20 || header > pkt.len() || mss == 0 {
            return Err(BadOffload);
        }
        let payload = pkt.len() - header;
        Ok(Tcp6Gso {
            header,
            mss,
            segments: payload.div_ceil(mss).max(1),
            payload,
        })
    }

    /// Length of segment `i` once written.
    pub fn segment_len(&self, i: usize) -> usize {
        let start = i * self.mss;
        self.header + (self.payload - start).min(self.mss)
    }

    /// Writes segment `i` of `pkt` into `out` (at least `segment_len(i)` bytes) with its own
    /// payload length, sequence number, flags and a complete checksum. Returns its length.
    pub fn write_segment(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> usize {
        let h = self.header;
        let start = i * self.mss;
        let chunk = (self.payload - start).min(self.mss);
        out[..h].copy_from_slice(&pkt[..h]);
        out[h..h + chunk].copy_from_slice(&pkt[h + start..h + start + chunk]);
        let tcp_len = h - IPV6_LEN + chunk;
        out[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        let seq =
            u32::from_be_bytes([pkt[44], pkt[45], pkt[46], pkt[47]]).wrapping_add(start as u32);
        out[44..48].copy_from_slice(&seq.to_be_bytes());
        let flags = IPV6_LEN + 13;
        if i + 1 != self.segments {
            out[flags] &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            out[flags] &= !TCP_CWR;
        }
        let ck = IPV6_LEN + 16;
        out[ck..ck + 2].copy_from_slice(&[0, 0]);
        let pseudo = sum(
            &out[8..40],
            u64::from(tcp_len as u32) + u64::from(PROTO_TCP),
        );
        let c = !fold(sum(&out[IPV6_LEN..h + chunk], pseudo));
        out[ck..ck + 2].copy_from_slice(&c.to_be_bytes());
        h + chunk
    }
}

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;

/// A TCP/IPv6 data segment that may take part in coalescing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeg {
    /// IPv6 + TCP header length.
    pub header: usize,
    pub payload: usize,
    pub seq: u32,
    pub psh: bool,
}

impl TcpSeg {
    /// Only plain data segments qualify: IPv6 without extension headers, TCP with ACK (and
    /// maybe PSH) and nothing else, a payload, and lengths that agree.
    pub fn parse(p: &[u8]) -> Option<TcpSeg> {
        if p.len() < IPV6_LEN + 20 || p[0] >> 4 != 6 || p[6] != PROTO_TCP {
            return None;
        }
        if usize::from(u16::from_be_bytes([p[4], p[5]])) != p.len() - IPV6_LEN {
            return None;
        }
        let th = usize::from(p[IPV6_LEN + 12] >> 4) * 4;
        let header = IPV6_LEN + th;
        if th < 20 || header >= p.len() {
            return None;
        }
        let flags = p[IPV6_LEN + 13];
        if flags & TCP_ACK == 0
            || flags & (TCP_SYN | TCP_RST | TCP_FIN | TCP_URG | TCP_ECE | TCP_CWR) != 0
        {
            return None;
        }
        Some(TcpSeg {
            header,
            payload: p.len() - header,
            seq: u32::from_be_bytes([p[44], p[45], p[46], p[47]]),
            psh: flags & TCP_PSH != 0,
        })
    }
}

/// Whether `next` continues the run that starts with `first` and currently ends with `last`
/// (`total` payload bytes so far): same flow and headers (addresses, ports, ack, window,
/// options, IPv6 traffic class/flow label/hop limit), the next sequence number, every segment
/// but the last of the first one's size, PSH only at the end, and the result under 64 KiB.
pub fn continues(
    first: &[u8],
    f: &TcpSeg,
    last: &TcpSeg,
    total: usize,
    next: &[u8],
    n: &TcpSeg,
) -> bool {
    !last.psh
        && n.header == f.header
        && last.payload == f.payload
        && n.payload <= f.payload
        && n.seq == last.seq.wrapping_add(last.payload as u32)
        && f.header + total + n.payload <= 65535
        && first[..4] == next[..4]
        && first[6..IPV6_LEN + 4] == next[6..IPV6_LEN + 4]
        && first[IPV6_LEN + 8..IPV6_LEN + 13] == next[IPV6_LEN + 8..IPV6_LEN + 13]
        && first[IPV6_LEN + 14..IPV6_LEN + 16] == next[IPV6_LEN + 14..IPV6_LEN + 16]
        && first[IPV6_LEN + 20..f.header] == next[IPV6_LEN + 20..n.header]
}

/// Turns the first segment of a run (in place) into the header of the super packet that
/// carries `total` payload bytes, and returns the virtio header for writing it. `psh`: the
/// last segment had PSH.
pub fn coalesced_header(
    first: &mut [u8],
    f: &TcpSeg,
    total: usize,
    psh: bool,
) -> [u8; VNET_HDR_LEN] {
    let tcp_len = f.header - IPV6_LEN + total;
    first[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    if psh {
        first[IPV6_LEN + 13] |= TCP_PSH;
    }
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the payload is covered
    // by the ESP ICV, which is what makes skipping the per-segment check sound.
    let pseudo = fold(sum(&first[8..40], tcp_len as u64 + u64::from(PROTO_TCP)));
    first[IPV6_LEN + 16..IPV6_LEN + 18].copy_from_slice(&pseudo.to_be_bytes());
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = F_NEEDS_CSUM;
    h[1] = GSO_TCPV6;
    h[2..4].copy_from_slice(&(f.header as u16).to_ne_bytes());
    h[4..6].copy_from_slice(&(f.payload as u16).to_ne_bytes());
    h[6..8].copy_from_slice(&(IPV6_LEN as u16).to_ne_bytes());
    h[8..10].copy_from_slice(&16u16.to_ne_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 checksum verification written the slow, obvious way: the sum over pseudo-header
    /// and segment (checksum included) must be 0xffff.
    fn verifies(pkt: &[u8], proto: u8) -> bool {
        let upper = &pkt[40..];
        let mut words: Vec<u32> = Vec::new();
        let mut push = |b: &[u8]| {
            for i in (0..b.len()).step_by(2) {
                let hi = u32::from(b[i]);
                let lo = u32::from(*b.get(i + 1).unwrap_or(&0));
                words.push(hi << 8 | lo);
            }
        };
        push(&pkt[8..40]);
        push(&(upper.len() as u32).to_be_bytes());
        push(&[0, 0, 0, proto]);
        push(upper);
        let mut s: u32 = words.iter().sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    }

    fn tcp6(payload: &[u8], flags: u8, th_extra: usize) -> Vec<u8> {
        let th = 20 + th_extra;
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((th + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[PROTO_TCP, 64]);
        p.extend_from_slice(&[0xfd, 0, 0xb7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0xb7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&5201u16.to_be_bytes());
        p.extend_from_slice(&0xffff_ff00u32.to_be_bytes()); // seq wraps inside the run
        p.extend_from_slice(&77u32.to_be_bytes());
        p.push(((th / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0xff, 0xff, 0xaa, 0xbb, 0, 0]); // window, bogus csum, urg
        p.extend(std::iter::repeat_n(1u8, th_extra)); // options (NOPs)
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn segments_cover_the_payload_with_valid_headers() {
        let payload: Vec<u8> = (0..10_001u32).map(|i| (i * 7 % 251) as u8).collect();
        for (mss, th_extra) in [
            (1388usize, 12usize),
            (1000, 0),
            (10_001, 0),
            (20_000, 0),
            (1, 0),
        ] {
            let payload = if mss == 1 {
                &payload[..50]
            } else {
                &payload[..]
            };
            let pkt = tcp6(payload, TCP_FIN | TCP_PSH | TCP_CWR | 0x10, th_extra);
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV6,
                gso_size: mss as u16,
                csum_start: 40,
                csum_offset: 16,
                hdr_len: 0,
            };
            let g = Tcp6Gso::layout(&pkt, &hdr).unwrap();
            assert_eq!(g.segments, payload.len().div_ceil(mss));
            let mut joined = Vec::new();
            for i in 0..g.segments {
                let mut out = vec![0u8; 70_000];
                let n = g.write_segment(&pkt, i, &mut out);
                assert_eq!(n, g.segment_len(i));
                let seg = &out[..n];
                assert!(verifies(seg, PROTO_TCP), "mss {mss} segment {i}");
                assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), n - 40);
                let seq = u32::from_be_bytes([seg[44], seg[45], seg[46], seg[47]]);
                assert_eq!(seq, 0xffff_ff00u32.wrapping_add((i * mss) as u32));
                let flags = seg[53];
                let last = i + 1 == g.segments;
                assert_eq!(flags & TCP_FIN != 0, last);
                assert_eq!(flags & TCP_PSH != 0, last);
                assert_eq!(flags & TCP_CWR != 0, i == 0);
                assert_eq!(flags & 0x10, 0x10, "ACK kept");
                assert_eq!(
                    &seg[40 + 20..40 + 20 + th_extra],
                    &pkt[60..60 + th_extra],
                    "options copied"
                );
                joined.extend_from_slice(&seg[40 + 20 + th_extra..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn bad_super_packets_are_refused() {
        let pkt = tcp6(&[0; 3000], 0x10, 0);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            gso_size: 1000,
            csum_start: 40,
            csum_offset: 16,
            hdr_len: 60,
        };
        assert!(Tcp6Gso::layout(&pkt, &hdr).is_ok());
        assert!(Tcp6Gso::layout(&pkt, &VnetHdr { gso_size: 0, ..hdr }).is_err());
        assert!(Tcp6Gso::layout(
            &pkt,
            &VnetHdr {
                csum_start: 48,
                ..hdr
            }
        )
        .is_err());
        assert!(Tcp6Gso::layout(&pkt[..50], &hdr).is_err());
        let mut udp = pkt.clone();
        udp[6] = 17;
        assert!(Tcp6Gso::layout(&udp, &hdr).is_err());
        let mut short_th = pkt.clone();
        short_th[52] = 4 << 4;
        assert!(Tcp6Gso::layout(&short_th, &hdr).is_err());
    }

    #[test]
    fn super_packet_beyond_a_16_bit_payload_length_is_refused() {
        // Found while writing the gso fuzz target (btmm_fast/fuzz), whose segment checks fail
        // on it: a TUN read has room for more than 40 + 65535 bytes, and one segment of such
        // a packet (MSS 65535) got an IPv6 payload length field that wrapped (31, not 65567).
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            gso_size: 65535,
            csum_start: 40,
            csum_offset: 16,
            hdr_len: 72,
        };
        let biggest = tcp6(&vec![0; 65535 - 32], 0x10, 12);
        assert_eq!(biggest.len(), 40 + 65535);
        let g = Tcp6Gso::layout(&biggest, &hdr).unwrap();
        let mut out = vec![0u8; biggest.len()];
        let n = g.write_segment(&biggest, 0, &mut out);
        assert_eq!(usize::from(u16::from_be_bytes([out[4], out[5]])), n - 40);
        let over = tcp6(&vec![0; 65535 - 31], 0x10, 12);
        assert_eq!(Tcp6Gso::layout(&over, &hdr), Err(BadOffload));
    }

    #[test]
    fn coalescing_is_the_inverse_of_segmenting() {
        // Segment a super packet, coalesce the segments again: same bytes (checksum aside,
        // which becomes the partial pseudo-header sum), and segmenting that gives the same
        // segments back.
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let sup = tcp6(&payload, TCP_ACK | TCP_PSH, 12);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            gso_size: 1200,
            csum_start: 40,
            csum_offset: 16,
            hdr_len: 0,
        };
        let g = Tcp6Gso::layout(&sup, &hdr).unwrap();
        let segs: Vec<Vec<u8>> = (0..g.segments)
            .map(|i| {
                let mut out = vec![0u8; 2000];
                let n = g.write_segment(&sup, i, &mut out);
                out.truncate(n);
                out
            })
            .collect();
        let infos: Vec<TcpSeg> = segs.iter().map(|s| TcpSeg::parse(s).unwrap()).collect();
        let mut total = infos[0].payload;
        for i in 1..segs.len() {
            assert!(
                continues(
                    &segs[0],
                    &infos[0],
                    &infos[i - 1],
                    total,
                    &segs[i],
                    &infos[i]
                ),
                "segment {i}"
            );
            total += infos[i].payload;
        }
        assert_eq!(total, payload.len());
        let mut first = segs[0].clone();
        let vh = coalesced_header(&mut first, &infos[0], total, infos.last().unwrap().psh);
        let mut merged = first.clone();
        for s in &segs[1..] {
            merged.extend_from_slice(&s[infos[0].header..]);
        }
        let vh = VnetHdr::parse(&vh);
        assert_eq!(
            (vh.gso_type, vh.gso_size, vh.csum_start, vh.csum_offset),
            (GSO_TCPV6, 1200, 40, 16)
        );
        // Everything but the checksum field matches the original super packet.
        let mut a = merged.clone();
        let mut b = sup.clone();
        a[56..58].copy_from_slice(&[0, 0]);
        b[56..58].copy_from_slice(&[0, 0]);
        assert_eq!(a, b);
        // Completing the partial checksum gives a valid packet.
        complete_csum(&mut merged, 40, 16).unwrap();
        assert!(verifies(&merged, PROTO_TCP));
        let g2 = Tcp6Gso::layout(&merged, &vh).unwrap();
        for (i, s) in segs.iter().enumerate() {
            let mut out = vec![0u8; 2000];
            let n = g2.write_segment(&merged, i, &mut out);
            assert_eq!(&out[..n], &s[..]);
        }
    }

    #[test]
    fn what_does_not_coalesce() {
        let a = tcp6(&[1; 1000], TCP_ACK, 0);
        let fa = TcpSeg::parse(&a).unwrap();
        let next = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = tcp6(&[2; 1000], TCP_ACK, 0);
            let seq = 0xffff_ff00u32.wrapping_add(1000);
            b[44..48].copy_from_slice(&seq.to_be_bytes());
            f(&mut b);
            b
        };
        let ok = next(&|_| {});
        assert!(continues(
            &a,
            &fa,
            &fa,
            1000,
            &ok,
            &TcpSeg::parse(&ok).unwrap()
        ));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gap in sequence", next(&|b| b[47] ^= 1)),
            ("other port", next(&|b| b[41] ^= 1)),
            ("other source", next(&|b| b[20] ^= 1)),
            ("other ack", next(&|b| b[51] ^= 1)),
            ("other window", next(&|b| b[55] ^= 1)),
            ("other hop limit", next(&|b| b[7] ^= 1)),
            ("other flow label", next(&|b| b[3] ^= 1)),
        ];
        for (what, b) in cases {
            let fb = TcpSeg::parse(&b).unwrap();
            assert!(!continues(&a, &fa, &fa, 1000, &b, &fb), "{what}");
        }
        // Longer than the first: not a continuation.
        let long = tcp6(&[2; 1001], TCP_ACK, 0);
        let mut long = long;
        long[44..48].copy_from_slice(&0xffff_ff00u32.wrapping_add(1000).to_be_bytes());
        assert!(!continues(
            &a,
            &fa,
            &fa,
            1000,
            &long,
            &TcpSeg::parse(&long).unwrap()
        ));
        // After a PSH, the run ends.
        let psh = TcpSeg { psh: true, ..fa };
        assert!(!continues(
            &a,
            &fa,
            &psh,
            1000,
            &ok,
            &TcpSeg::parse(&ok).unwrap()
        ));
        // Not data segments at all.
        for flags in [
            TCP_ACK | TCP_SYN,
            TCP_ACK | TCP_FIN,
            TCP_RST,
            0,
            TCP_ACK | TCP_URG,
            TCP_ACK | TCP_CWR,
        ] {
            assert!(
                TcpSeg::parse(&tcp6(&[0; 10], flags, 0)).is_none(),
                "flags {flags:#x}"
            );
        }
        assert!(TcpSeg::parse(&tcp6(&[], TCP_ACK, 0)).is_none(), "pure ACK");
        let mut bad_len = tcp6(&[0; 10], TCP_ACK, 0);
        bad_len[5] ^= 1;
        assert!(TcpSeg::parse(&bad_len).is_none());
    }

    #[test]
    fn partial_checksums_are_completed() {
        for len in [0usize, 1, 2, 3, 1000, 1001] {
            // TCP: the kernel leaves the folded pseudo-header sum in the field.
            let mut pkt = tcp6(&vec![0x5au8; len], 0x18, 0);
            let tcp_len = pkt.len() - 40;
            let pseudo = fold(sum(&pkt[8..40], tcp_len as u64 + 6));
            pkt[56..58].copy_from_slice(&pseudo.to_be_bytes());
            complete_csum(&mut pkt, 40, 16).unwrap();
            assert!(verifies(&pkt, PROTO_TCP), "tcp len {len}");
            // UDP, including the zero -> 0xffff rule.
            let mut u = pkt[..40].to_vec();
            u[6] = 17;
            let ulen = 8 + len;
            u[4..6].copy_from_slice(&(ulen as u16).to_be_bytes());
            u.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
            u.extend_from_slice(&(ulen as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend(std::iter::repeat_n(0xa5u8, len));
            let pseudo = fold(sum(&u[8..40], ulen as u64 + 17));
            u[46..48].copy_from_slice(&pseudo.to_be_bytes());
            complete_csum(&mut u, 40, 6).unwrap();
            assert!(verifies(&u, 17), "udp len {len}");
            assert_ne!(&u[46..48], &[0, 0]);
        }
        let mut tiny = [0u8; 10];
        assert_eq!(complete_csum(&mut tiny, 4, 6), Err(BadOffload));
    }
}
