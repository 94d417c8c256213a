#!/usr/bin/env bash
# LoRA forward, Rust (peft on candle) vs PyTorch + PEFT 0.21.2, back to back on this machine:
# Linear(2048, 2048) with bias, x [512, 2048] f32, LoRA r=16 alpha=32, inference.
#
# From a fresh clone (run from the repository root):
#   bash ../shared/oracle/setup.sh        # once: the Python reference venv ($HOME/.cache/peft-oracle)
#   bash scripts/bench_compare.sh         # PEFT_ORACLE_VENV=<dir> to use another venv, PEFT_BENCH_N=<n> rounds
#
# Both sides run N (default 200) rounds of (plain, LoRA unmerged, LoRA merged), each round in a random order,
# after warm-up, and report the median and minimum of each and the median of the per-round ratios to the plain
# linear (the Rust side also times the training-path candle ops, dropout 0); see
# crates/peft/benches/lora_forward.rs and scripts/bench_torch.py. Run it on a quiet machine: the load average
# is printed before and after each side.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
N="${PEFT_BENCH_N:-200}"
if [ ! -x "$PY" ]; then
  echo "no Python reference at $PY: run 'bash ../shared/oracle/setup.sh' first (or set PEFT_ORACLE_VENV)" >&2
  exit 1
fi

echo "== building the Rust bench"
# The executable's path comes from cargo's JSON messages, so the measurement runs without holding cargo's lock.
EXE=$(cargo bench -p peft --bench lora_forward --no-run --message-format=json \
  | "$PY" -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "lora_forward" and m.get("executable"):
        exe = m["executable"]
print(exe or "")
')
if [ -z "$EXE" ]; then
  echo "could not find the lora_forward bench executable" >&2
  exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== Rust (load: $(cut -d' ' -f1-3 /proc/loadavg))"
PEFT_BENCH_N="$N" "$EXE" --ratio | tee "$TMP/rust.txt"
echo "== PyTorch (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$PY" scripts/bench_torch.py --n "$N" | tee "$TMP/torch.txt"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
"$PY" - "$TMP/rust.txt" "$TMP/torch.txt" <<'PY'
import json, sys

rust, torch = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
rows = [("plain linear", "plain"), ("LoRA unmerged", "lora"), ("LoRA merged", "merged")]
print(f"Linear(2048,2048)+bias, x [512,2048] f32, LoRA r=16; {rust['n']} interleaved rounds each side")
print(f"{'':<22} {'Rust med':>9} {'Rust min':>9} {'Torch med':>10} {'Torch min':>10} {'Rust/Torch med':>15} {'Rust/Torch min':>15}")
for name, k in rows:
    rm, rn = rust[f"{k}_median_ms"], rust[f"{k}_min_ms"]
    tm, tn = torch[f"{k}_median_ms"], torch[f"{k}_min_ms"]
    print(f"{name:<22} {rm:>9.3f} {rn:>9.3f} {tm:>10.3f} {tn:>10.3f} {rm / tm:>15.3f} {rn / tn:>15.3f}")
if "lora_candle_median_ms" in rust:
    print(f"{'LoRA candle ops (Rust)':<22} {rust['lora_candle_median_ms']:>9.3f} {rust['lora_candle_min_ms']:>9.3f}")
print("(ms; 'med' = median over the rounds)")
print()
print(f"{'median per-round ratio':<28} {'Rust':>7} {'PyTorch':>8}")
print(f"{'LoRA unmerged / plain':<28} {rust['lora_ratio_median']:>7.4f} {torch['lora_ratio_median']:>8.4f}   (bar 1.10, theory 1.0156)")
print(f"{'LoRA merged / plain':<28} {rust['merged_ratio_median']:>7.4f} {torch['merged_ratio_median']:>8.4f}")
if "lora_candle_ratio_median" in rust:
    print(f"{'LoRA candle ops / plain':<28} {rust['lora_candle_ratio_median']:>7.4f} {'-':>8}   (Rust training-path ops, dropout 0)")
PY
