#!/usr/bin/env bash
# Greedy generation tokens/s on SmolLM2-135M (f32) with the KV cache and an unmerged LoRA adapter (r=8, alpha=16,
# q_proj / v_proj, random A and B, written by PEFT's save_pretrained and loaded by both sides): `peft generate`
# vs transformers' `generate` + PEFT 0.21.2, same prompt, same number of new tokens, interleaved (ours, torch,
# ours, torch, …) so that the medians come from one session.
#
# Decode rate = (N − 1) / (t_N − t_1): t_1 is the time to the first token (load, prompt, one token), t_N the time
# to N tokens. Ours: two `peft generate` processes per round (--max-new-tokens 1 and N, wall clock, so model
# loading cancels out); torch: one process per round (scripts/bench_generate_torch.py: a warm-up, then
# generate(1) and generate(N) in process, min_new_tokens = N). The completions are compared (the same greedy
# tokens unless EOS came first on our side, which stops at EOS). The last line is the ratio peft-rs / PyTorch.
#
# Environment: NEW [64] new tokens, ROUNDS [5], PROMPT ["ROMEO:"], PEFT_BIN [build target/release/peft].
# Needs the reference venv (PEFT_ORACLE_VENV, or bash ../shared/oracle/setup.sh) and the model.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
new="${NEW:-64}"
rounds="${ROUNDS:-5}"
prompt="${PROMPT:-ROMEO:}"
hf=target/smollm2-hf
# PEFT_BIN: a peft binary to run instead of building target/release/peft.
peft_bin="${PEFT_BIN:-target/release/peft}"
[ -n "${PEFT_BIN:-}" ] || cargo build --release -q -p peft-cli
if [ ! -f "$hf/tokenizer.json" ]; then
    gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)"
    "$peft_bin" convert --model "$gguf" --output "$hf"
fi
work=target/bench-generate
rm -rf "$work"
mkdir -p "$work"
adapter="$work/adapter"
"$py" scripts/bench_generate_torch.py save "$hf" "$adapter" 2>/dev/null
now() { date +%s.%N; }
ours() {
    "$peft_bin" generate --model "$hf" --adapter "$adapter" --prompt "$prompt" --max-new-tokens "$1"
}
ours 2 >/dev/null # warm the page cache
for i in $(seq 1 "$rounds"); do
    t0=$(now)
    ours 1 >/dev/null
    t1=$(now)
    ours "$new" >"$work/ours-$i.txt"
    t2=$(now)
    echo "$t0 $t1 $t2" >"$work/ours-$i.times"
    "$py" scripts/bench_generate_torch.py time "$hf" "$adapter" "$prompt" "$new" 1 2>/dev/null |
        tail -n 1 >"$work/torch-$i.json"
    echo "round $i of $rounds done" >&2
done
"$py" - "$work" "$rounds" "$new" "$prompt" <<'PY'
import json, statistics, sys
work, rounds, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ours, torch, threads = [], [], None
for i in range(1, rounds + 1):
    t0, t1, t2 = map(float, open(f"{work}/ours-{i}.times").read().split())
    ours.append((n - 1) / ((t2 - t1) - (t1 - t0)))
    t = json.loads(open(f"{work}/torch-{i}.json").read())
    torch += t["decode_tok_s"]
    threads = t["torch_threads"]
ours_text = open(f"{work}/ours-{rounds}.txt").read().rstrip("\n")
same = ours_text == t["text"]
med = statistics.median
print(f"SmolLM2-135M f32 + unmerged LoRA r=8 q,v, greedy, KV cache, prompt {prompt!r}, {n} new tokens; "
      f"{rounds} interleaved rounds")
print(f"peft-rs  : decode median {med(ours):.1f} tok/s, best {max(ours):.1f}, worst {min(ours):.1f}")
print(f"PyTorch  : decode median {med(torch):.1f} tok/s, best {max(torch):.1f}, worst {min(torch):.1f} "
      f"({threads} threads)")
print(f"completions {'identical' if same else 'DIFFER'}" + ("" if same else f": ours {ours_text!r} vs torch {t['text']!r}"))
print(f"peft-rs / PyTorch tokens/s: median {med(ours) / med(torch):.2f}x, best {max(ours) / max(torch):.2f}x")
PY
