"""Loads an adapter trained by `peft train` into Python PEFT on the same dequantized f32 weights and compares
the logits with the ones peft-rs computed.

Usage (from the repository root, after scripts/train_smollm2.sh):
    bash scripts/check_trained_adapter.sh            # does everything below
    python scripts/check_trained_adapter.py HF_DIR ADAPTER_DIR RUST_LOGITS.safetensors

HF_DIR is the GGUF written as an HF directory by `peft convert`; RUST_LOGITS comes from
`peft eval --save-logits` (input_ids, attention_mask, logits of the first batch).
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def compare(model, adapter_dir, rust_path) -> bool:
    """Python PEFT's logits on the inputs `peft eval --save-logits` wrote, against Rust's; prints the report."""
    rust = load_file(rust_path)
    ids = rust["input_ids"].long()
    mask = rust["attention_mask"].long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    ours = rust["logits"].float()
    keep = mask.bool()
    diff = (logits - ours).abs()[keep]
    scale = logits.abs()[keep].max()
    rel = (diff.max() / scale).item()
    print(f"adapter: {adapter_dir}")
    print(f"peft_type: {model.peft_config['default'].peft_type}, targets: {sorted(model.peft_config['default'].target_modules)}")
    print(f"logits {tuple(ours.shape)}: max |python - rust| = {diff.max().item():.3e}, max |logit| = {scale.item():.2f}, "
          f"relative = {rel:.3e}")
    argmax_agree = (logits.argmax(-1) == ours.argmax(-1))[keep].float().mean().item()
    print(f"argmax agreement on {int(keep.sum())} positions: {argmax_agree * 100:.2f}%")
    ok = rel <= 1e-3
    print("PASS (relative 1e-3)" if ok else "FAIL (relative 1e-3)")
    return ok


def main() -> int:
    hf_dir, adapter_dir, rust_path = sys.argv[1:4]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return 0 if compare(model, adapter_dir, rust_path) else 1


if __name__ == "__main__":
    sys.exit(main())
