//! GRO: the RX thread merging the authenticated inner packets of one receive batch into TCP
//! super packets for a TUN with virtio headers (engine/rx.rs `write_coalesced`). The inner
//! packets are what a peer sent, so any bytes can reach this code once they pass the ICV.
//!
//! Input: up to `BATCH` inner packets, each `len(2, big-endian) bytes(len)`. The target cuts
//! the batch into runs exactly as `write_coalesced` does (`TcpSeg::parse`, then `continues`
//! from the first segment of the run) and builds each merged packet the way its `writev`
//! lays it out (`coalesced_header` on the first segment, then every other segment's payload).
//!
//! Promises: no panic; every packet is written exactly once, in order; a merged packet is at
//! most 64 KiB, its IPv6 payload length and virtio header (TCPV6, MSS = the first segment's
//! payload, checksum at 40 + 16) agree with it, its completed checksum verifies, and cutting
//! it again with the TX side's `Tcp6Gso` gives back the received segments (but for the
//! checksum and the unused urgent pointer).

use btmm_fast::engine::BATCH;
use btmm_fast::offload::{
    coalesced_header, complete_csum, continues, Tcp6Gso, TcpSeg, VnetHdr, F_NEEDS_CSUM, GSO_TCPV6,
    VNET_HDR_LEN,
};

use crate::{upper_checksum_ok, Reader};

/// A batch of packets as the target's input (what the seeds are made of).
pub fn batch(packets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// One `write_coalesced` decision: `packets[start..end]` go in one write; `run` when they are
/// merged (the first segment's `TcpSeg`, the payload total and the last one's PSH).
struct Write {
    start: usize,
    end: usize,
    run: Option<(TcpSeg, usize, bool)>,
}

/// The run detection of `write_coalesced`, step for step.
fn plan(packets: &[&[u8]]) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut k = 0;
    while k < packets.len() {
        let mut end = k + 1;
        let mut run = None;
        let first = packets[k];
        if let Some(f) = TcpSeg::parse(first) {
            let (mut last, mut total) = (f, f.payload);
            while end < packets.len() {
                let next = packets[end];
                match TcpSeg::parse(next) {
                    Some(n) if continues(first, &f, &last, total, next, &n) => {
                        total += n.payload;
                        last = n;
                        end += 1;
                    }
                    _ => break,
                }
            }
            run = Some((f, total, last.psh));
        }
        if end - k == 1 {
            run = None;
        }
        writes.push(Write { start: k, end, run });
        k = end;
    }
    writes
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut packets: Vec<&[u8]> = Vec::new();
    while !r.is_empty() && packets.len() < BATCH {
        let len = usize::from(r.u16());
        packets.push(r.bytes(len));
    }
    let writes = plan(&packets);
    let mut next = 0;
    for w in &writes {
        assert_eq!(w.start, next, "a packet skipped or written twice");
        assert!(w.end > w.start && w.end <= packets.len());
        next = w.end;
        if let Some((f, total, psh)) = w.run {
            check_merge(&packets[w.start..w.end], &f, total, psh);
        }
    }
    assert_eq!(next, packets.len());
}

fn check_merge(segs: &[&[u8]], f: &TcpSeg, total: usize, psh: bool) {
    let h = f.header;
    // write_coalesced saves the first segment's headers in a 100-byte buffer.
    assert!(h <= 40 + 60);
    let infos: Vec<TcpSeg> = segs.iter().map(|s| TcpSeg::parse(s).unwrap()).collect();
    assert_eq!(total, infos.iter().map(|i| i.payload).sum::<usize>());
    assert!(infos.iter().all(|i| i.header == h));
    let mut first = segs[0].to_vec();
    let vh = coalesced_header(&mut first, f, total, psh);
    let mut merged = first;
    for s in &segs[1..] {
        // The iovec of a later segment starts after its headers.
        assert!(h < s.len());
        merged.extend_from_slice(&s[h..]);
    }
    assert_eq!(merged.len(), h + total);
    assert!(merged.len() - 40 <= 65535, "merged packet over 64 KiB");
    assert_eq!(
        usize::from(u16::from_be_bytes([merged[4], merged[5]])),
        merged.len() - 40,
        "merged IPv6 payload length"
    );
    let hdr = VnetHdr::parse(&vh);
    assert_eq!(
        (hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size),
        (F_NEEDS_CSUM, GSO_TCPV6, h as u16, f.payload as u16)
    );
    assert_eq!((hdr.csum_start, hdr.csum_offset), (40, 16));
    assert_eq!(vh.len(), VNET_HDR_LEN);
    // What the kernel does with the partial checksum.
    let mut completed = merged.clone();
    complete_csum(&mut completed, 40, 16).unwrap();
    assert!(upper_checksum_ok(&completed, 6), "merged checksum");
    // What a NIC (or the TX side) would cut it into again.
    let gso = Tcp6Gso::layout(&completed, &hdr).expect("the merged packet is refused by GSO");
    assert_eq!(gso.segments, segs.len(), "segment count");
    let mut out = vec![0u8; completed.len()];
    for (i, s) in segs.iter().enumerate() {
        let n = gso.write_segment(&completed, i, &mut out);
        let (a, b) = (&out[..n], *s);
        assert_eq!(n, b.len(), "segment {i} length");
        assert_eq!(a[..56], b[..56], "segment {i} headers");
        assert_eq!(a[60..], b[60..], "segment {i} options or payload");
    }
}
