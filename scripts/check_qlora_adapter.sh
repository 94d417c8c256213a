#!/usr/bin/env bash
# QLoRA round trip with Python: trains a LoRA adapter on SmolLM2-135M with `peft train --quantize nf4
# --double-quant` (a few steps), computes its logits in Rust on the NF4 base (`peft eval --quantize nf4
# --double-quant --save-logits`), and loads the adapter in Python PEFT on the same model quantized by
# transformers + bitsandbytes at load (scripts/check_qlora_adapter.py). Needs the quantization venv
# (bash fixtures/quant/setup_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_QUANT_VENV:-$HOME/.cache/peft-quant-oracle}/bin/python"
gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
out=target/smollm2-qlora
hf=target/smollm2-hf
cargo build --release -q -p peft-cli
rm -rf "$out"
target/release/peft train --model "$gguf" --quantize nf4 --double-quant --data data/shakespeare/train.txt \
    --output "$out" --r 8 --alpha 16 --targets q_proj,v_proj --lr 1e-3 --batch-size 4 --seq-len 64 \
    --steps "${STEPS:-4}" --eval-max-examples 8 --eval-every 1000000
[ -f "$hf/model.safetensors" ] || target/release/peft convert --model "$gguf" --output "$hf"
target/release/peft eval --model "$hf" --quantize nf4 --double-quant --adapter "$out/adapter" \
    --data data/shakespeare/train.txt --seq-len 64 --batch-size 2 --max-examples 2 \
    --save-logits "$out/rust_logits.safetensors"
"$py" scripts/check_qlora_adapter.py "$hf" "$out/adapter" "$out/rust_logits.safetensors"
