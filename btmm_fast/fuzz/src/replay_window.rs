//! The anti-replay window (btmm_fast/src/replay.rs) against a model that keeps every accepted
//! number: the exact acceptance rule of RFC 4303 §3.4.3 with a 4096-number window.
//!
//! Input: operations, each `op(1)` and an argument whose size `op & 7` picks, giving the
//! sequence number relative to the current top so that the fuzzer reaches the window's edges:
//! 0 `u64` absolute; 1 top + `u16`; 2 top - `u16`; 3 top - WINDOW + `i16`; 4 the low half
//! `u32` through `infer_seq` (the engine's path, RFC 4303 Appendix A); 5 top + `u32`; 6 top +
//! `u8` ring sizes (128 blocks of 64) + `i8`; 7 the last number accepted again. `op & 8`: only
//! the pre-check (a packet whose ICV then fails), which must change nothing.
//!
//! Promises: no panic; `check` then `update` accepts exactly what the model accepts (never a
//! number twice, never 0, never one `WINDOW` or more below the top); `update` reports an
//! advance exactly when the number is above the top; `infer_seq` keeps the low half and lands
//! in the window's 2^32 span or refuses only in the last epoch.

use std::collections::BTreeSet;

use btmm_fast::replay::{infer_seq, ReplayWindow, WINDOW};

use crate::Reader;

/// The ring the window keeps: 128 blocks of 64 bits (replay.rs).
const RING: u64 = 128 * 64;

pub const OP_ABSOLUTE: u8 = 0;
pub const OP_AHEAD: u8 = 1;
pub const OP_BEHIND: u8 = 2;
pub const OP_EDGE: u8 = 3;
pub const OP_INFER: u8 = 4;
pub const OP_JUMP: u8 = 5;
pub const OP_RING: u8 = 6;
pub const OP_AGAIN: u8 = 7;
pub const CHECK_ONLY: u8 = 8;

/// Ordered sets, not hash sets: a hash set's random seed would make afl see different paths
/// for the same input (lower stability).
struct Model {
    top: u64,
    seen: BTreeSet<u64>,
}

impl Model {
    fn acceptable(&self, seq: u64) -> bool {
        seq != 0 && (seq > self.top || (self.top - seq < WINDOW && !self.seen.contains(&seq)))
    }
}

/// The number `infer_seq` must give: the one with low half `lo` in
/// [top - WINDOW + 1, top - WINDOW + 1 + 2^32) (from 0 while top < WINDOW - 1), if it has a
/// 32-bit high half. Worked out in 128 bits, apart from the crate's formula.
fn expected_inference(top: u64, lo: u32) -> Option<u64> {
    let start = (u128::from(top) + 1).saturating_sub(u128::from(WINDOW));
    let base = start & !0xffff_ffff;
    let mut s = base | u128::from(lo);
    if s < start {
        s += 1 << 32;
    }
    u64::try_from(s).ok()
}

pub fn run(data: &[u8]) {
    let mut w = ReplayWindow::new();
    let mut m = Model {
        top: 0,
        seen: BTreeSet::new(),
    };
    let mut last = 0u64;
    let mut r = Reader::new(data);
    while !r.is_empty() {
        let op = r.u8();
        let top = w.top();
        let seq = match op & 7 {
            OP_ABSOLUTE => r.u64(),
            OP_AHEAD => top.saturating_add(u64::from(r.u16())),
            OP_BEHIND => top.saturating_sub(u64::from(r.u16())),
            OP_EDGE => (top.wrapping_sub(WINDOW)).wrapping_add(r.u16() as i16 as u64),
            OP_INFER => {
                let lo = r.u32();
                let got = infer_seq(top, lo);
                assert_eq!(
                    got.ok(),
                    expected_inference(top, lo),
                    "infer_seq({top:#x}, {lo:#x})"
                );
                match got {
                    Ok(s) => s,
                    Err(_) => continue,
                }
            }
            OP_JUMP => top.saturating_add(u64::from(r.u32())),
            OP_RING => top
                .saturating_add(u64::from(r.u8()) * RING)
                .wrapping_add(r.u8() as i8 as u64),
            _ => last,
        };
        let want = m.acceptable(seq);
        let got = w.check(seq).is_ok();
        assert_eq!(got, want, "check({seq}) with top {top}");
        if op & CHECK_ONLY != 0 || !got {
            // A refused number, or one whose ICV failed after the pre-check: nothing moves.
            assert_eq!(w.top(), top);
            assert_eq!(w.check(seq).is_ok(), got, "check changed its mind");
            continue;
        }
        let advanced = w.update(seq);
        assert_eq!(advanced, seq > top, "update({seq}) with top {top}");
        assert!(m.seen.insert(seq));
        m.top = m.top.max(seq);
        assert_eq!(w.top(), m.top);
        assert!(w.check(seq).is_err(), "{seq} still acceptable after update");
        last = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inference_reference_agrees_at_the_boundaries() {
        let b = 1u64 << 32;
        assert_eq!(expected_inference(b - 1, 0), Some(b));
        assert_eq!(expected_inference(b + 10, 0xffff_ff00), Some(b - 256));
        assert_eq!(expected_inference(3, 0xffff_ffff), Some(0xffff_ffff));
        assert_eq!(expected_inference(u64::MAX - 10, 1), None);
        assert_eq!(
            expected_inference(u64::MAX - 10, 0xffff_fff8),
            Some(u64::MAX - 7)
        );
    }

    #[test]
    fn the_model_refuses_what_the_window_must_refuse() {
        let m = Model {
            top: 10_000,
            seen: BTreeSet::from([9_999]),
        };
        assert!(!m.acceptable(0));
        assert!(!m.acceptable(10_000 - WINDOW));
        assert!(m.acceptable(10_000 - WINDOW + 1));
        assert!(!m.acceptable(9_999));
        assert!(m.acceptable(10_001));
    }
}
