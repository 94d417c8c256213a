#!/usr/bin/env bash
# `peft serve` under a bounded loopback load: the tiny fixture model with 4 LoRA adapters, 32 concurrent
# clients, 200 greedy requests of 16 tokens each (ignore_eos), round-robin over the adapters; prints throughput
# and p50 / p99 latency (scripts/bench_serve.py).
#
# Usage: scripts/bench_serve.sh [extra bench_serve.py args]
#   PEFT_BIN=…   the binary (default target/release/peft, else target/debug/peft)
#   MODEL=…      another model instead of the tiny one (served with no adapters; the load targets the base)
#   ADAPTERS=…   with MODEL: adapters to serve, NAME=DIR,NAME=DIR,… (the load goes round-robin over them)
#   MAX_BATCH=…  --max-batch (default 16)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
bin="${PEFT_BIN:-}"
if [[ -z "$bin" ]]; then
  if [[ -x "$root/target/release/peft" ]]; then bin="$root/target/release/peft"; else bin="$root/target/debug/peft"; fi
fi
tmp="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
cases="$root/fixtures/lora/cases"
port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
if [[ -n "${MODEL:-}" ]]; then
  args=(--model "$MODEL" --served-model-name base); models=base
  if [[ -n "${ADAPTERS:-}" ]]; then
    models=""
    IFS=, read -ra specs <<< "$ADAPTERS"
    for spec in "${specs[@]}"; do
      args+=(--adapter "$spec"); models="${models:+$models,}${spec%%=*}"
    done
  fi
else
  "$py" "$root/scripts/serve_tiny_model.py" "$tmp/tiny" >/dev/null
  args=(--model "$tmp/tiny" --served-model-name base
        --adapter "a=$cases/llama_two_adapters/adapter" --adapter "b=$cases/llama_two_adapters/adapter/other"
        --adapter "c=$cases/llama_all_linear/adapter" --adapter "d=$cases/llama_qv/adapter")
  models=a,b,c,d
fi
echo "$ $bin serve ${args[*]} --port $port --max-batch ${MAX_BATCH:-16}"
"$bin" serve "${args[@]}" --port "$port" --max-batch "${MAX_BATCH:-16}" > "$tmp/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  grep -q "http://" "$tmp/server.log" 2>/dev/null && break
  sleep 0.2
done
cat "$tmp/server.log"
"$py" "$root/scripts/bench_serve.py" --url "http://127.0.0.1:$port" --models "$models" "$@"
kill -TERM "$pid"; wait "$pid" || true
tail -1 "$tmp/server.log"
