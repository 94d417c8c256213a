#!/usr/bin/env python3
"""Writes a tiny servable model directory for `peft serve` checks and benchmarks.

The fixtures' tiny Llama (`fixtures/lora/cases/llama_two_adapters/base_hf`: 2 layers, hidden 32, vocab 64)
has no tokenizer; this copies it to OUT_DIR with a word-level `tokenizer.json` (`<unk> <s> </s> <|im_start|>
<|im_end|>` then the words `w5` … `w63`) and a ChatML chat template, so text prompts, chat and decoding work.
The fixtures' LoRA adapters (llama_two_adapters, llama_all_linear, llama_qv) fit it.

Usage: serve_tiny_model.py OUT_DIR
"""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures/lora/cases/llama_two_adapters/base_hf"
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(BASE / f, out / f)
    vocab_size = json.loads((BASE / "config.json").read_text())["vocab_size"]
    words = SPECIAL + [f"w{i}" for i in range(len(SPECIAL), vocab_size)]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIAL)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHATML,
    }))
    print(out)


if __name__ == "__main__":
    main()
