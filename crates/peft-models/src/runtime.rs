//! Process-wide settings that make candle's CPU backend faster on small machines: call
//! [`tune_process`] once, first thing in `main`.
//!
//! Measured on SmolLM2-135M training steps (2 cores, `perf`), three costs outside the matmuls are the
//! process's defaults, not the model's work:
//! - **Spinning workers.** candle's elementwise thread pool spins 25 000 `pause`s after every op before it
//!   parks, while the next matmul runs on rayon's threads: on 2 cores the spinner takes a core from the
//!   matmul (≈ 9 % of the step's CPU time). [`tune_process`] sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to
//!   [`SPIN_LIMIT`] unless the environment already sets it.
//! - **`/proc/cpuinfo` on every op.** Without `RAYON_NUM_THREADS`, candle's `get_num_threads()` (called for
//!   every matmul and elementwise op) counts physical cores by reading and parsing `/proc/cpuinfo`
//!   (≈ 2 %). [`tune_process`] sets `RAYON_NUM_THREADS` to the count candle would compute, once.
//! - **Page faults.** glibc returns freed memory above 128 KiB to the kernel (`munmap`, heap trimming), so
//!   every activation and gradient of the next step faults its pages in again and the kernel zeroes them
//!   (≈ 1.4 million faults in 7 steps). On glibc, [`tune_process`] keeps freed memory for reuse
//!   (`mallopt`: the mmap threshold at its maximum, 32 MiB, no trimming below 1 GiB, a 64 MiB top pad): a
//!   few percent more peak RSS, about a quarter of the faults.
//!
//! Each setting can be overridden from the environment (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, `RAYON_NUM_THREADS`,
//! glibc's `MALLOC_*_` variables are read by glibc before `main` and are left alone when set), and
//! `PEFT_RUNTIME_TUNING=0` turns all of them off (candle's and glibc's defaults, for comparisons).

/// The spin limit [`tune_process`] gives candle's elementwise pool (candle's default is 25 000).
pub const SPIN_LIMIT: u32 = 1000;

/// What [`tune_process`] set (`None`: left as the environment had it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// `RAYON_NUM_THREADS` set to this count.
    pub threads: Option<usize>,
    /// `CANDLE_BARRIER_POOL_SPIN_LIMIT` set to this value.
    pub spin_limit: Option<u32>,
    /// glibc's allocator told to keep freed memory (see the module docs).
    pub malloc: bool,
}

/// Applies the module's settings to this process and says which ones it set.
///
/// ```
/// // SAFETY: first thing in main, before any other thread exists.
/// let tuning = unsafe { peft_models::runtime::tune_process() };
/// assert!(std::env::var("RAYON_NUM_THREADS").is_ok());
/// # let _ = tuning;
/// ```
///
/// # Safety
/// It sets environment variables, which is only sound while no other thread reads or writes the
/// environment: call it before starting threads (and before the first candle operation, which starts
/// candle's thread pools and reads these variables once).
pub unsafe fn tune_process() -> Tuning {
    let mut t = Tuning::default();
    if std::env::var("PEFT_RUNTIME_TUNING").is_ok_and(|v| v == "0") {
        return t;
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads().max(1);
        // SAFETY: the caller guarantees no other thread touches the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        t.threads = Some(n);
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT.to_string()) };
        t.spin_limit = Some(SPIN_LIMIT);
    }
    t.malloc = tune_malloc();
    t
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() -> bool {
    let set = |var: &str| std::env::var_os(var).is_some();
    let mut done = false;
    // SAFETY: mallopt only changes glibc's allocator parameters; it is safe to call at any time.
    unsafe {
        if !set("MALLOC_MMAP_THRESHOLD_") {
            // 32 MiB, glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused.
            done |= libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
        }
        if !set("MALLOC_TRIM_THRESHOLD_") {
            done |= libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1;
        }
        if !set("MALLOC_TOP_PAD_") {
            done |= libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1;
        }
    }
    done
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() -> bool {
    false
}
