"""Loads an adapter that `peft train --quantize nf4 --double-quant` wrote into Python PEFT, on the same model
quantized by transformers + bitsandbytes 0.50.2 at load (NF4, double quant, compute dtype float32, the CPU bf16
repacking off), and compares the logits with peft-rs's (`peft eval --quantize nf4 --double-quant --save-logits`).

Usage: bash scripts/check_qlora_adapter.sh   (or: python scripts/check_qlora_adapter.py HF_DIR ADAPTER RUST_LOGITS)
"""
import sys

import bitsandbytes as bnb
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from check_trained_adapter import compare  # noqa: E402


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
    print(f"{n4} bnb Linear4bit layers")
    return 0 if compare(model, adapter_dir, rust_path) else 1


if __name__ == "__main__":
    sys.exit(main())
