//! Anti-replay window for ESP with extended sequence numbers (RFC 4303 §3.4.3 and Appendix A).
//!
//! The bitmap follows RFC 6479: a ring of 64-bit blocks indexed by `seq >> 6`, so that sliding
//! the window clears whole blocks instead of shifting bits. The ring has more bits than the
//! window (4096) because a window that does not start on a block boundary touches 65 blocks; the
//! acceptance rule is nevertheless exactly `top - seq < WINDOW`, not "whatever the ring covers".

/// Sequence numbers tracked behind (and including) the highest one accepted.
pub const WINDOW: u64 = 4096;
/// Power of two >= 65, the number of blocks a 4096-bit window can straddle.
const BLOCKS: usize = 128;
const BLOCK_MASK: u64 = BLOCKS as u64 - 1;

/// Why the window refused a sequence number before any decryption was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay;

/// Recovers the 64-bit sequence number from its low 32 bits, given the highest accepted one
/// (RFC 4303 Appendix A.2, with W = 4096). `Err` when the high half would overflow 32 bits.
// The RFC writes `Seql >= Tl - W + 1`; here it is `tl + 1 - WINDOW`, the same value, ordered so
// that it cannot underflow when `tl == WINDOW - 1`.
pub fn infer_seq(top: u64, seq_lo: u32) -> Result<u64, Replay> {
    let th = top >> 32;
    let tl = top & 0xffff_ffff;
    let lo = u64::from(seq_lo);
    let hi = if tl >= WINDOW - 1 {
        if lo >= tl + 1 - WINDOW {
            th
        } else {
            th + 1
        }
    } else if th > 0 && lo >= (tl.wrapping_sub(WINDOW - 1) & 0xffff_ffff) {
        th - 1
    } else {
        th
    };
    if hi > 0xffff_ffff {
        return Err(Replay);
    }
    Ok(hi << 32 | lo)
}

