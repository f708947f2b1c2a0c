//! The RX thread's decision for a received UDP datagram (keepalive, control, STUN, ESP open with
//! its replay window, then the inner packet's checks), over a fixed table of two receive SAs
//! with fixed keys, so that a crash reproduces from its input alone.
//!
//! Input: records, each `ctl(1) len(2, big-endian) body(len)` (a short last body is taken as it
//! is). `ctl`:
//! - bits 0-1, what the body is: 0 the datagram itself; 1 `seq(8) inner` sealed by the crate's
//!   own `TxSa` (a valid trailer); 2 `seq(8) plaintext` sealed as it is with AES-256-GCM (any
//!   trailer, any length); 3 `seq(8) payload` behind an IPv6 header from the SA's peer, sealed
//!   by `TxSa`. Sealing is what lets the fuzzer get past the ICV to the trailer and inner
//!   checks without guessing a tag.
//! - bit 2: seal for SA B instead of A; bit 3: seal with the other SA's key (fails the ICV);
//! - bit 4: the datagram was truncated (MSG_TRUNC); bits 5-6: which of 4 source endpoints.
//!
//! Promises checked for every datagram: no panic; a drop before authentication moves no
//! window; a window moves only for an authenticated packet, to max(top, seq), and never
//! takes a sequence number twice or one older than the window; only the newest authenticated
//! packet moves the peer's endpoint; a delivered inner packet is IPv6 from the SA's peer and is
//! the packet that was sealed; control and STUN go to the control plane only within their
//! bounds.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;

use btmm_fast::endpoint::{self, Endpoint};
use btmm_fast::engine::fuzzing::{Decision, RxTable};
use btmm_fast::engine::{Inner, MAX_CONTROL_MESSAGE};
use btmm_fast::esp::{self, DropReason, TxSa, CONTROL_MARKER, KEEPALIVE};
use btmm_fast::replay::{infer_seq, WINDOW};
use btmm_fast::stun::looks_like_stun;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::Reader;

pub const SPI_A: u32 = 0x0000_4242;
pub const SPI_B: u32 = 0x0bad_cafe;
/// Keying material (32-byte AES key + 4-byte salt) of SA A and SA B.
pub const KEY_A: [u8; 36] = keymat(3);
pub const KEY_B: [u8; 36] = keymat(101);
/// The peers' inner addresses: fd00::2 (SA A) and fd00::3 (SA B); the local one is fd00::1.
pub const PEER_A: Inner = inner(2);
pub const PEER_B: Inner = inner(3);
pub const LOCAL: Inner = inner(1);

const fn keymat(seed: u8) -> [u8; 36] {
    let mut k = [0u8; 36];
    let mut i = 0;
    while i < 36 {
        k[i] = (i as u8).wrapping_mul(7).wrapping_add(seed);
        i += 1;
    }
    k
}

const fn inner(last: u8) -> Inner {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = last;
    a
}

pub const MODE_RAW: u8 = 0;
pub const MODE_SEAL: u8 = 1;
pub const MODE_SEAL_PLAIN: u8 = 2;
pub const MODE_SEAL_IPV6: u8 = 3;
pub const FOR_B: u8 = 4;
pub const WRONG_KEY: u8 = 8;
pub const TRUNCATED: u8 = 16;

/// The four source endpoints (bits 5-6 of `ctl`): two IPv4 (v4-mapped), two IPv6.
pub fn source(ctl: u8) -> Endpoint {
    match (ctl >> 5) & 3 {
        0 => endpoint::from_ip([192, 0, 2, 1].into(), 4500),
        1 => endpoint::from_ip([192, 0, 2, 1].into(), 4501),
        2 => endpoint::from_ip("2001:db8::7".parse::<Ipv6Addr>().unwrap().into(), 4500),
        _ => endpoint::from_ip([198, 51, 100, 9].into(), 61000),
    }
}

/// An IPv6 header (next header 59, "no next header") from `src` to fd00::1, then `payload`.
pub fn ipv6_packet(src: &Inner, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[59, 64]);
    p.extend_from_slice(src);
    p.extend_from_slice(&LOCAL);
    p.extend_from_slice(payload);
    p
}

