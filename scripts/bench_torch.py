#!/usr/bin/env python3
"""PyTorch + PEFT 0.21.2 reference for crates/peft/benches/lora_forward.rs.

Linear(2048, 2048) with bias, x [512, 2048] f32, LoRA r=16 alpha=32 (random A and B), eval mode under
torch.inference_mode(), 2 threads. Runs warm-up calls, then N interleaved (plain, LoRA unmerged, LoRA merged)
rounds (each in a random order), and prints the median and minimum of each and the median of the
per-round ratios LoRA/plain and merged/plain. The last line is JSON (read by scripts/bench_compare.sh).

    $PEFT_ORACLE_VENV/bin/python scripts/bench_torch.py [--n 200]
"""

import argparse
import copy
import json
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

IN = OUT = 2048
TOKENS = 512
R = 16
ALPHA = 32


class Tiny(torch.nn.Module):
    """One Linear, so that PEFT has a module to target."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(IN, OUT)

    def forward(self, x):
        return self.lin(x)


def time_ms(f, x):
    t = time.perf_counter()
    y = f(x)
    del y
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="interleaved rounds (default 200)")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    plain = Tiny().eval()
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(plain), cfg).eval()
    merged = copy.deepcopy(lora)
    merged.merge_adapter()
    x = torch.randn(TOKENS, IN)

    with torch.inference_mode():
        diff = (lora(x) - merged(x)).abs().max().item()
        assert diff < 1e-3, f"merged and unmerged LoRA outputs differ by {diff}"
        for _ in range(10):
            for m in (plain, lora, merged):
                time_ms(m, x)
        # One round times every variant once, in a fresh random order (seeded), so that no variant always
        # follows the same other one.
        models = (plain, lora, merged)
        times = [[], [], []]
        order_rng = random.Random(2)
        order = [0, 1, 2]
        for _ in range(args.n):
            order_rng.shuffle(order)
            for v in order:
                times[v].append(time_ms(models[v], x))
        tp, tl, tm = times

    rl = [l / p for l, p in zip(tl, tp)]
    rm = [m / p for m, p in zip(tm, tp)]
    med = statistics.median
    print(
        f"PyTorch {torch.__version__} + PEFT LoRA forward, Linear({IN},{OUT})+bias, x [{TOKENS},{IN}] f32, r={R}; "
        f"{args.n} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print(f"{'':<16} {'median ms':>10} {'min ms':>10} {'ratio to plain':>14}")
    for name, v, r in (("plain linear", tp, None), ("LoRA unmerged", tl, rl), ("LoRA merged", tm, rm)):
        ratio = f"{med(r):>14.4f}" if r else f"{1.0:>14.4f}"
        print(f"{name:<16} {med(v):>10.3f} {min(v):>10.3f} {ratio}")
    print("(ratio: median of the per-round ratios)")
    out = {
        "impl": "pytorch",
        "n": args.n,
        "threads": torch.get_num_threads(),
        "plain_median_ms": round(med(tp), 4),
        "plain_min_ms": round(min(tp), 4),
        "lora_median_ms": round(med(tl), 4),
        "lora_min_ms": round(min(tl), 4),
        "merged_median_ms": round(med(tm), 4),
        "merged_min_ms": round(min(tm), 4),
        "lora_ratio_median": round(med(rl), 4),
        "merged_ratio_median": round(med(rm), 4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
