//! Not a target of the crate: a binary that panics on any input holding a zero byte, so that
//! the smoke test (tests/fuzz/test_rust_fuzz_smoke.py) can check that a panic in this build
//! mode is a crash afl-fuzz counts.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.contains(&0) {
            panic!("canary: a zero byte");
        }
    });
}
