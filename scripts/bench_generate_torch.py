#!/usr/bin/env python
"""Greedy generation with the KV cache and an unmerged LoRA adapter on SmolLM2-135M in transformers + PEFT
0.21.2, timed: the reference for `peft generate` (scripts/bench_generate_compare.sh).

    python scripts/bench_generate_torch.py save <hf model dir> <adapter dir>
    python scripts/bench_generate_torch.py time <hf model dir> <adapter dir> <prompt> <new tokens> <runs>

`save` writes a LoRA adapter (r=8, alpha=16, q_proj and v_proj, `init_lora_weights=False`: random A and B, so
the adapter changes the output) with PEFT's `save_pretrained`; both sides load it.
`time` loads the f32 model and the adapter (`PeftModel.from_pretrained`, unmerged), then per run times
`generate(max_new_tokens=1)` (prompt + first token) and `generate(max_new_tokens=N)`, greedy, KV cache on, EOS
ignored (`min_new_tokens=N`: always N tokens), and reports the decode rate (N − 1) / (t_N − t_1) tokens/s and the
end-to-end rate N / t_N. The last line is JSON with every run, medians, the best run and the completion text.
"""

import json
import statistics
import sys
import time

import torch


def main() -> int:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mode, model_dir, adapter_dir = sys.argv[1:4]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "save":
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, cfg).save_pretrained(adapter_dir)
        return 0
    prompt, n, runs = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = tok(prompt, return_tensors="pt")

    def gen(k):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                **ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True,
                pad_token_id=tok.eos_token_id,
            )
            return time.perf_counter() - t0, out

    gen(n)  # warm-up
    decode, e2e, text = [], [], None
    for _ in range(runs):
        t1, _ = gen(1)
        tn, out = gen(n)
        decode.append((n - 1) / (tn - t1))
        e2e.append(n / tn)
        new = out[0, ids["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=False)
        print(f"decode {decode[-1]:.1f} tok/s, end to end {e2e[-1]:.1f} tok/s ({len(new)} new tokens)", file=sys.stderr)
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "new_tokens": n,
        "decode_tok_s": decode,
        "e2e_tok_s": e2e,
        "decode_median": statistics.median(decode),
        "decode_best": max(decode),
        "text": text,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
