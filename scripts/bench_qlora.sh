#!/usr/bin/env bash
# QLoRA memory and speed, back to back on this machine: `peft train` on SmolLM2-135M (LoRA r=8 on q_proj,v_proj,
# batch 4×64) with the GGUF dequantized to f32 (--dequantize-gguf), with its Q4_1 blocks kept (the default), and
# with --quantize nf4 (and nf4 + double quant), reporting each run's peak RSS (/usr/bin/time) and step time
# (median over the steps after the first, from metrics.jsonl), and the ratios to the f32 run.
#
#   bash scripts/bench_qlora.sh [STEPS]      (default 8 steps per run)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-8}"
gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
cargo build --release -q -p peft-cli
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

run() { # label, extra flags...
    local label="$1"
    shift
    local out="$tmp/$label"
    /usr/bin/time -f "%M" -o "$tmp/$label.rss" target/release/peft train \
        --model "$gguf" --data data/shakespeare/train.txt --output "$out" \
        --r 8 --alpha 16 --targets q_proj,v_proj --lr 1e-3 \
        --batch-size 4 --seq-len 64 --steps "$steps" \
        --eval-max-examples 8 --eval-every 1000000 "$@" > "$tmp/$label.log" 2>&1
    python3 - "$label" "$tmp/$label.rss" "$out/metrics.jsonl" <<'PY'
import json, statistics, sys
label, rss_file, metrics = sys.argv[1:]
rss_mb = int(open(rss_file).read().split()[-1]) / 1024
steps = [json.loads(l) for l in open(metrics) if '"step_time_s"' in l]
times = [s["step_time_s"] for s in steps if s.get("step", 0) > 1] or [s["step_time_s"] for s in steps]
print(f"{label:10s} peak RSS {rss_mb:8.1f} MiB   step median {statistics.median(times):.3f} s  min {min(times):.3f} s")
print(json.dumps({"label": label, "rss_mb": rss_mb, "step_median": statistics.median(times)}), file=open(rss_file + ".json", "w"))
PY
}

run f32 --dequantize-gguf
run gguf_q4_1
run nf4 --quantize nf4
run nf4_dq --quantize nf4 --double-quant
python3 - "$tmp" <<'PY'
import json, sys
d = {l: json.load(open(f"{sys.argv[1]}/{l}.rss.json")) for l in ("f32", "gguf_q4_1", "nf4", "nf4_dq")}
for l in ("gguf_q4_1", "nf4", "nf4_dq"):
    print(f"{l}/f32: peak RSS {d[l]['rss_mb'] / d['f32']['rss_mb']:.2f}x, step {d[l]['step_median'] / d['f32']['step_median']:.2f}x")
PY
