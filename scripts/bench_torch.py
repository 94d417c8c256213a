#!/usr/bin/env python3
"""PyTorch + PEFT 0.21.2 reference for crates/peft/benches/lora_forward.rs.

Linear(2048, 2048) with bias, x [512, 2048] f32, LoRA r=16 alpha=32 (random A and B), eval mode under
torch.inference_mode(), 2 threads. Runs warm-up calls, then N interleaved (plain, LoRA unmerged, LoRA merged)
triples, alternating their order, and prints the median and minimum of each and the median of the per-triple
ratios LoRA/plain and merged/plain. The last line is JSON (read by scripts/bench_compare.sh).

    $PEFT_ORACLE_VENV/bin/python scripts/bench_torch.py [--n 200]
"""

import argparse
import copy
import json
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
    ap.add_argument("--n", type=int, default=200, help="interleaved triples (default 200)")
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
        tp, tl, tm = [], [], []
        for i in range(args.n):
            if i % 2 == 0:
                p = time_ms(plain, x)
                l = time_ms(lora, x)
                m = time_ms(merged, x)
            else:
                m = time_ms(merged, x)
                l = time_ms(lora, x)
                p = time_ms(plain, x)
            tp.append(p)
            tl.append(l)
            tm.append(m)

    rl = [l / p for l, p in zip(tl, tp)]
    rm = [m / p for m, p in zip(tm, tp)]
    med = statistics.median
    print(
        f"PyTorch {torch.__version__} + PEFT LoRA forward, Linear({IN},{OUT}), x [{TOKENS},{IN}] f32, r={R}; "
        f"{args.n} interleaved triples, {torch.get_num_threads()} threads"
    )
    print(f"{'':<16} {'median ms':>10} {'min ms':>10}")
    for name, v in (("plain linear", tp), ("LoRA unmerged", tl), ("LoRA merged", tm)):
        print(f"{name:<16} {med(v):>10.3f} {min(v):>10.3f}")
    print(f"median per-pair ratio LoRA/plain   {med(rl):.4f}")
    print(f"median per-pair ratio merged/plain {med(rm):.4f}")
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
