#!/usr/bin/env bash
# llama.cpp check of `peft export --format gguf` (outside CI): runs llama.cpp itself, through llama-cpp-python,
# on the tiny Llama of fixtures/gguf_lora with
#   - no adapter,
#   - the adapter GGUF written by llama.cpp's own convert_lora_to_gguf.py (fixtures/gguf_lora/cases/*/converter_*.gguf),
#   - the adapter GGUF written by `peft export` (in target/gguf-lora-check/),
# and compares the logits with each other and with PEFT's (fixtures/gguf_lora/cases/*/io.safetensors).
# llama.cpp runs with an f32 KV cache (its f16 default alone costs ~1e-3). Seen here: ours == the converter's (0.0)
# except rslora_r8, where the converter ignores use_rslora (1.7 off PEFT) and ours bakes it into alpha; f32
# adapters within 4e-6 of PEFT, f16 within 6e-3, q8_0 within 9e-2 (Q8_0 lora_a, quantized activations).
#
# First run builds llama-cpp-python 0.3.36 from its sdist (llama.cpp vendored; CPU only, one compile job at
# nice 19: ~30-60 min on a shared 2-core machine) into $PEFT_LLAMACPP_VENV (default ~/.cache/peft-llamacpp);
# later runs reuse it. `--build-only` stops after the build. Needs the quantization reference venv for
# convert_hf_to_gguf.py (torch): $PEFT_QUANT_VENV (default ~/.cache/peft-quant-oracle).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="${PEFT_LLAMACPP_VENV:-$HOME/.cache/peft-llamacpp}"
qpy="${PEFT_QUANT_VENV:-$HOME/.cache/peft-quant-oracle}/bin/python"
version=0.3.36
cache="$root/.cache/llamacpp"
sdist="$cache/llama_cpp_python-$version.tar.gz"
src="$cache/llama_cpp_python-$version"

if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    mkdir -p "$cache"
    if [ ! -f "$sdist" ]; then
        "$qpy" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$cache"
    fi
    [ -d "$src" ] || tar xzf "$sdist" -C "$cache"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy safetensors
    echo "building llama-cpp-python $version (CPU, 1 job, nice 19); this takes a while" >&2
    CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF" \
        nice -n 19 "$venv/bin/pip" install -v --no-cache-dir "$sdist"
fi
"$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
if [ "${1:-}" = "--build-only" ]; then
    exit 0
fi

out="$root/target/gguf-lora-check"
mkdir -p "$out"
# The dev profile is optimized in this workspace, and the tests build it anyway (PEFT_BIN overrides).
peft="${PEFT_BIN:-target/debug/peft}"
[ -n "${PEFT_BIN:-}" ] || cargo build -q --workspace
# The base as GGUF F32 by llama.cpp's own converter (the vendored gguf-py; a stub vocab, see the .py).
PYTHONPATH="$src/vendor/llama.cpp/gguf-py" "$qpy" fixtures/gguf_lora/llamacpp_check.py prepare \
    --src "$src/vendor/llama.cpp" --out "$out"
for case_dir in fixtures/gguf_lora/cases/*/; do
    case_name="$(basename "$case_dir")"
    for t in f32 f16 q8_0; do
        "$peft" export --adapter "$case_dir/adapter" --format gguf --base fixtures/models/cases/llama_gqa \
            --outtype "$t" --output "$out/${case_name}_ours_$t.gguf" >/dev/null
    done
done
"$venv/bin/python" fixtures/gguf_lora/llamacpp_check.py compare --out "$out"
