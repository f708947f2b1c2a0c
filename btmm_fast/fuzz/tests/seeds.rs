//! The committed seeds are current and every one passes its target (a plain build, no afl).

use std::collections::BTreeMap;
use std::fs;

use btmm_fast_fuzz::{seed_dir, seeds, TARGETS};

#[test]
fn every_target_has_seeds_and_they_pass() {
    for (name, run) in TARGETS {
        let dir = seed_dir().join(name);
        let mut n = 0;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            run(&fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no seeds for {name}");
    }
}

#[test]
fn committed_seeds_are_current() {
    let made: BTreeMap<String, Vec<u8>> = seeds::all()
        .into_iter()
        .map(|(t, n, b)| (format!("{t}/{n}"), b))
        .collect();
    let mut committed = BTreeMap::new();
    for (name, _) in TARGETS {
        for entry in fs::read_dir(seed_dir().join(name)).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            committed.insert(format!("{name}/{file}"), fs::read(&path).unwrap());
        }
    }
    assert!(
        made == committed,
        "btmm_fast/fuzz/seeds is stale: run `cargo run --bin make_seeds` in btmm_fast/fuzz"
    );
}

#[test]
fn empty_and_short_inputs_pass() {
    for (_, run) in TARGETS {
        for len in 0..40 {
            run(&vec![0u8; len]);
            run(&vec![0xffu8; len]);
        }
    }
}
