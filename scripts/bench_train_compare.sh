#!/usr/bin/env bash
# LoRA training steps on SmolLM2-135M, peft-rs vs PyTorch + PEFT 0.21.2, interleaved on this machine
# (ours, torch, ours, torch, …: the medians come from one session): LoRA r=8 alpha=16 on q_proj / v_proj, AdamW,
# forward + loss + backward + step. peft-rs runs `peft train` on the bundled Shakespeare data (plain text, packed
# into windows of SEQ tokens: every row is full length) and reads the per-step times from its metrics log;
# PyTorch runs scripts/bench_train_torch.py on random token ids of the same shape. Each run drops its first
# (warm-up) step; the step times of all rounds are pooled into a median and a minimum per side. Both sides run
# under /usr/bin/time -v: the peak RSS ("Maximum resident set size") of each run, median over the rounds.
# The last lines are the ratios peft-rs / PyTorch.
#
# Environment (defaults in brackets):
#   BATCH [4], SEQ [64]   batch × sequence length (e.g. SEQ=512 for 4×512)
#   GC [off]              gradient checkpointing on|off (ours: --gradient-checkpointing; torch:
#                         model.gradient_checkpointing_enable(), non-reentrant)
#   DTYPE [unset]         base weights' dtype, f32|bf16; unset: f32 and no --dtype flag is passed to peft train.
#                         bf16: ours `peft train --dtype bf16` (bf16 storage, f32 products); torch loads bf16
#                         weights (bf16 products, f32 LoRA weights: see scripts/bench_train_torch.py)
#                         (on a CPU without AVX512-BF16 / AMX torch's bf16 products are very slow: ~100 s
#                         per 4×64 step on the AVX2 machine here, ours 4.1 s: not a like-for-like comparison)
#   ROUNDS [3]            interleaved rounds; STEPS [4] timed steps per run (plus one warm-up step)
#   PEFT_BIN [unset]      a peft binary to run (default: build and run target/release/peft)
# Needs the reference venv (PEFT_ORACLE_VENV, or bash ../shared/oracle/setup.sh) and the model (fetched on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
steps="${STEPS:-4}"
rounds="${ROUNDS:-3}"
batch="${BATCH:-4}"
seq="${SEQ:-64}"
gc="${GC:-off}"
dtype="${DTYPE:-}"
hf=target/smollm2-hf
# PEFT_BIN: a peft binary to run instead of building target/release/peft.
peft_bin="${PEFT_BIN:-target/release/peft}"
[ -n "${PEFT_BIN:-}" ] || cargo build --release -q -p peft-cli
if [ ! -f "$hf/tokenizer.json" ]; then
    gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
    "$peft_bin" convert --model "$gguf" --output "$hf"
fi
dtype_args=()
if [ -n "$dtype" ]; then
    dtype_args=(--dtype "$dtype")
fi
work=target/bench-train
rm -rf "$work"
mkdir -p "$work"
for i in $(seq 1 "$rounds"); do
    out="$work/ours-$i"
    /usr/bin/time -v -o "$work/ours-$i.time" "$peft_bin" train --model "$hf" \
        --data data/shakespeare/train.txt --output "$out" \
        --r 8 --alpha 16 --targets q_proj,v_proj --lr 1e-3 --batch-size "$batch" --seq-len "$seq" \
        --gradient-checkpointing "$gc" "${dtype_args[@]}" \
        --steps $((steps + 1)) --eval-max-examples 1 --quiet >/dev/null
    /usr/bin/time -v -o "$work/torch-$i.time" "$py" scripts/bench_train_torch.py "$hf" "$steps" \
        --batch "$batch" --seq-len "$seq" --gradient-checkpointing "$gc" --dtype "${dtype:-f32}" \
        2>"$work/torch-$i.log" | tail -n 1 >"$work/torch-$i.json"
    echo "round $i of $rounds done" >&2
done
"$py" - "$work" "$rounds" "$batch" "$seq" "$gc" "${dtype:-f32}" <<'PY'
import json, re, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
batch, seq, gc, dtype = sys.argv[3:7]

def rss_mib(path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read())
    return int(m.group(1)) / 1024

ours, torch, ours_rss, torch_rss, threads = [], [], [], [], None
for i in range(1, rounds + 1):
    rows = [json.loads(l) for l in open(f"{work}/ours-{i}/metrics.jsonl") if '"kind":"train"' in l]
    ours += [r["step_time_s"] for r in rows][1:]
    t = json.loads(open(f"{work}/torch-{i}.json").read())
    torch += t["step_times_s"]
    threads = t["torch_threads"]
    ours_rss.append(rss_mib(f"{work}/ours-{i}.time"))
    torch_rss.append(rss_mib(f"{work}/torch-{i}.time"))
med, mn = statistics.median, min
print(f"SmolLM2-135M LoRA r=8 q,v, {batch}x{seq} tokens, gradient checkpointing {gc}, base {dtype}; "
      f"{rounds} interleaved rounds")
print(f"peft-rs  : median {med(ours):.3f} s/step, min {mn(ours):.3f} ({len(ours)} steps); "
      f"peak RSS median {med(ours_rss):.0f} MiB (runs: {', '.join(f'{r:.0f}' for r in ours_rss)})")
print(f"PyTorch  : median {med(torch):.3f} s/step, min {mn(torch):.3f} ({len(torch)} steps, {threads} threads); "
      f"peak RSS median {med(torch_rss):.0f} MiB (runs: {', '.join(f'{r:.0f}' for r in torch_rss)})")
print(f"peft-rs / PyTorch: step median {med(ours) / med(torch):.2f}x, min {mn(ours) / mn(torch):.2f}x; "
      f"peak RSS {med(ours_rss) / med(torch_rss):.2f}x")
PY