/// The receive-side window of one SA.
#[derive(Clone)]
pub struct ReplayWindow {
    top: u64,
    bits: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow {
            top: 0,
            bits: [0; BLOCKS],
        }
    }

    /// Highest sequence number accepted so far (0 before the first packet).
    pub fn top(&self) -> u64 {
        self.top
    }

    fn seen(&self, seq: u64) -> bool {
        let block = ((seq >> 6) & BLOCK_MASK) as usize;
        self.bits[block] & (1u64 << (seq & 63)) != 0
    }

    /// The pre-check done before decryption; it changes nothing, so a forged packet cannot move
    /// the window.
    pub fn check(&self, seq: u64) -> Result<(), Replay> {
        if seq == 0 {
            return Err(Replay);
        }
        if seq <= self.top && (self.top - seq >= WINDOW || self.seen(seq)) {
            return Err(Replay);
        }
        Ok(())
    }

    /// Records an authenticated sequence number (already passed `check`). Returns true when it
    /// became the new highest one, which is what decides roaming.
    pub fn update(&mut self, seq: u64) -> bool {
        let advanced = seq > self.top;
        if advanced {
            let old_block = self.top >> 6;
            let new_block = seq >> 6;
            // Blocks entered by the slide hold bits of sequence numbers BLOCKS*64 older; clear
            // them. Clearing more than the whole ring would only repeat work.
            let steps = (new_block - old_block).min(BLOCKS as u64);
            for i in 1..=steps {
                self.bits[((old_block + i) & BLOCK_MASK) as usize] = 0;
            }
            self.top = seq;
        }
        let block = ((seq >> 6) & BLOCK_MASK) as usize;
        self.bits[block] |= 1u64 << (seq & 63);
        advanced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A reference model: the exact acceptance rule over a set of every accepted number.
    struct Model {
        top: u64,
        seen: HashSet<u64>,
    }

    impl Model {
        fn accept(&mut self, seq: u64) -> bool {
            if seq == 0
                || (seq <= self.top && (self.top - seq >= WINDOW || self.seen.contains(&seq)))
            {
                return false;
            }
            self.seen.insert(seq);
            self.top = self.top.max(seq);
            true
        }
    }

    fn accept(w: &mut ReplayWindow, seq: u64) -> bool {
        if w.check(seq).is_err() {
            return false;
        }
        w.update(seq);
        true
    }

    /// xorshift64*: deterministic, no crate needed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn zero_is_never_accepted() {
        let mut w = ReplayWindow::new();
        assert!(!accept(&mut w, 0));
        assert!(accept(&mut w, 1));
        assert!(!accept(&mut w, 0));
    }

    #[test]
    fn in_order_then_replayed() {
        let mut w = ReplayWindow::new();
        for s in 1..=10_000 {
            assert!(accept(&mut w, s));
        }
        for s in (1..=10_000).rev() {
            assert!(!accept(&mut w, s), "{s} accepted twice");
        }
    }

    #[test]
    fn reversed_inside_window_accepted_once() {
        let mut w = ReplayWindow::new();
        for s in (1..=WINDOW).rev() {
            assert!(accept(&mut w, s));
        }
        for s in 1..=WINDOW {
            assert!(!accept(&mut w, s));
        }
    }

    #[test]
    fn window_edge_is_exact() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 10_000));
        // top - seq == W - 1 is the oldest still tracked; == W is too old.
        assert!(!accept(&mut w, 10_000 - WINDOW));
        assert!(accept(&mut w, 10_000 - WINDOW + 1));
        assert!(!accept(&mut w, 10_000 - WINDOW + 1));
        // Aligned and unaligned tops both keep exactly W numbers.
        for top in [64 * 200, 64 * 200 + 1, 64 * 200 + 63] {
            let mut w = ReplayWindow::new();
            assert!(accept(&mut w, top));
            assert!(!accept(&mut w, top - WINDOW));
            for s in top - WINDOW + 1..top {
                assert!(accept(&mut w, s), "top {top} seq {s}");
            }
        }
    }

    #[test]
    fn shuffled_inside_window() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let base = 1_000_000u64;
        let mut seqs: Vec<u64> = (base..base + WINDOW).collect();
        for i in (1..seqs.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            seqs.swap(i, j);
        }
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, base + WINDOW - 1));
        for &s in &seqs {
            assert_eq!(accept(&mut w, s), s != base + WINDOW - 1);
        }
        for &s in &seqs {
            assert!(!accept(&mut w, s));
        }
    }

    #[test]
    fn big_jump_clears_stale_bits() {
        let mut w = ReplayWindow::new();
        for s in 1..=200 {
            assert!(accept(&mut w, s));
        }
        // A jump of exactly the ring size maps old numbers onto the same bits.
        let jump = 200 + (BLOCKS as u64) * 64;
        assert!(accept(&mut w, jump));
        for s in jump - WINDOW + 1..jump {
            assert!(accept(&mut w, s), "{s} wrongly looked seen");
        }
    }

    #[test]
    fn model_based_random_ops() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x1234_5678_9abc_def1) | 1);
            let mut w = ReplayWindow::new();
            let mut m = Model {
                top: 0,
                seen: HashSet::new(),
            };
            for _ in 0..20_000 {
                let r = rng.next();
                let seq = match r % 6 {
                    // Mostly near the top, sometimes behind, sometimes far ahead.
                    0 => m.top + 1 + (r >> 8) % 3,
                    1 => m.top.saturating_sub((r >> 8) % (WINDOW + 100)),
                    2 => m.top.saturating_sub((r >> 8) % 64),
                    3 => m.top + (r >> 8) % (3 * WINDOW),
                    4 => m.top.saturating_sub(WINDOW - 2 + (r >> 8) % 4),
                    _ => m.top + (r >> 8) % 200,
                };
                assert_eq!(accept(&mut w, seq), m.accept(seq), "seed {seed} seq {seq}");
                assert_eq!(w.top(), m.top);
            }
        }
    }

    fn reference_infer(top: u64, lo: u32) -> Option<u64> {
        // Written independently from the RFC's prose: pick the candidate high half (th-1, th,
        // th+1) that puts the number in [top - W + 1, top - W + 1 + 2^32).
        let lo = u64::from(lo);
        let th = top >> 32;
        let tl = top & 0xffff_ffff;
        let hi = if tl >= WINDOW - 1 {
            if lo >= tl - (WINDOW - 1) {
                th
            } else {
                th + 1
            }
        } else if lo >= (tl + (1 << 32) - (WINDOW - 1)) && th > 0 {
            th - 1
        } else {
            th
        };
        (hi <= 0xffff_ffff).then_some(hi << 32 | lo)
    }

    #[test]
    fn esn_inference_across_boundary() {
        let b = 1u64 << 32;
        // Top just below the boundary: small low halves belong to the next epoch.
        assert_eq!(infer_seq(b - 1, 0), Ok(b));
        assert_eq!(infer_seq(b - 1, 5), Ok(b + 5));
        assert_eq!(infer_seq(b - 1, 0xffff_fff0), Ok(b - 16));
        // Top just above: large low halves inside the window belong to the previous epoch.
        assert_eq!(infer_seq(b + 10, 0xffff_ff00), Ok(b - 256));
        assert_eq!(infer_seq(b + 10, 20), Ok(b + 20));
        // Outside the window on the far side: the current epoch.
        assert_eq!(infer_seq(b + 10, 0x8000_0000), Ok(b + 0x8000_0000));
        // Top in epoch 0 near 0: no previous epoch.
        assert_eq!(infer_seq(3, 0xffff_ffff), Ok(0xffff_ffff));
        // The last epoch cannot roll over.
        assert_eq!(infer_seq(u64::MAX - 10, 1), Err(Replay));
        assert_eq!(infer_seq(u64::MAX - 10, 0xffff_fff8), Ok(u64::MAX - 7));
        let mut rng = Rng(77);
        for _ in 0..100_000 {
            let top = match rng.next() % 3 {
                0 => rng.next(),
                1 => (rng.next() % 8) << 32 | (rng.next() % (2 * WINDOW)),
                _ => ((rng.next() % 8) << 32).wrapping_sub(rng.next() % (2 * WINDOW)),
            };
            let lo = rng.next() as u32;
            assert_eq!(
                infer_seq(top, lo).ok(),
                reference_infer(top, lo),
                "top {top:#x} lo {lo:#x}"
            );
        }
    }

    #[test]
    fn window_across_epoch_boundary() {
        let b = 1u64 << 32;
        let mut w = ReplayWindow::new();
        for s in b - 100..b + 100 {
            let seq = infer_seq(w.top().max(b - 101), s as u32).unwrap();
            assert_eq!(seq, s);
            assert!(accept(&mut w, seq));
        }
        for s in b - 100..b + 100 {
            let seq = infer_seq(w.top(), s as u32).unwrap();
            assert_eq!(seq, s);
            assert!(!accept(&mut w, seq));
        }
    }
}
