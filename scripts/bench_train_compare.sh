#!/usr/bin/env bash
# One LoRA training step on SmolLM2-135M, peft-rs vs PyTorch + PEFT 0.21.2, back to back on this machine:
# f32, LoRA r=8 alpha=16 on q_proj / v_proj, AdamW, batch 4×64 tokens, forward + loss + backward + step.
# peft-rs runs `peft train` on the bundled Shakespeare data (every example fills 64 tokens) and reads the
# per-step times from its metrics log; PyTorch runs scripts/bench_train_torch.py on random token ids. Both
# drop the first (warm-up) step and report the median and minimum; the last line is the ratio.
# Needs the reference venv (bash ../shared/oracle/setup.sh) and the model (fetched on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
steps="${STEPS:-8}"
hf=target/smollm2-hf
cargo build --release -q -p peft-cli
if [ ! -f "$hf/tokenizer.json" ]; then
    gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
    target/release/peft convert --model "$gguf" --output "$hf"
fi
out=target/bench-train
rm -rf "$out"
target/release/peft train --model "$hf" --data data/shakespeare/train.txt --output "$out" \
    --r 8 --alpha 16 --targets q_proj,v_proj --lr 1e-3 --batch-size 4 --seq-len 64 \
    --steps $((steps + 1)) --eval-max-examples 1 --quiet >/dev/null
torch_json="$("$py" scripts/bench_train_torch.py "$hf" "$steps" 2>/dev/null | tail -n 1)"
"$py" - "$out/metrics.jsonl" "$torch_json" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"train"' in l]
ours = [r["step_time_s"] for r in rows][1:]
torch = json.loads(sys.argv[2])
rm, rmin = statistics.median(ours), min(ours)
print(f"peft-rs  : median {rm:.3f} s/step, min {rmin:.3f} ({len(ours)} steps)")
print(f"PyTorch  : median {torch['median_s']:.3f} s/step, min {torch['min_s']:.3f} ({torch['torch_threads']} threads)")
print(f"peft-rs / PyTorch: median {rm / torch['median_s']:.2f}x, min {rmin / torch['min_s']:.2f}x")
PY
