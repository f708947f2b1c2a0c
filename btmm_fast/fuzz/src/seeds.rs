//! The seed corpora, made with the crate's own encoders and the targets' fixed keys:
//! `cargo run --bin make_seeds` writes them to `seeds/` (after a format change), and a test
//! checks that the committed ones are what this makes today.

use std::fs;
use std::io;
use std::path::Path;

use btmm_fast::esp::{CONTROL_MARKER, KEEPALIVE};
use btmm_fast::offload::{Tcp6Gso, VnetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV6};
use btmm_fast::stun::MAGIC_COOKIE;

use crate::esp_open::{self, ipv6_packet, PEER_A, PEER_B};
use crate::replay_window as rw;
use crate::{gro, gso};

/// (target, file name, bytes) of every seed.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_string(), bytes));
    };
    for (name, bytes) in esp() {
        add("esp_open", name, bytes);
    }
    for (name, bytes) in replay() {
        add("replay_window", name, bytes);
    }
    for (name, bytes) in gso_reads() {
        add("gso", name, bytes);
    }
    for (name, bytes) in gro_batches() {
        add("gro", name, bytes);
    }
    for (name, bytes) in stun() {
        add("stun", name, bytes);
    }
    out
}

/// Writes every seed under `dir/<target>/`.
pub fn write(dir: &Path) -> io::Result<()> {
    for (target, name, bytes) in all() {
        let d = dir.join(target);
        fs::create_dir_all(&d)?;
        fs::write(d.join(name), bytes)?;
    }
    Ok(())
}

fn seq_body(seq: u64, rest: &[u8]) -> Vec<u8> {
    [&seq.to_be_bytes()[..], rest].concat()
}

fn stun_binding(attrs: usize) -> Vec<u8> {
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&[0x5a; 12]);
    m.extend(std::iter::repeat_n(0u8, attrs));
    m
}

fn esp() -> Vec<(&'static str, Vec<u8>)> {
    use esp_open::*;
    // A real sealed datagram as raw bytes (what a peer sends), then the same again (a replay).
    let tx = btmm_fast::esp::TxSa::new(SPI_A, &KEY_A, 7).unwrap();
    let sealed = tx.seal(&ipv6_packet(&PEER_A, b"ping")).unwrap();
    let from_b = seal_plain(
        SPI_B,
        &KEY_B,
        1,
        &[ipv6_packet(&PEER_B, b"xy"), vec![2, 41]].concat(),
    );
    vec![
        (
            "sealed_then_replayed",
            [record(MODE_RAW, &sealed), record(MODE_RAW, &sealed)].concat(),
        ),
        (
            "ipv6_in_order_and_roaming",
            [
                record(MODE_SEAL_IPV6, &seq_body(1, b"one")),
                record(MODE_SEAL_IPV6 | (1 << 5), &seq_body(2, b"two")),
                record(MODE_SEAL_IPV6, &seq_body(2, b"two")),
                record(MODE_SEAL_IPV6 | (2 << 5), &seq_body(5000, b"far")),
                record(MODE_SEAL_IPV6, &seq_body(4999, b"older")),
                record(MODE_SEAL_IPV6, &seq_body(3, b"too old")),
            ]
            .concat(),
        ),
        (
            "other_sa_wrong_key_and_source",
            [
                record(MODE_SEAL_IPV6 | FOR_B, &seq_body(9, b"b")),
                record(MODE_SEAL_IPV6 | WRONG_KEY, &seq_body(9, b"a")),
                record(MODE_SEAL, &seq_body(10, &ipv6_packet(&PEER_B, b"spoof"))),
                record(MODE_SEAL, &seq_body(11, b"not ipv6")),
                record(MODE_RAW, &from_b),
            ]
            .concat(),
        ),
        (
            "bad_trailers",
            [
                record(MODE_SEAL_PLAIN, &seq_body(1, &[1, 2, 2, 41])),
                record(MODE_SEAL_PLAIN, &seq_body(2, &[1, 2, 2, 4])),
                record(MODE_SEAL_PLAIN, &seq_body(3, &[7, 41, 250, 41])),
                record(MODE_SEAL_PLAIN, &seq_body(0, &[0, 0, 0, 41])),
                record(MODE_SEAL_PLAIN, &seq_body(4, &[1, 2, 3])),
            ]
            .concat(),
        ),
        (
            "not_esp",
            [
                record(MODE_RAW, &KEEPALIVE),
                record(MODE_RAW | TRUNCATED, &KEEPALIVE),
                record(MODE_RAW, &[&CONTROL_MARKER[..], b"handshake"].concat()),
                record(MODE_RAW, &stun_binding(8)),
                record(MODE_RAW | TRUNCATED, &sealed),
                record(MODE_RAW, &sealed[..20]),
                record(
                    MODE_RAW,
                    &[&[0x13, 0x37, 0x13, 0x37][..], &[0; 32]].concat(),
                ),
            ]
            .concat(),
        ),
    ]
}

fn op(code: u8, arg: &[u8]) -> Vec<u8> {
    [&[code][..], arg].concat()
}