/// ESP with a plaintext taken as it is (RFC 4303 / RFC 4106: nonce salt|seq, AAD
/// SPI|seq_hi|seq_lo), built with ring directly, not with the crate.
pub fn seal_plain(spi: u32, keymat: &[u8], seq: u64, plain: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &keymat[..32]).unwrap());
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&keymat[32..36]);
    nonce[4..].copy_from_slice(&seq.to_be_bytes());
    let mut aad = [0u8; 12];
    aad[..4].copy_from_slice(&spi.to_be_bytes());
    aad[4..].copy_from_slice(&seq.to_be_bytes());
    let mut body = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut body,
    )
    .unwrap();
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&spi.to_be_bytes());
    out.extend_from_slice(&(seq as u32).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// One record as bytes (what the seeds are made of).
pub fn record(ctl: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![ctl];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// A datagram the target built, and what it expects if it authenticates.
struct Built {
    datagram: Vec<u8>,
    /// (SPI, seq, the inner packet when the trailer is a valid one) of a packet sealed with
    /// the right key.
    sealed: Option<(u32, u64, Option<Vec<u8>>)>,
}

fn build(ctl: u8, body: &[u8]) -> Built {
    let mode = ctl & 3;
    if mode == MODE_RAW {
        return Built {
            datagram: body.to_vec(),
            sealed: None,
        };
    }
    let (spi, key, other, peer) = if ctl & FOR_B != 0 {
        (SPI_B, &KEY_B, &KEY_A, &PEER_B)
    } else {
        (SPI_A, &KEY_A, &KEY_B, &PEER_A)
    };
    let wrong = ctl & WRONG_KEY != 0;
    let km: &[u8] = if wrong { other } else { key };
    let mut r = Reader::new(body);
    let seq = r.u64();
    let rest = r.rest();
    let (datagram, seq, inner) = match mode {
        MODE_SEAL_PLAIN => (seal_plain(spi, km, seq, rest), seq, None),
        _ => {
            let inner = if mode == MODE_SEAL_IPV6 {
                ipv6_packet(peer, rest)
            } else {
                rest.to_vec()
            };
            // TxSa sends 1..2^64-1; seq 0 is sealed as 1 (seq 0 itself: mode 2).
            let seq = seq.max(1);
            let tx = TxSa::new(spi, km, u128::from(seq)).unwrap();
            (tx.seal(&inner).unwrap(), seq, Some(inner))
        }
    };
    Built {
        datagram,
        sealed: (!wrong).then_some((spi, seq, inner)),
    }
}

/// The state the target keeps beside the table: every sequence number each SA accepted.
struct Model {
    accepted: [BTreeSet<u64>; 2],
}

fn slot(spi: u32) -> Option<usize> {
    match spi {
        SPI_A => Some(0),
        SPI_B => Some(1),
        _ => None,
    }
}

fn peer_of(spi: u32) -> Inner {
    if spi == SPI_A {
        PEER_A
    } else {
        PEER_B
    }
}

pub fn run(data: &[u8]) {
    run_with(data, &mut |_| {});
}

/// `run`, telling `seen` every decision (the tests check that the seeds reach them all).
pub fn run_with(data: &[u8], seen: &mut dyn FnMut(&Decision)) {
    let mut table = RxTable::new(&[(SPI_A, PEER_A, &KEY_A), (SPI_B, PEER_B, &KEY_B)]).unwrap();
    let mut model = Model {
        accepted: [BTreeSet::new(), BTreeSet::new()],
    };
    let mut r = Reader::new(data);
    while !r.is_empty() {
        let ctl = r.u8();
        let len = usize::from(r.u16());
        let built = build(ctl, r.bytes(len));
        seen(&check_one(&mut table, &mut model, ctl, &built));
    }
}

fn check_one(table: &mut RxTable, model: &mut Model, ctl: u8, built: &Built) -> Decision {
    let d = &built.datagram;
    let src = source(ctl);
    let truncated = ctl & TRUNCATED != 0;
    let tops = [table.top(SPI_A).unwrap(), table.top(SPI_B).unwrap()];
    let endpoints = [table.endpoint(SPI_A), table.endpoint(SPI_B)];
    let mut buf = d.clone();
    let decision = table.classify(&mut buf, src, truncated);
    let spi = esp::payload_spi(d).unwrap_or(0);
    let ours = slot(spi);
    let after = [table.top(SPI_A).unwrap(), table.top(SPI_B).unwrap()];
    // The SA the datagram names is the only one that can move, and only once authenticated.
    let authenticated = match &decision {
        Decision::Keepalive => {
            assert!(d[..] == KEEPALIVE, "keepalive {d:?}");
            false
        }
        Decision::Control(range) => {
            assert!(!truncated && d.starts_with(&CONTROL_MARKER));
            assert_eq!(*range, CONTROL_MARKER.len()..d.len());
            assert!(range.len() <= MAX_CONTROL_MESSAGE);
            false
        }
        Decision::Stun => {
            assert!(!truncated && ours.is_none() && looks_like_stun(d));
            assert!(d.len() <= MAX_CONTROL_MESSAGE);
            false
        }
        Decision::Drop { reason, peer: None } => {
            if *reason == DropReason::UnknownSpi {
                assert!(ours.is_none());
            }
            false
        }
        Decision::Drop {
            reason,
            peer: Some(p),
        } => {
            assert!(!truncated);
            assert_eq!(*p, peer_of(spi));
            match reason {
                DropReason::Replay | DropReason::Auth => false,
                DropReason::Malformed | DropReason::SourceMismatch => true,
                other => panic!("{other:?} blamed on a peer"),
            }
        }
        Decision::Deliver { inner, peer, .. } => {
            assert!(!truncated);
            assert_eq!(*peer, peer_of(spi));
            let pkt = &buf[inner.clone()];
            assert!(
                pkt.len() >= 40 && pkt[0] >> 4 == 6,
                "delivered a non-IPv6 packet"
            );
            assert_eq!(
                pkt[8..24],
                peer[..],
                "delivered a packet from another source"
            );
            true
        }
    };
    if !authenticated {
        assert_eq!(
            after, tops,
            "a window moved for an unauthenticated datagram"
        );
        assert_eq!([table.endpoint(SPI_A), table.endpoint(SPI_B)], endpoints);
        return decision;
    }
    let i = ours.expect("authenticated under an SPI that is not in the table");
    let lo = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    let seq = infer_seq(tops[i], lo).expect("authenticated a sequence number it cannot infer");
    assert!(seq != 0, "accepted sequence number 0");
    assert!(
        seq > tops[i] || tops[i] - seq < WINDOW,
        "accepted {seq} below the window (top {})",
        tops[i]
    );
    assert!(model.accepted[i].insert(seq), "accepted {seq} twice");
    assert_eq!(after[i], tops[i].max(seq));
    assert_eq!(after[1 - i], tops[1 - i], "the other SA's window moved");
    if let Some((s_spi, s_seq, ref inner)) = built.sealed {
        assert_eq!(
            (s_spi, s_seq),
            (spi, seq),
            "authenticated as another packet"
        );
        if let (Decision::Deliver { inner: range, .. }, Some(inner)) = (&decision, inner) {
            assert_eq!(&buf[range.clone()], &inner[..], "delivered other bytes");
        }
    }
    let advanced = seq > tops[i];
    let now = table.endpoint(spi);
    match &decision {
        Decision::Deliver {
            roam: Some((old, new)),
            ..
        } => {
            assert!(advanced, "an older packet moved the endpoint");
            assert_eq!((*old, *new), (endpoints[i], src));
            assert_ne!(*old, Some(src));
            assert_eq!(now, Some(src));
        }
        Decision::Deliver { roam: None, .. } => {
            assert!(
                !advanced || endpoints[i] == Some(src),
                "the newest packet did not roam"
            );
            assert_eq!(now, endpoints[i]);
        }
        _ => assert_eq!(now, endpoints[i], "a dropped packet moved the endpoint"),
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_packet_is_delivered_once() {
        let body = [&5u64.to_be_bytes()[..], b"hello"].concat();
        let input = [record(MODE_SEAL_IPV6, &body), record(MODE_SEAL_IPV6, &body)].concat();
        let mut table = RxTable::new(&[(SPI_A, PEER_A, &KEY_A), (SPI_B, PEER_B, &KEY_B)]).unwrap();
        let built = build(MODE_SEAL_IPV6, &body);
        let mut buf = built.datagram.clone();
        assert!(matches!(
            table.classify(&mut buf, source(0), false),
            Decision::Deliver { .. }
        ));
        let mut buf = built.datagram.clone();
        assert_eq!(
            table.classify(&mut buf, source(0), false),
            Decision::Drop {
                reason: DropReason::Replay,
                peer: Some(PEER_A)
            }
        );
        run(&input);
    }

    #[test]
    fn the_seeds_reach_every_decision() {
        let mut kinds = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(crate::seed_dir().join("esp_open")).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            run_with(&data, &mut |d| {
                kinds.insert(match d {
                    Decision::Keepalive => "keepalive".to_string(),
                    Decision::Control(_) => "control".to_string(),
                    Decision::Stun => "stun".to_string(),
                    Decision::Drop { reason, peer } => {
                        format!("drop {} {}", reason.name(), peer.is_some())
                    }
                    Decision::Deliver { roam, .. } => format!("deliver {}", roam.is_some()),
                });
            });
        }
        let want = [
            "keepalive",
            "control",
            "stun",
            "deliver true",
            "deliver false",
            "drop replay true",
            "drop auth true",
            "drop malformed true",
            "drop malformed false",
            "drop source_mismatch true",
            "drop unknown_spi false",
        ];
        for w in want {
            assert!(kinds.contains(w), "no seed reaches {w}: {kinds:?}");
        }
    }

    #[test]
    fn the_checks_can_fail() {
        // A model that already holds the sequence number: the target must call it a second
        // acceptance.
        let body = [&5u64.to_be_bytes()[..], b"hello"].concat();
        let mut table = RxTable::new(&[(SPI_A, PEER_A, &KEY_A), (SPI_B, PEER_B, &KEY_B)]).unwrap();
        let mut model = Model {
            accepted: [BTreeSet::from([5]), BTreeSet::new()],
        };
        let built = build(MODE_SEAL_IPV6, &body);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_one(&mut table, &mut model, MODE_SEAL_IPV6, &built)
        }));
        assert!(r.is_err());
    }
}
