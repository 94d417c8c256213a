//! A short, bounded run of every fuzz target (the 10⁶-execution runs are `scripts/fuzz.sh`), and a replay
//! of every crash the fuzzer has found (`fixtures/fuzz/regressions/<target>/*`): each must now be a
//! returned error or a success, never a panic.

#[global_allocator]
static ALLOC: peft_fuzz::guard::LimitAlloc = peft_fuzz::guard::LimitAlloc;

/// Executions per target in CI (debug build): a few seconds each.
const EXECS: u64 = 20_000;

#[test]
fn every_target_survives_a_short_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for t in peft_fuzz::targets::all() {
        let abort = dir.path().join(format!("{}-abort.bin", t.name));
        peft_fuzz::guard::arm(&abort).unwrap();
        let r = peft_fuzz::run(&t, EXECS, 0x5eed);
        peft_fuzz::guard::disarm(&abort);
        eprintln!(
            "{}: {} execs, {} accepted, {} outcomes, {} crashes, {:.1} s",
            t.name,
            r.execs,
            r.accepted,
            r.outcomes,
            r.crashes.len(),
            r.seconds
        );
        assert_eq!(r.execs, EXECS);
        // the mutations reach past the first check: several distinct answers, some inputs accepted
        assert!(
            r.outcomes >= 5,
            "{}: only {} distinct outcomes",
            t.name,
            r.outcomes
        );
        assert!(
            r.accepted > 0,
            "{}: nothing accepted (are the seeds valid?)",
            t.name
        );
        for c in r.crashes {
            failures.push(format!(
                "{}: {} on {:?}",
                t.name,
                c.message,
                String::from_utf8_lossy(&c.input)
            ));
        }
    }
    assert!(failures.is_empty(), "crashes:\n{}", failures.join("\n"));
}

#[test]
fn every_seed_is_accepted() {
    // a seed the loader refuses would make its target fuzz only the error path
    for t in peft_fuzz::targets::all() {
        for (i, s) in (t.seeds)().iter().enumerate() {
            match peft_fuzz::replay(&t, s) {
                Ok(Ok(())) => {}
                Ok(Err(e)) if t.name == "safetensors" || t.name == "gguf" => {
                    // integer-only or quantized fixture files may be refused by a later check; the header
                    // must still parse
                    assert!(!e.contains("header"), "{} seed {i}: {e}", t.name);
                }
                Ok(Err(e)) => panic!("{} seed {i} refused: {e}", t.name),
                Err(p) => panic!("{} seed {i} panicked: {p}", t.name),
            }
        }
    }
}

#[test]
fn found_crashes_stay_fixed() {
    let root = peft_fuzz::targets::fixtures().join("fuzz/regressions");
    let mut n = 0;
    for t in peft_fuzz::targets::all() {
        let Ok(rd) = std::fs::read_dir(root.join(t.name)) else {
            continue;
        };
        let mut paths: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            let input = std::fs::read(&p).unwrap();
            if let Err(panic) = peft_fuzz::replay(&t, &input) {
                panic!("{}: {panic}", p.display());
            }
            n += 1;
        }
    }
    eprintln!("{n} regression inputs replayed");
}

/// The fuzzer can fail: a loader with a planted bug (a panic once `r` exceeds a million, as an unchecked
/// size would) is caught within a short run, with the panic's location and the input that triggered it.
#[test]
fn a_planted_panic_is_found() {
    fn seeds() -> Vec<Vec<u8>> {
        vec![br#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#.to_vec()]
    }
    fn make() -> peft_fuzz::targets::Runner {
        Box::new(|input| {
            let v: serde_json::Value = serde_json::from_slice(input).map_err(|e| e.to_string())?;
            let r = v["r"].as_f64().ok_or("no r")?;
            if r > 1e6 {
                let table = [0u8; 4];
                let _ = table[r as usize % 7 + 4]; // the planted bug
            }
            Ok(())
        })
    }
    let t = peft_fuzz::Target {
        name: "planted",
        about: "a loader with a bug",
        seeds,
        make,
        hot: |_| 0,
        max_len: 1 << 10,
    };
    let r = peft_fuzz::run(&t, 20_000, 3);
    assert!(!r.crashes.is_empty(), "not found in {} execs", r.execs);
    let c = &r.crashes[0];
    assert!(
        c.message.contains("index out of bounds") && c.message.contains("fuzz.rs"),
        "{}",
        c.message
    );
    let v: serde_json::Value = serde_json::from_slice(&c.input).unwrap();
    assert!(v["r"].as_f64().unwrap() > 1e6, "{v}");
}

/// The guard turns a memory blow-up and a hang into an abort that leaves the input behind.
#[test]
fn the_guard_catches_a_blow_up_and_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, why) in [
        ("--self-test-oversize", "MAX_ALLOC"),
        ("--self-test-hang", "HANG"),
    ] {
        let crash = dir.path().join(format!("{flag}.bin"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_peft-fuzz"))
            .arg(flag)
            .arg(&crash)
            .env("PEFT_FUZZ_HANG_SECS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: exited {:?}", out.status);
        assert!(stderr.contains(why), "{flag}: {stderr}");
        assert_eq!(
            std::fs::read(&crash).unwrap(),
            b"the input being run",
            "{flag}"
        );
    }
}
