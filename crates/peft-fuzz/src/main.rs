//! `peft-fuzz`: runs the fuzz targets and prints their counts.
//!
//! ```text
//! cargo run --release -p peft-fuzz -- [--execs N] [--seed S] [--target NAME]… [--crash-dir DIR]
//! ```
//!
//! Each panic's input is written to `DIR/<target>-<n>.bin` (default `fuzz-crashes/`); a memory blow-up or a
//! hang aborts the process after writing its input to `DIR/<target>-abort.bin`. Exits 1 if anything crashed.

#[global_allocator]
static ALLOC: peft_fuzz::guard::LimitAlloc = peft_fuzz::guard::LimitAlloc;

use std::path::PathBuf;

fn main() {
    let mut execs: u64 = 1_000_000;
    let mut seed: u64 = 1;
    let mut names: Vec<String> = Vec::new();
    let mut crash_dir = PathBuf::from("fuzz-crashes");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("error: {flag} needs a value");
                std::process::exit(2)
            })
        };
        let number = |flag: &str, v: String| -> u64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("error: {flag}: not a whole number: {v:?}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--execs" => execs = number("--execs", value("--execs")),
            "--seed" => seed = number("--seed", value("--seed")),
            "--target" => names.push(value("--target")),
            "--crash-dir" => crash_dir = PathBuf::from(value("--crash-dir")),
            // the guard's own checks (tests/fuzz.rs): a blow-up or a hang on a registered input
            "--self-test-oversize" | "--self-test-hang" => {
                let crash = PathBuf::from(value(&a));
                peft_fuzz::guard::arm(&crash).expect("the crash file");
                let input = b"the input being run".to_vec();
                peft_fuzz::guard::running(&input);
                if a == "--self-test-oversize" {
                    let v = vec![1u8; peft_fuzz::guard::MAX_ALLOC + 1];
                    println!("{}", v.len());
                } else {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
                peft_fuzz::guard::done();
                return;
            }
            "--list" => {
                for t in peft_fuzz::targets::all() {
                    println!("{:<16} {}", t.name, t.about);
                }
                return;
            }
            other => {
                eprintln!(
                    "error: unknown argument {other:?} (--execs N, --seed S, --target NAME, --crash-dir DIR, --list)"
                );
                std::process::exit(2)
            }
        }
    }
    let targets: Vec<_> = if names.is_empty() {
        peft_fuzz::targets::all()
    } else {
        names
            .iter()
            .map(|n| {
                peft_fuzz::targets::by_name(n).unwrap_or_else(|| {
                    eprintln!("error: no target {n:?} (see --list)");
                    std::process::exit(2)
                })
            })
            .collect()
    };
    if let Err(e) = std::fs::create_dir_all(&crash_dir) {
        eprintln!("error: {}: {e}", crash_dir.display());
        std::process::exit(1)
    }
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>7} {:>8} {:>9} {:>11} {:>8}",
        "target",
        "execs",
        "accepted",
        "outcomes",
        "corpus",
        "crashes",
        "seconds",
        "execs/s",
        "max ms"
    );
    let mut crashed = false;
    for t in &targets {
        let abort_file = crash_dir.join(format!("{}-abort.bin", t.name));
        if let Err(e) = peft_fuzz::guard::arm(&abort_file) {
            eprintln!("error: {}: {e}", abort_file.display());
            std::process::exit(1)
        }
        let r = peft_fuzz::run(t, execs, seed);
        peft_fuzz::guard::disarm(&abort_file);
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>7} {:>8} {:>9.1} {:>11.0} {:>8.1}",
            r.target,
            r.execs,
            r.accepted,
            r.outcomes,
            r.corpus,
            r.crashes.len(),
            r.seconds,
            r.execs as f64 / r.seconds,
            r.slowest_ms
        );
        for (i, c) in r.crashes.iter().enumerate() {
            crashed = true;
            let p = crash_dir.join(format!("{}-{i}.bin", t.name));
            let _ = std::fs::write(&p, &c.input);
            println!("  crash: {} (input: {})", c.message, p.display());
        }
    }
    if crashed {
        std::process::exit(1)
    }
}
