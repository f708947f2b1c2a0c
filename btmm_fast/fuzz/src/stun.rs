//! The engine's STUN shape check (btmm_fast/src/stun.rs, RFC 8489 §5), which decides whether a
//! datagram on the tunnel's port goes to the control plane as STUN. The engine parses no
//! further (the STUN codec is Python's, fuzzed by `python3 -m fuzz stun`).
//!
//! Input: one datagram. Promises: no panic, and the answer is the RFC's rule written apart
//! here: top two bits zero, the magic cookie, a length field that is a multiple of 4 and exactly
//! what follows the 20-byte header.

use btmm_fast::stun::{looks_like_stun, HEADER_LEN, MAGIC_COOKIE};

fn reference(d: &[u8]) -> bool {
    let Some(header) = d.get(..HEADER_LEN) else {
        return false;
    };
    let length = (usize::from(header[2]) << 8) | usize::from(header[3]);
    header[0] < 0x40 && header[4..8] == MAGIC_COOKIE && length % 4 == 0 && d.len() == 20 + length
}

pub fn run(data: &[u8]) {
    assert_eq!(looks_like_stun(data), reference(data), "{data:02x?}");
}
