"""Loads an adapter that `peft train --quantize nf4 --double-quant` wrote into Python PEFT, on the same model
quantized by transformers + bitsandbytes 0.50.2 at load (NF4, double quant, compute dtype float32, the CPU bf16
repacking off), and compares the logits with peft-rs's (`peft eval --quantize nf4 --double-quant --save-logits`).

Usage: bash scripts/check_qlora_adapter.sh   (or: python scripts/check_qlora_adapter.py HF_DIR ADAPTER RUST_LOGITS)
"""
import sys

import bitsandbytes as bnb
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main() -> int:
    hf_dir, adapter_dir, rust_path = sys.argv[1:4]
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, quantization_config=qc)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    rust = load_file(rust_path)
    ids, mask = rust["input_ids"].long(), rust["attention_mask"].long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    ours = rust["logits"].float()
    keep = mask.bool()
    diff = (logits - ours).abs()[keep]
    scale = logits.abs()[keep].max()
    rel = (diff.max() / scale).item()
    print(f"{n4} bnb Linear4bit layers; adapter {adapter_dir}")
    print(f"logits {tuple(ours.shape)}: max |python - rust| = {diff.max().item():.3e}, max |logit| = {scale.item():.2f}, "
          f"relative = {rel:.3e}")
    agree = (logits.argmax(-1) == ours.argmax(-1))[keep].float().mean().item()
    print(f"argmax agreement on {int(keep.sum())} positions: {agree * 100:.2f}%")
    ok = rel <= 1e-3
    print("PASS (relative 1e-3)" if ok else "FAIL (relative 1e-3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
