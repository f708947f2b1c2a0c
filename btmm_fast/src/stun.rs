//! Telling a STUN message (RFC 8489 §5) apart from ESP and control messages on the engine's
//! UDP port, so the daemon can run STUN from the tunnel's own socket and learn the
//! server-reflexive address of that port. The twin of `looks_like_stun` in
//! btmm_core/dataplane/api.py. The engine only recognises the shape; the STUN codec and its
//! checks (transaction ID, FINGERPRINT) are Python's.

/// The magic cookie every RFC 8489 message carries at bytes 4..8.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Message type (2), message length (2), magic cookie (4), transaction ID (12).
pub const HEADER_LEN: usize = 20;

/// True when `datagram` has the shape of one whole STUN message (RFC 8489 §5): the top two
/// bits of byte 0 zero, the magic cookie at bytes 4..8, and a length field (bytes 2..4, which
/// excludes the header) that is a multiple of 4 and exactly the rest of the datagram.
pub fn looks_like_stun(datagram: &[u8]) -> bool {
    if datagram.len() < HEADER_LEN || datagram[0] & 0xc0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return false;
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    length.is_multiple_of(4) && length == datagram.len() - HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Binding request (type 0x0001) with `attrs` bytes of attributes after the header.
    fn binding(attrs: usize) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend(std::iter::repeat_n(0u8, attrs));
        m
    }

    #[test]
    fn binding_messages_are_stun() {
        assert!(looks_like_stun(&binding(0)));
        assert!(looks_like_stun(&binding(8)));
        let mut success = binding(12);
        success[0..2].copy_from_slice(&[0x01, 0x01]);
        assert!(looks_like_stun(&success));
    }

    #[test]
    fn every_rule_refuses_something() {
        assert!(!looks_like_stun(&[]));
        assert!(!looks_like_stun(&binding(0)[..19]));
        for top in [0x40, 0x80, 0xc0] {
            let mut m = binding(4);
            m[0] |= top;
            assert!(!looks_like_stun(&m), "{top:#x}");
        }
        let mut m = binding(4);
        m[7] ^= 1;
        assert!(!looks_like_stun(&m), "cookie");
        // The length field must say exactly what follows the header, in whole words.
        let mut m = binding(4);
        m.push(0);
        assert!(!looks_like_stun(&m), "one byte more than the length says");
        let mut m = binding(6);
        m[3] = 6;
        assert!(!looks_like_stun(&m), "length not a multiple of 4");
        // RFC 5389's predecessor (RFC 3489) had no cookie: not recognised.
        let mut m = binding(0);
        m[4..8].copy_from_slice(&[0; 4]);
        assert!(!looks_like_stun(&m));
    }
}
