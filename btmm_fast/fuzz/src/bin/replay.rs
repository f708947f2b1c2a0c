//! Runs inputs through a target without afl's instrumentation, once each:
//! `cargo run --bin replay -- TARGET FILE_OR_DIR...` (a directory: every file in it). The
//! target's panic, with its message, is the report; the exit status is 0 when every input
//! passed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn inputs(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.is_file());
    files.sort();
    Ok(files)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = btmm_fast_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    let Some(run) = args.first().and_then(|n| btmm_fast_fuzz::target(n)) else {
        eprintln!(
            "usage: replay TARGET FILE_OR_DIR...  (targets: {})",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let mut count = 0;
    for arg in &args[1..] {
        let files = match inputs(Path::new(arg)) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{arg}: {e}");
                return ExitCode::from(2);
            }
        };
        for file in files {
            let data = match std::fs::read(&file) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            eprintln!("{}: {} bytes", file.display(), data.len());
            run(&data);
            count += 1;
        }
    }
    println!("{} {count} inputs passed", args[0]);
    ExitCode::SUCCESS
}
