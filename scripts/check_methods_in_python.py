"""Checks that every adapter method peft-rs trains also loads in Python PEFT with the same outputs.

Usage (from the repository root; bash scripts/check_methods_in_python.sh does everything):
    python scripts/check_methods_in_python.py build-tiny TOKENIZER_HF_DIR OUT_DIR
    python scripts/check_methods_in_python.py compare TINY_HF_DIR METHODS_DIR NAME [NAME ...]
    python scripts/check_methods_in_python.py init-adapter TINY_HF_DIR CONFIG_JSON OUT_DIR

`build-tiny` writes a seeded f32 tiny Llama (2 layers, hidden 64) with SmolLM2's tokenizer.
`init-adapter` writes PEFT's fresh adapter of CONFIG_JSON on the tiny Llama (get_peft_model + save_pretrained), for
the methods whose initialisation only PEFT can do (FRoD), which `peft train --init-adapter` then trains.
`compare` reads, for each NAME, METHODS_DIR/NAME/{summary.json, adapter/, rust_logits.safetensors}
(`peft train` / `peft eval --save-logits`), runs PeftModel.from_pretrained on the same input_ids and
attention_mask, cuts the virtual-token positions for prompt tuning / P-tuning (Rust saves the real-token
logits only), compares on the attended positions and prints one table; exits 1 on any FAIL.
"""
import json
import os
import shutil
import sys

import torch

TOL = 1e-4


def build_tiny(tok_dir: str, out: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer

    src_cfg = json.load(open(os.path.join(tok_dir, "config.json")))
    vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size()
    vocab = max(vocab, src_cfg.get("vocab_size", 0))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=src_cfg.get("bos_token_id"),
                      eos_token_id=src_cfg.get("eos_token_id"), pad_token_id=src_cfg.get("pad_token_id"))
    model = LlamaForCausalLM(cfg).to(torch.float32)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(tok_dir, f)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(out, f))
    print(f"tiny llama: {out} (vocab {vocab}, {sum(p.numel() for p in model.parameters())} params)")
    return 0


def init_adapter(base_dir: str, config_json: str, out: str) -> int:
    from peft import get_peft_config, get_peft_model
    from transformers import AutoModelForCausalLM

    config = get_peft_config(json.load(open(config_json)))
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    torch.manual_seed(0)
    get_peft_model(model, config).save_pretrained(out)
    return 0


def compare_one(base_dir: str, mdir: str):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary = json.load(open(os.path.join(mdir, "summary.json")))
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    saved = json.load(open(os.path.join(mdir, "adapter", "adapter_config.json")))
    if saved["peft_type"] == "BOFT":
        # Stock CPU PEFT cannot build its CUDA block-diagonal extension and would load one butterfly factor only:
        # emulate the extension (fixtures/boft/boft_emulation.py) so that factors >= 2 run PEFT's own layer code.
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "boft"))
        import boft_emulation

        boft_emulation.enable()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(mdir, "adapter"))
    model.eval()
    cfg = model.peft_config["default"]
    ptype = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    rust = load_file(os.path.join(mdir, "rust_logits.safetensors"))
    ids = rust["input_ids"].long()
    mask = rust["attention_mask"].long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    if ptype in ("PROMPT_TUNING", "P_TUNING"):
        logits = logits[:, cfg.num_virtual_tokens:, :]
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids, attention_mask=mask).logits.float()
    ours = rust["logits"].float()
    if logits.shape != ours.shape:
        raise RuntimeError(f"shape: python {tuple(logits.shape)} vs rust {tuple(ours.shape)}")
    keep = mask.bool()
    diff = (logits - ours).abs()[keep]
    scale = logits.abs()[keep].max()
    maxdiff = diff.max().item()
    rel = maxdiff / scale.item()
    # How far the adapter moves the logits: shows the comparison is not vacuous.
    effect = (logits - plain).abs()[keep].max().item()
    return ptype, before, after, effect, maxdiff, rel


def compare(base_dir: str, methods_dir: str, names) -> int:
    rows, failed = [], False
    for name in names:
        mdir = os.path.join(methods_dir, name)
        try:
            ptype, before, after, effect, maxdiff, rel = compare_one(base_dir, mdir)
            lowered = after < before
            ok = lowered and rel <= TOL
            note = "" if lowered else " (loss not lowered)"
            rows.append((name, ptype, f"{before:.4f} -> {after:.4f}", f"{effect:.3e}", f"{maxdiff:.3e}", f"{rel:.3e}",
                         ("PASS" if ok else "FAIL") + note))
        except Exception as e:  # noqa: BLE001 - reported in the table
            ok = False
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            loss = "-"
            sp = os.path.join(mdir, "summary.json")
            if os.path.exists(sp):
                s = json.load(open(sp))
                loss = f"{s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}"
            rows.append((name, "-", loss, "-", "-", "-", f"FAIL ({type(e).__name__}: {msg[:90]})"))
        failed |= not ok
    head = ("method", "peft_type", "eval loss before -> after", "max |adapter effect|", "max |py - rust|", "relative", f"result (rel <= {TOL:g})")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print(line(head))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    return 1 if failed else 0


def main() -> int:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if sys.argv[1] == "build-tiny":
        return build_tiny(sys.argv[2], sys.argv[3])
    if sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3], sys.argv[4:])
    if sys.argv[1] == "init-adapter":
        return init_adapter(sys.argv[2], sys.argv[3], sys.argv[4])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