fn replay() -> Vec<(&'static str, Vec<u8>)> {
    use rw::*;
    let mut in_order = Vec::new();
    for _ in 0..40 {
        in_order.extend(op(OP_AHEAD, &1u16.to_be_bytes()));
    }
    for d in [0u16, 1, 5, 39, 40] {
        in_order.extend(op(OP_BEHIND, &d.to_be_bytes()));
    }
    vec![
        ("in_order_then_replayed", in_order),
        (
            "window_edges",
            [
                op(OP_ABSOLUTE, &10_000u64.to_be_bytes()),
                op(OP_EDGE, &0i16.to_be_bytes()),
                op(OP_EDGE, &1i16.to_be_bytes()),
                op(OP_EDGE, &1i16.to_be_bytes()),
                op(OP_EDGE, &(-1i16).to_be_bytes()),
                op(OP_AGAIN, &[]),
                op(OP_RING, &[1, 0]),
                op(OP_BEHIND, &4095u16.to_be_bytes()),
                op(OP_AHEAD | CHECK_ONLY, &7u16.to_be_bytes()),
                op(OP_ABSOLUTE, &0u64.to_be_bytes()),
            ]
            .concat(),
        ),
        (
            "esn_epochs",
            [
                op(OP_ABSOLUTE, &((1u64 << 32) - 50).to_be_bytes()),
                op(OP_INFER, &5u32.to_be_bytes()),
                op(OP_INFER, &0xffff_fff0u32.to_be_bytes()),
                op(OP_INFER, &0x8000_0000u32.to_be_bytes()),
                op(OP_JUMP, &0xffff_ffffu32.to_be_bytes()),
                op(OP_ABSOLUTE, &(u64::MAX - 10).to_be_bytes()),
                op(OP_INFER, &1u32.to_be_bytes()),
                op(OP_INFER, &0xffff_fffeu32.to_be_bytes()),
                op(OP_AHEAD, &100u16.to_be_bytes()),
            ]
            .concat(),
        ),
    ]
}

/// A TCP/IPv6 segment fd00::1:40000 -> fd00::2:5201 with `flags` and `options` bytes of
/// options (NOPs), a bogus checksum (the kernel leaves a partial one).
pub fn tcp6(seq: u32, flags: u8, options: usize, payload: &[u8]) -> Vec<u8> {
    let th = 20 + options;
    let mut seg = 40000u16.to_be_bytes().to_vec();
    seg.extend_from_slice(&5201u16.to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&77u32.to_be_bytes());
    seg.push(((th / 4) as u8) << 4);
    seg.push(flags);
    seg.extend_from_slice(&[0xff, 0xff, 0xaa, 0xbb, 0, 0]);
    seg.extend(std::iter::repeat_n(1u8, options));
    seg.extend_from_slice(payload);
    let mut p = ipv6_packet(&PEER_A, &seg);
    p[6] = 6;
    p[24..40].copy_from_slice(&PEER_B);
    p
}

fn gso_reads() -> Vec<(&'static str, Vec<u8>)> {
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
    let tso = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6,
        hdr_len: 72,
        gso_size: 200,
        csum_start: 40,
        csum_offset: 16,
    };
    let sup = tcp6(0xffff_ff80, 0x18 | 0x80 | 0x01, 12, &payload);
    let mut udp = ipv6_packet(
        &PEER_A,
        &[
            0x30, 0x39, 0x11, 0x51, 0, 13, 0, 0, b'd', b'a', b't', b'a', b'!',
        ],
    );
    udp[6] = 17;
    let csum = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 40,
        csum_offset: 6,
    };
    vec![
        (
            "tso_super_packet",
            [&gso::vnet_header(&tso)[..], &sup].concat(),
        ),
        (
            "tso_mss_1",
            [
                &gso::vnet_header(&VnetHdr { gso_size: 1, ..tso })[..],
                &tcp6(1, 0x10, 0, b"abc"),
            ]
            .concat(),
        ),
        (
            "udp_partial_checksum",
            [&gso::vnet_header(&csum)[..], &udp].concat(),
        ),
        (
            "plain_read",
            [&[0u8; 10][..], &tcp6(5, 0x10, 0, b"hi")].concat(),
        ),
    ]
}

fn gro_batches() -> Vec<(&'static str, Vec<u8>)> {
    // One flow cut by the TX side's own segmentation, then other packets around it.
    let payload: Vec<u8> = (0..500u32).map(|i| (i % 253) as u8).collect();
    let sup = tcp6(0xffff_ff00, 0x18, 12, &payload);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6,
        hdr_len: 0,
        gso_size: 120,
        csum_start: 40,
        csum_offset: 16,
    };
    let g = Tcp6Gso::layout(&sup, &hdr).unwrap();
    let segs: Vec<Vec<u8>> = (0..g.segments)
        .map(|i| {
            let mut out = vec![0u8; 1000];
            let n = g.write_segment(&sup, i, &mut out);
            out.truncate(n);
            out
        })
        .collect();
    let other = ipv6_packet(&PEER_B, b"not tcp");
    let mut mixed = vec![other.clone()];
    mixed.extend_from_slice(&segs[..2]);
    mixed.push(tcp6(9, 0x10, 0, b"other flow"));
    mixed.extend_from_slice(&segs[2..]);
    mixed.push(other);
    vec![
        ("one_flow", gro::batch(&segs)),
        ("interleaved", gro::batch(&mixed)),
    ]
}

fn stun() -> Vec<(&'static str, Vec<u8>)> {
    let mut success = stun_binding(12);
    success[0..2].copy_from_slice(&[0x01, 0x01]);
    vec![
        ("binding_request", stun_binding(0)),
        ("binding_success", success),
    ]
}
