#!/usr/bin/env bash
# Python compatibility of what the main job trained: converts the GGUF to an HF directory (`peft convert`),
# computes logits with the trained adapter in Rust (`peft eval --save-logits`), and compares them with Python
# PEFT's on the same f32 weights (scripts/check_trained_adapter.py). Needs the reference venv
# (bash ../shared/oracle/setup.sh) and a finished scripts/train_smollm2.sh run.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
out="${PEFT_TRAIN_OUTPUT:-target/smollm2-shakespeare}"
hf=target/smollm2-hf
cargo build --release -q -p peft-cli
[ -f "$hf/model.safetensors" ] || target/release/peft convert --model "$gguf" --output "$hf"
target/release/peft eval --model "$hf" --adapter "$out/adapter" --data data/shakespeare/train.txt \
    --seq-len 64 --batch-size 2 --max-examples 2 --save-logits "$out/rust_logits.safetensors"
"$py" scripts/check_trained_adapter.py "$hf" "$out/adapter" "$out/rust_logits.safetensors"
