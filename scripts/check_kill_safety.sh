#!/usr/bin/env bash
# Crash safety check: kills `peft` with SIGKILL at random moments during each writing operation and checks that
# the output is either the old state or the complete new one, that the next normal run removes every temporary
# a killed run left, and that `--resume checkpoints/last` after a killed training run reproduces the loss curve
# of an uninterrupted run. Prints one table row per operation; exits non-zero if any output is corrupted or a
# temporary survives the next run.
#
#   bash scripts/check_kill_safety.sh            # KILLS=20 per operation (bounded: a few minutes in all)
#   KILLS=5 PEFT=target/debug/peft bash scripts/check_kill_safety.sh
#
# The models are synthetic (a random 4-layer Llama of ~15 MB, written by Python's standard library, plus the
# same model in two shards), so that no download is needed; with target/smollm2-hf present (an HF directory
# of SmolLM2-135M) the two merges are also run on it (SMOLLM2=0 skips it). Everything is deterministic: the
# uninterrupted runs give the reference outputs (sha256) and loss curve.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-20}
if (( KILLS < 1 || KILLS > 200 )); then
    echo "KILLS must be in 1..200" >&2
    exit 2
fi
PEFT=${PEFT:-target/release/peft}
if [[ ! -x $PEFT ]]; then
    echo "building the release binary ($PEFT)" >&2
    cargo build --release -p peft-cli >&2
fi
PEFT=$(realpath "$PEFT")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/peft-kill.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------------------
# Fixtures: a random Llama (single file and two shards), token data, a LoRA adapter trained on it.
# ---------------------------------------------------------------------------------------------------------
python3 - "$WORK" <<'EOF'
import array, json, os, random, struct, sys
work = sys.argv[1]
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
       "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
       "vocab_size": 2048, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
shapes = [("model.embed_tokens.weight", (v, h))]
for l in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{l}."
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        shapes.append((p + f"self_attn.{n}.weight", (h, h)))
    shapes += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
               (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
               (p + "post_attention_layernorm.weight", (h,))]
shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
rng = random.Random(0)
data = {}
for name, shape in shapes:
    n = 1
    for d in shape:
        n *= d
    if name.endswith("norm.weight"):
        data[name] = array.array("f", [1.0]) * n
    else:
        data[name] = array.array("f", (rng.gauss(0.0, 0.05) for _ in range(n)))

