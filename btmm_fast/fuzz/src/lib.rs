//! Fuzz targets for the parts of the Rust core that take network input (or the kernel's):
//! the ESP open path of the RX thread, the anti-replay window, the TUN offloads (GSO
//! segmentation of a virtio-net TUN read, GRO coalescing of a receive batch) and the STUN shape
//! check. Each target is a function of any bytes that panics when the code under test panics
//! or breaks one of its promises (the assertions in each module); the afl.rs binaries in
//! `targets/` call them, and so do the plain `replay` binary and this crate's tests.

use std::path::PathBuf;

pub mod esp_open;
pub mod gro;
pub mod gso;
pub mod replay_window;
pub mod seeds;
pub mod stun;

/// A target: any bytes in, a panic when a promise is broken.
pub type Target = fn(&[u8]);

/// Every target: (name, function). The name is the afl binary's and the seed directory's.
pub const TARGETS: &[(&str, Target)] = &[
    ("esp_open", esp_open::run),
    ("replay_window", replay_window::run),
    ("gso", gso::run),
    ("gro", gro::run),
    ("stun", stun::run),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// The committed seed corpora: `seeds/<target>/<name>`.
pub fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

/// Reads fields off the front of a fuzz input; past the end every read gives zeros / empty.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
}

/// Ones' complement sum of `data` as big-endian 16-bit words (an odd last byte is the high
/// half of a word), folded to 16 bits; written here the slow, obvious way (RFC 1071) so the
/// targets do not check the crate's checksum code against itself.
pub fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut s: u64 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = u64::from(*pair.get(1).unwrap_or(&0));
            s += hi | lo;
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Whether the TCP/UDP checksum of an IPv6 packet without extension headers verifies: the
/// pseudo-header (RFC 8200 §8.1) plus the upper-layer bytes, checksum included, sum to zero.
pub fn upper_checksum_ok(pkt: &[u8], proto: u8) -> bool {
    let upper = &pkt[40..];
    let len = (upper.len() as u32).to_be_bytes();
    let s = ones_sum(&[&pkt[8..40], &len, &[0, 0, 0, proto], upper]);
    s == 0xffff || s == 0
}
