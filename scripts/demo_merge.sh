#!/usr/bin/env bash
# The README's main job for now: bake a bundled LoRA adapter (written by Python PEFT 0.21.2) into its bundled
# base model (a tiny HF Llama directory) with `peft merge`, after showing what the adapter is with
# `peft inspect`. Output: target/demo/merged-tiny-llama/ (config.json + model.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
case_dir=fixtures/lora/cases/llama_dora
out=target/demo/merged-tiny-llama
rm -rf "$out"
mkdir -p target/demo
cargo build -q -p peft-cli
peft=target/debug/peft
echo "== peft inspect $case_dir/adapter"
"$peft" inspect "$case_dir/adapter"
echo
echo "== peft merge --base $case_dir/base_hf --adapter $case_dir/adapter --output $out"
"$peft" merge --base "$case_dir/base_hf" --adapter "$case_dir/adapter" --output "$out"
ls -l "$out"
