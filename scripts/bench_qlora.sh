#!/usr/bin/env bash
# QLoRA memory and speed, back to back on this machine.
#
# 1. `peft train` on SmolLM2-135M (LoRA r=8 on q_proj,v_proj, batch 4×64): the GGUF dequantized to f32
#    (--dequantize-gguf) with and without gradient checkpointing, its Q4_1 blocks kept, and --quantize nf4
#    (± double quant, and without gradient checkpointing), reporting each run's peak RSS (/usr/bin/time) and
#    step time (median over the steps after the first, from metrics.jsonl), and the ratios to the f32 run.
#    Quantized bases train with gradient checkpointing by default (as PEFT's prepare_model_for_kbit_training).
# 2. A TinyLlama-1.1B-shaped Llama (22 layers, hidden 2048, FFN 5632, 32/4 heads, vocab 32000; random bf16
#    weights written once by `cargo run --release --example random_llama` into target/bench-tinyllama-1.1b,
#    2.2 GB) trained with --quantize nf4 for a few steps on pre-tokenized data (the Shakespeare bytes as ids).
#
#   bash scripts/bench_qlora.sh [STEPS] [STEPS_1B]      (defaults 8 and 3; STEPS_1B=0 skips the 1.1B run)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-8}"
steps_1b="${2:-3}"
gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
cargo build --release -q -p peft-cli
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

summarize() { # label, rss file, metrics.jsonl
    python3 - "$@" <<'PY'
import json, statistics, sys
label, rss_file, metrics = sys.argv[1:]
rss_mb = int(open(rss_file).read().split()[-1]) / 1024
steps = [json.loads(l) for l in open(metrics) if '"step_time_s"' in l]
times = [s["step_time_s"] for s in steps if s.get("step", 0) > 1] or [s["step_time_s"] for s in steps]
print(f"{label:12s} peak RSS {rss_mb:8.1f} MiB   step median {statistics.median(times):.3f} s  min {min(times):.3f} s")
print(json.dumps({"label": label, "rss_mb": rss_mb, "step_median": statistics.median(times)}), file=open(rss_file + ".json", "w"))
PY
}

run() { # label, extra flags...
    local label="$1"
    shift
    local out="$tmp/$label"
    /usr/bin/time -f "%M" -o "$tmp/$label.rss" target/release/peft train \
        --model "$gguf" --data data/shakespeare/train.txt --output "$out" \
        --r 8 --alpha 16 --targets q_proj,v_proj --lr 1e-3 \
        --batch-size 4 --seq-len 64 --steps "$steps" \
        --eval-max-examples 8 --eval-every 1000000 --quiet "$@" > "$tmp/$label.log" 2>&1
    summarize "$label" "$tmp/$label.rss" "$out/metrics.jsonl"
}

labels=(f32 f32_gc gguf_q4_1 nf4 nf4_dq nf4_no_gc)
run f32 --dequantize-gguf
run f32_gc --dequantize-gguf --gradient-checkpointing on
run gguf_q4_1
run nf4 --quantize nf4
run nf4_dq --quantize nf4 --double-quant
run nf4_no_gc --quantize nf4 --gradient-checkpointing off
python3 - "$tmp" "${labels[@]}" <<'PY'
import json, sys
d = {l: json.load(open(f"{sys.argv[1]}/{l}.rss.json")) for l in sys.argv[2:]}
for l in sys.argv[3:]:
    print(f"{l}/f32: peak RSS {d[l]['rss_mb'] / d['f32']['rss_mb']:.2f}x, step {d[l]['step_median'] / d['f32']['step_median']:.2f}x")
PY

if [ "$steps_1b" -gt 0 ]; then
    big=target/bench-tinyllama-1.1b
    if [ ! -f "$big/model.safetensors" ]; then
        cargo run --release -q -p peft-models --example random_llama -- "$big" tinyllama-1.1b bf16
    fi
    python3 - "$tmp/tokens.jsonl" <<'PY'
import json, sys
paras = open("data/shakespeare/train.txt", encoding="utf-8").read().split("\n\n")
with open(sys.argv[1], "w") as f:
    for p in paras:
        b = p.encode("utf-8")
        if len(b) >= 16:
            f.write(json.dumps({"input_ids": [1] + [x + 3 for x in b[:63]]}) + "\n")
PY
    /usr/bin/time -f "%M" -o "$tmp/tinyllama.rss" target/release/peft train \
        --model "$big" --data "$tmp/tokens.jsonl" --output "$tmp/tinyllama" \
        --r 8 --alpha 16 --targets q_proj,v_proj --batch-size 4 --seq-len 64 --steps "$steps_1b" \
        --eval-max-examples 4 --quantize nf4 --quiet > "$tmp/tinyllama.log" 2>&1
    grep -E '^(loaded|base|trainable)' "$tmp/tinyllama.log"
    summarize "tinyllama_nf4" "$tmp/tinyllama.rss" "$tmp/tinyllama/metrics.jsonl"
fi
