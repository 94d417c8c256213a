//! A mutation fuzzer for peft-rs' loaders that runs on the stable toolchain (`cargo fuzz` needs nightly).
//!
//! Each [`Target`] is a loader fed bytes: an `adapter_config.json`, a safetensors file, an adapter directory
//! loaded into a tiny Llama, a GGUF file, a data file, a chat template with its messages. [`run`] starts from
//! seed inputs taken from the repository's fixtures, mutates them ([`mutate()`]), and runs the loader on each
//! mutant inside `catch_unwind`. A loader may return an error (that is its job); a panic is a crash, and so
//! is a memory blow-up or a hang, which [`guard`] catches in the process that installs its allocator.
//!
//! The feedback is the loader's answer: a mutant whose outcome (success, or an error message with the
//! numbers and paths taken out) has not been seen joins the corpus, so mutations reach past the first
//! check of each format.
//!
//! `scripts/fuzz.sh` runs every target for 10⁶ executions (`cargo run --release -p peft-fuzz`); the test
//! `tests/fuzz.rs` runs a short bounded run of each and replays every saved crash in
//! `fixtures/fuzz/regressions/`.
//!
//! ```
//! let target = peft_fuzz::targets::by_name("adapter_config").unwrap();
//! let report = peft_fuzz::run(&target, 200, 7);
//! assert_eq!(report.execs, 200);
//! assert!(report.crashes.is_empty(), "{:?}", report.crashes);
//! ```

pub mod guard;
pub mod mutate;
pub mod targets;

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

pub use mutate::{Rng, mutate};
pub use targets::Target;

/// A loader that panicked.
#[derive(Debug, Clone)]
pub struct Crash {
    /// The input it panicked on.
    pub input: Vec<u8>,
    /// The panic's message and location.
    pub message: String,
}

/// What one [`run`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Executions (seeds included).
    pub execs: u64,
    /// Executions the loader accepted.
    pub accepted: u64,
    /// Distinct outcomes seen (success and each error message, numbers and paths taken out).
    pub outcomes: usize,
    /// Inputs in the corpus at the end.
    pub corpus: usize,
    /// Distinct panics, with the first input of each.
    pub crashes: Vec<Crash>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// The slowest execution, in milliseconds.
    pub slowest_ms: f64,
}

thread_local! {
    /// Set while this thread runs a fuzz input: its panics are recorded here instead of printed.
    static CAPTURE: std::cell::RefCell<Option<Option<String>>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that records the message and location of a panic on a thread that runs a
/// fuzz input, and leaves every other panic to the hook that was there.
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let old = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let capturing = CAPTURE.with(|c| c.borrow().is_some());
            if !capturing {
                return old(info);
            }
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            CAPTURE.with(|c| *c.borrow_mut() = Some(Some(format!("{msg} at {at}"))));
        }));
    });
}

/// Runs `f` on `input`: `Ok(outcome)` when it returned, `Err(panic message)` when it panicked.
fn execute(f: &mut targets::Runner, input: &[u8]) -> Result<Result<(), String>, String> {
    install_hook();
    CAPTURE.with(|c| *c.borrow_mut() = Some(None));
    guard::running(input);
    let r = catch_unwind(AssertUnwindSafe(|| f(input)));
    guard::done();
    let message = CAPTURE.with(|c| c.borrow_mut().take()).flatten();
    r.map_err(|_| message.unwrap_or_else(|| "a panic without a message".into()))
}

/// An outcome with its numbers taken out, so `"line 4"` and `"line 5"` are the same answer.
fn signature(outcome: &Result<(), String>) -> String {
    match outcome {
        Ok(()) => "ok".into(),
        Err(e) => e.chars().filter(|c| !c.is_ascii_digit()).take(80).collect(),
    }
}

const MAX_CORPUS: usize = 4096;
const MAX_CRASHES: usize = 32;

/// Fuzzes `target` for `execs` executions from `seed`: every seed input first, then mutants of corpus
/// entries. Deterministic for a given target, seed and count.
pub fn run(target: &Target, execs: u64, seed: u64) -> Report {
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut runner = (target.make)();
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    assert!(!corpus.is_empty(), "target {} has no seeds", target.name);
    let n_seeds = corpus.len();
    let mut seen: HashSet<String> = HashSet::new();
    let mut crashes: HashMap<String, Crash> = HashMap::new();
    let (mut done, mut accepted, mut slowest) = (0u64, 0u64, 0f64);
    let mut queue: Vec<Vec<u8>> = corpus.clone();
    while done < execs {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                let mut d = corpus[rng.below(corpus.len())].clone();
                let other = &corpus[rng.below(corpus.len())];
                let hot = (target.hot)(&d);
                mutate(&mut rng, &mut d, other, hot, target.max_len);
                d
            }
        };
        let t = Instant::now();
        let r = execute(&mut runner, &input);
        slowest = slowest.max(t.elapsed().as_secs_f64() * 1e3);
        done += 1;
        match r {
            Ok(outcome) => {
                accepted += u64::from(outcome.is_ok());
                if seen.insert(signature(&outcome)) {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        let i = n_seeds + rng.below(MAX_CORPUS - n_seeds);
                        corpus[i] = input;
                    }
                }
            }
            Err(message) => {
                if crashes.len() < MAX_CRASHES {
                    crashes
                        .entry(message.clone())
                        .or_insert(Crash { input, message });
                }
                // the loader's state may be broken after a panic: start a fresh one
                runner = (target.make)();
            }
        }
    }
    let mut crashes: Vec<Crash> = crashes.into_values().collect();
    crashes.sort_by(|a, b| a.message.cmp(&b.message));
    Report {
        target: target.name,
        execs: done,
        accepted,
        outcomes: seen.len(),
        corpus: corpus.len(),
        crashes,
        seconds: start.elapsed().as_secs_f64(),
        slowest_ms: slowest,
    }
}

/// Runs `target` once on `input` (a saved crash): `Err` with the panic message if it panics.
pub fn replay(target: &Target, input: &[u8]) -> Result<Result<(), String>, String> {
    let mut runner = (target.make)();
    execute(&mut runner, input)
}
