#!/usr/bin/env python
"""One LoRA training step of SmolLM2-135M in PyTorch + PEFT 0.21.2, timed: the reference for `peft train`.

    python scripts/bench_train_torch.py <hf model dir> [steps]

Same work as `scripts/bench_train_compare.sh` asks of peft-rs: f32, LoRA r=8 alpha=16 on q_proj and v_proj,
AdamW lr 1e-3, batch 4×64 token ids (random, fixed seed), forward + causal-LM loss + backward + optimizer
step. Prints per-step seconds, then one JSON line with the median and minimum (warm-up step excluded).
"""

import json
import statistics
import sys
import time

import torch


def main() -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, (4, 64))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        print(f"step {i}: {dt:.3f} s (loss {loss.item():.4f})", file=sys.stderr)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "median_s": statistics.median(times), "min_s": min(times)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
