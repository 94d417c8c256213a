//! What turns a memory blow-up or a hang into a reported crash instead of a dead machine: a global
//! allocator that refuses any allocation over [`MAX_ALLOC`] bytes, or that would take the live total over
//! [`MAX_LIVE`], and a watchdog that fires when one execution runs longer than [`HANG`]. Either writes the
//! input being run to the crash file of its target ([`arm`]), prints what happened and aborts the process.
//!
//! Install the allocator in a binary that runs the fuzzer:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: peft_fuzz::guard::LimitAlloc = peft_fuzz::guard::LimitAlloc;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The largest single allocation a loader may make on a fuzz input (all inputs are under 1 MiB).
pub const MAX_ALLOC: usize = 256 << 20;
/// The most memory live at once.
pub const MAX_LIVE: usize = 2 << 30;
/// The longest one execution may take (`PEFT_FUZZ_HANG_SECS` overrides it).
pub const HANG: Duration = Duration::from_secs(20);

fn hang_limit_ms() -> u64 {
    std::env::var("PEFT_FUZZ_HANG_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(HANG.as_millis() as u64, |s| s * 1000)
}

static LIVE: AtomicUsize = AtomicUsize::new(0);
static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since [`epoch`] at which the running execution began; 0 when none runs.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static CRASH_FILE: Mutex<Option<File>> = Mutex::new(None);

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// The allocator: [`System`] with the limits above.
#[derive(Debug)]
pub struct LimitAlloc;

// SAFETY: every call is forwarded to `System` unchanged; the checks only read and update counters (and on a
// breach write the crash file through a pre-opened handle, which allocates nothing, then abort).
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            check(new_size);
        }
        // SAFETY: forwarded unchanged
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        breach(b"an allocation over the per-allocation limit (MAX_ALLOC)");
    }
    if LIVE.load(Ordering::Relaxed).saturating_add(size) > MAX_LIVE {
        breach(b"live memory over the limit (MAX_LIVE)");
    }
}

/// Writes the running input to the crash file, says why on stderr and aborts. Allocates nothing.
fn breach(why: &[u8]) -> ! {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"peft-fuzz: ");
    let _ = err.write_all(why);
    if let Ok(mut f) = CRASH_FILE.try_lock()
        && let Some(f) = f.as_mut()
    {
        let (p, n) = (
            CURRENT_PTR.load(Ordering::SeqCst),
            CURRENT_LEN.load(Ordering::SeqCst),
        );
        if !p.is_null() {
            // SAFETY: `p..p+n` is the input that `running` registered; it lives until `done`
            let input = unsafe { std::slice::from_raw_parts(p, n) };
            let _ = f.write_all(input);
            let _ = f.sync_all();
            let _ =
                err.write_all(b"; the input is in the target's crash file (<target>-abort.bin)");
        }
    }
    let _ = err.write_all(b"\n");
    std::process::abort()
}

/// Opens `path` as the crash file for the limits' breaches (created empty, removed by [`disarm`] when the
/// run ends without one) and starts the watchdog.
pub fn arm(path: &Path) -> std::io::Result<()> {
    let f = File::create(path)?;
    *CRASH_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    static WATCHDOG: std::sync::Once = std::sync::Once::new();
    WATCHDOG.call_once(|| {
        epoch();
        let limit = hang_limit_ms();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let started = STARTED_MS.load(Ordering::SeqCst);
                let now = epoch().elapsed().as_millis() as u64;
                if started != 0 && now.saturating_sub(started) > limit {
                    breach(b"one execution ran past the hang limit (HANG)");
                }
            }
        });
    });
    Ok(())
}

/// Closes the crash file and removes it (nothing was written to it).
pub fn disarm(path: &Path) {
    *CRASH_FILE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let _ = std::fs::remove_file(path);
}

/// Registers `input` as the one running (for the crash file) and starts the hang clock.
pub fn running(input: &[u8]) {
    CURRENT_PTR.store(input.as_ptr().cast_mut(), Ordering::SeqCst);
    CURRENT_LEN.store(input.len(), Ordering::SeqCst);
    STARTED_MS.store(epoch().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
}

/// Ends the execution registered by [`running`].
pub fn done() {
    STARTED_MS.store(0, Ordering::SeqCst);
    CURRENT_PTR.store(std::ptr::null_mut(), Ordering::SeqCst);
    CURRENT_LEN.store(0, Ordering::SeqCst);
}
