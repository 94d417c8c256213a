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
