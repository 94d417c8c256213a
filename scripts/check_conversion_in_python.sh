#!/usr/bin/env bash
# Adapters converted to LoRA by `peft convert-adapter` load in Python PEFT and equal PEFT's own conversion: for
# every case of fixtures/lora/conversion/ that PEFT converts, the release binary converts the same source adapter
# at the same rank, and fixtures/lora/check_rust_conversion.py loads the result with PeftModel.from_pretrained and
# compares config, keys, products B·A and outputs with PEFT's. Prints one table; exits non-zero on any FAIL.
# Needs the reference venv (bash ../shared/oracle/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
[ -x "$py" ] || { echo "no Python reference at $py: run 'bash ../shared/oracle/setup.sh' first" >&2; exit 1; }
cargo build --release -q -p peft-cli || exit 1
peft="${CARGO_TARGET_DIR:-target}/release/peft"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dir in fixtures/lora/conversion/*/; do
    case_name="$(basename "$dir")"
    read -r src rank model err < <("$py" -c "
import json,sys; c=json.load(open('$dir/case.json'))
print(c['source'], c['rank'], c['model'], 'error' in c)")
    [ "$err" = "True" ] && continue
    if [ "${model#llama}" != "$model" ]; then base="fixtures/$src/base_hf"; else continue; fi
    "$peft" convert-adapter --base "$base" --adapter "fixtures/$src/adapter" --to lora --rank "$rank" \
        --output "$out/$case_name" >/dev/null || { echo "$case_name: peft convert-adapter failed" >&2; exit 1; }
done
"$py" fixtures/lora/check_rust_conversion.py "$out"
