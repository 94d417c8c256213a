#!/usr/bin/env python
"""A mixed batch of 8 LoRA adapters against one adapter for every row, in transformers + PEFT 0.21.2: the
reference for `scripts/bench_mixed_compare.sh`.

    python scripts/bench_mixed_torch.py save <hf model dir> <work dir>
    python scripts/bench_mixed_torch.py time <hf model dir> <work dir> <rounds>

`save` writes 8 LoRA adapters `a0` … `a7` (r=16, alpha=32 on q_proj, k_proj, v_proj, o_proj;
`init_lora_weights=False`, so A and B are random and every adapter changes the output) with PEFT's
`save_pretrained`, and `ids.safetensors`: 8 rows × 128 random token ids. Both sides load these files.
`time` loads the f32 model and the 8 adapters (unmerged), warms up, then per round times one forward
(full logits [8, 128, vocab], `torch.inference_mode()`) in each scenario, in turn:
  single: `set_adapter("a0")`, every row with a0;
  mixed:  `adapter_names=["a0", …, "a7"]`, row i with a_i.
It writes the mixed scenario's last-position logits [8, vocab] to `<work dir>/torch_last.safetensors` (the Rust
side compares its own with them) and prints one JSON line with every time.
"""

import json
import sys
import time

import torch


def main() -> int:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    mode, model_dir, work = sys.argv[1:4]
    names = [f"a{i}" for i in range(8)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "save":
        for name in names:
            cfg = LoraConfig(
                r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                init_lora_weights=False,
            )
            pm = get_peft_model(model, cfg)
            pm.save_pretrained(f"{work}/{name}")
            model = pm.unload()
        ids = torch.randint(3, model.config.vocab_size, (8, 128), dtype=torch.int64)
        save_file({"input_ids": ids}, f"{work}/ids.safetensors")
        return 0
    rounds = int(sys.argv[4])
    pm = PeftModel.from_pretrained(model, f"{work}/a0", adapter_name="a0")
    for name in names[1:]:
        pm.load_adapter(f"{work}/{name}", adapter_name=name)
    pm.eval()
    ids = load_file(f"{work}/ids.safetensors")["input_ids"]

    def single():
        pm.set_adapter("a0")
        return pm(input_ids=ids).logits

    def mixed():
        return pm(input_ids=ids, adapter_names=names).logits

    times = {"single": [], "mixed": []}
    with torch.inference_mode():
        last = mixed()[:, -1, :].contiguous()
        single()
        for _ in range(rounds):
            for name, f in (("single", single), ("mixed", mixed)):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    save_file({"last": last}, f"{work}/torch_last.safetensors")
    print(json.dumps({"torch_threads": torch.get_num_threads(), **times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
