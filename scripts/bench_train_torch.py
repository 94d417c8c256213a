#!/usr/bin/env python
"""LoRA training steps of SmolLM2-135M in PyTorch + PEFT 0.21.2, timed: the reference for `peft train`.

    python scripts/bench_train_torch.py <hf model dir> [steps] [--batch 4] [--seq-len 64]
        [--gradient-checkpointing on|off] [--dtype f32|bf16]

Same work as `scripts/bench_train_compare.sh` asks of peft-rs: LoRA r=8 alpha=16 on q_proj and v_proj,
AdamW lr 1e-3, batch × seq-len token ids (random, fixed seed; every row full length), forward + causal-LM loss +
backward + optimizer step. Prints per-step seconds, then one JSON line with every step time (warm-up step
excluded), their median and minimum.

`--gradient-checkpointing on`: transformers' `model.gradient_checkpointing_enable()` (non-reentrant, so the
frozen embedding's output needs no `requires_grad`), in training mode, as PEFT's QLoRA recipe does.
`--dtype bf16`: the base weights are loaded in bfloat16 (`dtype=torch.bfloat16`); PEFT keeps the LoRA weights
in float32 (`autocast_adapter_dtype`, its default), so the frozen projections multiply in bf16 on the CPU and
the adapters in f32 (LoRA casts its input to the adapter dtype); the logits come out bf16 and the loss is
computed on them upcast to f32 by transformers. No `torch.autocast`.
"""

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("steps", nargs="?", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()

    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype)
    if a.gradient_checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    vocab = model.config.vocab_size
    times = []
    for i in range(a.steps + 1):
        ids = torch.randint(0, vocab, (a.batch, a.seq_len))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        print(f"step {i}: {dt:.3f} s (loss {loss.item():.4f})", file=sys.stderr)
    print(
        json.dumps(
            {
                "torch_threads": torch.get_num_threads(),
                "step_times_s": times,
                "median_s": statistics.median(times),
                "min_s": min(times),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