def write(path, names):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = len(data[name]) * 4
        header[name] = {"dtype": "F32", "shape": list(dict(shapes)[name]), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name in names:
            data[name].tofile(f)
    return off

for d in ["base", "sharded"]:
    os.makedirs(f"{work}/{d}", exist_ok=True)
    with open(f"{work}/{d}/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
names = [n for n, _ in shapes]
write(f"{work}/base/model.safetensors", names)
half = len(names) // 2
parts = [names[:half], names[half:]]
total, wmap = 0, {}
for k, part in enumerate(parts):
    fname = f"model-0000{k + 1}-of-00002.safetensors"
    total += write(f"{work}/sharded/{fname}", part)
    wmap.update({n: fname for n in part})
with open(f"{work}/sharded/model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
with open(f"{work}/data.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [rng.randrange(3, v) for _ in range(33)]}) + "\n")
EOF

train() { # train OUT SEED STEPS [extra flags...]
    local out=$1 seed=$2 steps=$3
    shift 3
    "$PEFT" train --model "$WORK/base" --data "$WORK/data.jsonl" --output "$out" --seed "$seed" \
        --steps "$steps" --batch-size 4 --seq-len 32 --r 8 --alpha 16 --lr 1e-2 --quiet "$@"
}

# The adapters the merges use (trained here: a LoRA r=8 on q_proj, v_proj).
train "$WORK/ad_run" 1 3 >/dev/null 2>&1
ADAPTER=$WORK/ad_run/adapter

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
now() { date +%s.%N; }
# Runs a command in the background, kills it with SIGKILL after a random delay in [0, MAX) seconds and waits
# until it is gone.
# With LATE=1 the delay is drawn from the last half of [0, MAX) instead (where an adapter save happens).
kill_after_random() { # MAX cmd...
    local max=$1
    shift
    local delay lo=0
    [[ ${LATE:-0} == 1 ]] && lo=0.5
    delay=$(awk -v m="$max" -v lo="$lo" -v r="$RANDOM$RANDOM" \
        'BEGIN { srand(r); printf "%.3f", (lo + rand() * (1 - lo)) * m }')
    # Job control on: the command (a `peft` run, or a shell function that runs one) gets its own process
    # group, and the whole group is killed, so no `peft` outlives the kill.
    set -m
    "$@" >/dev/null 2>&1 &
    local pid=$!
    set +m
    sleep "$delay"
    kill -9 -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    while pgrep -g "$pid" >/dev/null 2>&1; do sleep 0.05; done
}
# sha256 of a file, or of a directory's files (names and contents, temporaries excluded), or "absent".
state_sha() {
    local p=$1
    if [[ -f $p ]]; then
        sha256sum <"$p" | cut -d' ' -f1
    elif [[ -d $p ]]; then
        (cd "$p" && find . -type f ! -name '.*' | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)
    else
        echo absent
    fi
}
# Temporaries of our naming pattern anywhere under a directory (or beside a path).
temps_in() {
    find "$@" -name '.*.tmp-*' -o -name '.*.old-*' -o -name '.*.gguf-base-*' 2>/dev/null | wc -l
}
# One table row: operation kills old new corrupted stale-left cleaned
ROWS=()
FAIL=0
row() {
    ROWS+=("$(printf '%-28s %5s %9s %12s %9s %17s %13s' "$@")")
    if (( $5 > 0 || $6 > 0 )); then FAIL=1; fi
}
elapsed() { # cmd... → prints the seconds it took (stdout, stderr of the command discarded)
    local t0 t1
    t0=$(now)
    "$@" >/dev/null 2>&1
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

# ---------------------------------------------------------------------------------------------------------
# 1, 2. peft merge: a single file over an existing older output, and a sharded directory.
# ---------------------------------------------------------------------------------------------------------
merge_check() { # LABEL BASE OUTPUT_NAME OLD(yes|no)
    local label=$1 base=$2 name=$3 with_old=$4
    local d=$WORK/m_$name
    rm -rf "$d" && mkdir -p "$d"
    local out=$d/$name
    "$PEFT" merge -b "$base" -a "$ADAPTER" -o "$out" --quiet >/dev/null
    local new
    new=$(state_sha "$out")
    local old=absent
    if [[ $with_old == yes ]]; then
        rm -rf "$out"
        "$PEFT" merge -b "$base" -a "$ADAPTER@0.5" -o "$out" --quiet >/dev/null
        old=$(state_sha "$out")
    fi
    local t
    t=$(elapsed "$PEFT" merge -b "$base" -a "$ADAPTER" -o "$d/timing_$name" --quiet)
    rm -rf "$d/timing_$name"
    local n_old=0 n_new=0 n_bad=0 n_left=0 n_clean=0
    for ((k = 0; k < KILLS; k++)); do
        if [[ $with_old == yes ]]; then
            rm -rf "$out"
            "$PEFT" merge -b "$base" -a "$ADAPTER@0.5" -o "$out" --quiet >/dev/null
        else
            rm -rf "$out"
        fi
        kill_after_random "$t" "$PEFT" merge -b "$base" -a "$ADAPTER" -o "$out" --quiet
        local s
        s=$(state_sha "$out")
        if [[ $s == "$old" ]]; then
            n_old=$((n_old + 1))
        elif [[ $s == "$new" ]]; then
            n_new=$((n_new + 1))
        else
            n_bad=$((n_bad + 1))
            echo "corrupted: $label after kill $k: $s" >&2
        fi
        # The next normal run (a directory output must not exist yet) removes what the killed one left.
        [[ -d $out ]] && rm -rf "$out"
        local log
        log=$("$PEFT" merge -b "$base" -a "$ADAPTER" -o "$out" --quiet 2>&1 >/dev/null) || {
            echo "the run after kill $k failed: $log" >&2
            n_bad=$((n_bad + 1))
        }
        n_clean=$((n_clean + $(grep -c 'removed stale temporary' <<<"$log" || true)))
        [[ $(state_sha "$out") == "$new" ]] || { n_bad=$((n_bad + 1)); echo "rerun differs: $label" >&2; }
        n_left=$((n_left + $(temps_in "$d")))
    done
    row "$label" "$KILLS" "$n_old" "$n_new" "$n_bad" "$n_left" "$n_clean"
}

merge_check "merge -> single file" "$WORK/base/model.safetensors" merged.safetensors yes
merge_check "merge -> sharded dir" "$WORK/sharded" merged_dir no
if [[ -d target/smollm2-hf && ${SMOLLM2:-1} != 0 ]]; then
    # A LoRA adapter for SmolLM2: one training step on the token data (ids below its vocabulary size).
    "$PEFT" train --model target/smollm2-hf --data "$WORK/data.jsonl" --output "$WORK/smol_ad" --steps 1 \
        --batch-size 1 --seq-len 16 --quiet >/dev/null 2>&1 && {
        SAVE_ADAPTER=$ADAPTER
        ADAPTER=$WORK/smol_ad/adapter
        K=$KILLS
        KILLS=$(( KILLS < 5 ? KILLS : 5 ))
        merge_check "merge SmolLM2 -> file" "$(ls target/smollm2-hf/*.safetensors | head -1)" smol.safetensors yes
        KILLS=$K
        ADAPTER=$SAVE_ADAPTER
    }
fi

# ---------------------------------------------------------------------------------------------------------
# 3. save_pretrained: `peft combine --output` (a new adapter directory) and the adapter `peft train` writes
#    over an existing run's adapter/.
# ---------------------------------------------------------------------------------------------------------
d=$WORK/combine
mkdir -p "$d"
combine() { "$PEFT" combine --base "$WORK/base" --adapter "a=$ADAPTER" --weights 0.7 --combination-type linear --output "$1"; }
combine "$d/ref" >/dev/null
new=$(state_sha "$d/ref")
t=$(elapsed combine "$d/timing")
n_old=0 n_new=0 n_bad=0 n_left=0 n_clean=0
for ((k = 0; k < KILLS; k++)); do
    rm -rf "$d/out"
    LATE=1 kill_after_random "$t" combine "$d/out"
    s=$(state_sha "$d/out")
    if [[ $s == absent ]]; then n_old=$((n_old + 1)); elif [[ $s == "$new" ]]; then n_new=$((n_new + 1)); else
        n_bad=$((n_bad + 1)); echo "corrupted: combine after kill $k" >&2; fi
    rm -rf "$d/out"
    log=$(combine "$d/out" 2>&1 >/dev/null) || { n_bad=$((n_bad + 1)); echo "rerun failed: $log" >&2; }
    n_clean=$((n_clean + $(grep -c 'removed stale temporary' <<<"$log" || true)))
    [[ $(state_sha "$d/out") == "$new" ]] || { n_bad=$((n_bad + 1)); echo "rerun differs: combine" >&2; }
    n_left=$((n_left + $(temps_in "$d")))
done
row "save_pretrained (combine)" "$KILLS" "$n_old" "$n_new" "$n_bad" "$n_left" "$n_clean"

# `peft train` over a run directory that already holds another run's complete adapter/.
d=$WORK/retrain
mkdir -p "$d"
train "$d/new" 42 2 >/dev/null 2>&1
new=$(state_sha "$d/new/adapter")
train "$d/old" 7 2 >/dev/null 2>&1
old=$(state_sha "$d/old/adapter")
t=$(elapsed train "$d/timing" 42 2)
n_old=0 n_new=0 n_bad=0 n_left=0 n_clean=0
for ((k = 0; k < KILLS; k++)); do
    rm -rf "$d/out" && cp -a "$d/old" "$d/out"
    LATE=1 kill_after_random "$t" train "$d/out" 42 2
    s=$(state_sha "$d/out/adapter")
    if [[ $s == "$old" ]]; then n_old=$((n_old + 1)); elif [[ $s == "$new" ]]; then n_new=$((n_new + 1)); else
        n_bad=$((n_bad + 1)); echo "corrupted: train adapter after kill $k: $s" >&2; fi
    log=$(train "$d/out" 42 2 2>&1 >/dev/null) || { n_bad=$((n_bad + 1)); echo "rerun failed: $log" >&2; }
    n_clean=$((n_clean + $(grep -c 'removed stale temporary' <<<"$log" || true)))
    [[ $(state_sha "$d/out/adapter") == "$new" ]] || { n_bad=$((n_bad + 1)); echo "rerun differs: train" >&2; }
    n_left=$((n_left + $(temps_in "$d/out")))
done
row "save_pretrained (train)" "$KILLS" "$n_old" "$n_new" "$n_bad" "$n_left" "$n_clean"

# ---------------------------------------------------------------------------------------------------------
# 4. Training checkpoints: kill, `--resume checkpoints/last` (or start over when no checkpoint exists yet),
#    and compare the train losses and the adapter with an uninterrupted run.
# ---------------------------------------------------------------------------------------------------------
d=$WORK/ckpt
mkdir -p "$d"
STEPS=40
train "$d/ref" 42 "$STEPS" --save-every 2 >/dev/null 2>&1
losses() { jq -c 'select(.kind == "train") | [.step, .loss]' "$1/metrics.jsonl"; }
ref_losses=$(losses "$d/ref")
ref_adapter=$(state_sha "$d/ref/adapter")
t=$(elapsed train "$d/timing" 42 "$STEPS" --save-every 2)
n_old=0 n_new=0 n_bad=0 n_left=0 n_clean=0
for ((k = 0; k < KILLS; k++)); do
    rm -rf "$d/out"
    kill_after_random "$t" train "$d/out" 42 "$STEPS" --save-every 2
    last=$d/out/checkpoints/last
    if [[ -L $last || -e $last ]]; then
        n_new=$((n_new + 1))
        log=$(train "$d/out" 42 "$STEPS" --save-every 2 --resume "$last" 2>&1 >/dev/null) || {
            n_bad=$((n_bad + 1)); echo "resume after kill $k failed: $log" >&2; }
    else
        n_old=$((n_old + 1))
        log=$(train "$d/out" 42 "$STEPS" --save-every 2 2>&1 >/dev/null) || {
            n_bad=$((n_bad + 1)); echo "rerun after kill $k failed: $log" >&2; }
    fi
    n_clean=$((n_clean + $(grep -c 'removed stale temporary' <<<"$log" || true)))
    if [[ $(losses "$d/out") != "$ref_losses" || $(state_sha "$d/out/adapter") != "$ref_adapter" ]]; then
        n_bad=$((n_bad + 1))
        echo "kill $k: the resumed run's losses or adapter differ from the uninterrupted run's" >&2
    fi
    n_left=$((n_left + $(temps_in "$d/out")))
done
row "training checkpoint+resume" "$KILLS" "$n_old" "$n_new" "$n_bad" "$n_left" "$n_clean"

# ---------------------------------------------------------------------------------------------------------
printf '%-28s %5s %9s %12s %9s %17s %13s\n' operation kills old-state new-complete corrupted "stale temps left" "temps cleaned"
for r in "${ROWS[@]}"; do echo "$r"; done
echo "(old-state: the previous output, or none; new-complete: byte-identical to an uninterrupted run's; for"
echo " training: old = killed before the first checkpoint, new = resumed from checkpoints/last; every run after"
echo " a kill must reproduce the uninterrupted losses and adapter; temps cleaned: lines the next run reported)"
if (( FAIL )); then
    echo "FAILED: corrupted outputs or stale temporaries" >&2
    exit 1
fi
echo "OK: 0 corrupted outputs"
