//! afl.rs target: `btmm_fast_fuzz::gso::run` (see that module for the input format).

fn main() {
    afl::fuzz!(|data: &[u8]| btmm_fast_fuzz::gso::run(data));
}
