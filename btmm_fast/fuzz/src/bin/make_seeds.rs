//! Writes the seed corpora to `seeds/` (or to the directory given): `cargo run --bin make_seeds`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(btmm_fast_fuzz::seed_dir);
    btmm_fast_fuzz::seeds::write(&dir)?;
    println!("seeds written to {}", dir.display());
    Ok(())
}
