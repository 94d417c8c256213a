//! The bad-input corpus (`fixtures/bad/`, written by `fixtures/bad/gen_bad.py`) through the `peft` binary:
//! every case must end in a clear error (exit status 1, or 2 for a refused flag) that names what is wrong
//! (or, for `peft inspect`, a report on stdout that names it), never a panic (status 101), a signal (an allocation failure aborts), a hang or a memory blow-up.
//!
//! Each run gets a fresh copy of its inputs, a 60 s limit and a 4 GiB address-space limit (`ulimit -v`), so
//! a loader that believes a header claiming 10¹² of something fails the test instead of the machine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIME_LIMIT: Duration = Duration::from_secs(60);
const ADDRESS_SPACE_KIB: u64 = 4 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn copy_into(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_into(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::copy(src, dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Builds the work directory of a case: fixtures copied, files overlaid, then removals, truncations, patches.
fn prepare(case_dir: &Path, case: &serde_json::Value, work: &Path) {
    for s in case["setup"].as_array().unwrap() {
        let s = strings(s);
        copy_into(&fixtures().join(&s[0]), &work.join(&s[1]));
    }
    let files = case_dir.join("files");
    if files.is_dir() {
        copy_into(&files, work);
    }
    for r in strings(&case["remove"]) {
        std::fs::remove_file(work.join(r)).unwrap();
    }
    for t in case["truncate"].as_array().unwrap() {
        let p = work.join(t[0].as_str().unwrap());
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(t[1].as_u64().unwrap()).unwrap();
    }
    for p in case["patch"].as_array().unwrap() {
        let path = work.join(p[0].as_str().unwrap());
        let mut b = std::fs::read(&path).unwrap();
        let off = p[1].as_u64().unwrap() as usize;
        let hex = p[2].as_str().unwrap();
        for i in 0..hex.len() / 2 {
            b[off + i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        std::fs::write(&path, b).unwrap();
    }
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

fn run_peft(args: &[String]) -> Outcome {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {ADDRESS_SPACE_KIB}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        timed_out,
    }
}

/// Runs one case (all of its command lines); returns a line per problem.
fn check_case(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let ok = case["ok"].as_bool().unwrap_or(false);
    let expect = strings(&case["expect"]);
    let mut problems = Vec::new();
    for argv in case["runs"].as_array().unwrap() {
        let work = tempfile::tempdir().unwrap();
        prepare(dir, &case, work.path());
        let w = work.path().to_string_lossy().into_owned();
        let args: Vec<String> = strings(argv)
            .into_iter()
            .map(|a| a.replace("{w}", &w))
            .collect();
        let cmd = strings(argv).join(" ");
        let o = run_peft(&args);
        let mut fail = |what: String| {
            problems.push(format!(
                "{name}: `peft {cmd}`: {what}\n    stderr: {}",
                o.stderr.trim().replace('\n', "\n            ")
            ))
        };
        if o.timed_out {
            fail(format!("no answer within {TIME_LIMIT:?}"));
            continue;
        }
        if o.stderr.contains("panicked") {
            fail("panicked".into());
            continue;
        }
        // `peft inspect` is a report: it may exit 0 when its report shows the problem.
        let reported = !ok
            && argv[0] == "inspect"
            && o.code == Some(0)
            && expect
                .iter()
                .all(|e| o.stdout.to_lowercase().contains(&e.to_lowercase()));
        if reported {
            continue;
        }
        match (ok, o.code) {
            (true, Some(0)) | (false, Some(1 | 2)) => {}
            (_, code) => {
                fail(format!(
                    "exit status {code:?} (expected {})",
                    if ok { "0" } else { "1 or 2" }
                ));
                continue;
            }
        }
        let text = if ok {
            format!("{}\n{}", o.stderr, o.stdout)
        } else {
            o.stderr.clone()
        }
        .to_lowercase();
        if !ok && !o.stderr.starts_with("error") {
            fail("stderr does not start with `error`".into());
        }
        for e in &expect {
            if !text.contains(&e.to_lowercase()) {
                fail(format!("the message does not mention {e:?}"));
            }
        }
    }
    problems
}

#[test]
fn every_bad_input_is_a_clear_error_and_never_a_panic() {
    let root = fixtures().join("bad/cases");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 90, "the corpus has {} cases", dirs.len());
    // Two workers: the runs are independent processes.
    let chunks: Vec<Vec<PathBuf>> = (0..2)
        .map(|k| dirs.iter().skip(k).step_by(2).cloned().collect())
        .collect();
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|c| s.spawn(move || c.iter().flat_map(|d| check_case(d)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        problems.is_empty(),
        "{} of the corpus' runs went wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
