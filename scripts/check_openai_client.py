#!/usr/bin/env python3
"""The official `openai` Python client against `peft serve`.

Starts `peft serve` (target/release/peft, else target/debug/peft; or $PEFT_BIN) on the tiny fixture model
with two LoRA adapters (or on $MODEL with no adapters, e.g. the SmolLM2 HF directory), then uses `openai`
for: the models list, a greedy completion per model, streaming (checked equal to the non-streamed text), a chat
completion (streamed and not), a seeded sampled completion twice (equal), runtime load / unload of an adapter
(plain HTTP: they are vLLM endpoints, not OpenAI's), and an unknown model (openai.NotFoundError). Prints
what it got; exits non-zero on a mismatch.

Needs: pip install openai (into ~/.cache/peft-quant-oracle here).
Usage: scripts/check_openai_client.py
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "fixtures/lora/cases"


def peft_bin() -> str:
    if os.environ.get("PEFT_BIN"):
        return os.environ["PEFT_BIN"]
    for p in ["target/release/peft", "target/debug/peft"]:
        if (ROOT / p).exists():
            return str(ROOT / p)
    sys.exit("build peft first: cargo build --release -p peft-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(base: str, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="peft-serve-openai-")
    model = os.environ.get("MODEL")
    adapters = []
    if model is None:
        model = subprocess.run([sys.executable, str(ROOT / "scripts/serve_tiny_model.py"), f"{tmp}/tiny"],
                               check=True, capture_output=True, text=True).stdout.strip()
        adapters = [("a", CASES / "llama_two_adapters/adapter"), ("b", CASES / "llama_two_adapters/adapter/other")]
    port = free_port()
    cmd = [peft_bin(), "serve", "--model", model, "--port", str(port), "--served-model-name", "base"]
    for n, d in adapters:
        cmd += ["--adapter", f"{n}={d}"]
    print("$", " ".join(cmd))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(server.stdout.readline().rstrip())
    base = f"http://127.0.0.1:{port}"
    ok = True

    def check(what: str, cond: bool) -> None:
        nonlocal ok
        print(f"  [{'ok' if cond else 'FAIL'}] {what}")
        ok &= cond

    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        models = client.models.list()
        print("models:", [(m.id, getattr(m, "parent", None)) for m in models.data])
        check("models list the base and each adapter with its parent",
              [m.id for m in models.data] == ["base"] + [n for n, _ in adapters])
        prompt = "w5 w6 w7" if adapters else "The capital of France is"
        for m in ["base"] + [n for n, _ in adapters]:
            r = client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0)
            text = r.choices[0].text
            print(f"completion[{m}]: {text!r} finish={r.choices[0].finish_reason} usage={r.usage}")
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=m, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
            check(f"{m}: streamed completion equals the non-streamed one", streamed == text)
        chat_model = adapters[0][0] if adapters else "base"
        msgs = [{"role": "user", "content": "w8 w9" if adapters else "What is 2+2? Answer briefly."}]
        r = client.chat.completions.create(model=chat_model, messages=msgs, max_tokens=12, temperature=0)
        chat = r.choices[0].message.content
        print(f"chat[{chat_model}]: {chat!r} role={r.choices[0].message.role} usage={r.usage}")
        chunks = list(client.chat.completions.create(model=chat_model, messages=msgs, max_tokens=12,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
        check("chat: streamed equals non-streamed", streamed == chat)
        check("chat: the last streamed chunk carries the usage", chunks[-1].usage is not None)
        s1 = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0.8, seed=5)
        s2 = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0.8, seed=5)
        print(f"sampled (seed 5): {s1.choices[0].text!r}")
        check("the same seed samples the same text", s1.choices[0].text == s2.choices[0].text)
        if adapters:
            st, body = post(base, "/v1/load_lora_adapter",
                            {"lora_name": "c", "lora_path": str(CASES / "llama_all_linear/adapter")})
            print("load_lora_adapter:", st, body)
            r = client.completions.create(model="c", prompt=prompt, max_tokens=6, temperature=0)
            print(f"completion[c]: {r.choices[0].text!r}")
            st2, body = post(base, "/v1/unload_lora_adapter", {"lora_name": "c"})
            print("unload_lora_adapter:", st2, body)
            check("load and unload answer 200", st == 200 and st2 == 200)
        try:
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)
            check("unknown model raises NotFoundError", False)
        except openai.NotFoundError as e:
            print("unknown model:", e.status_code, e.body)
            check("unknown model raises NotFoundError (404 model_not_found)",
                  e.status_code == 404 and e.body.get("code") == "model_not_found")
    finally:
        server.terminate()
        try:
            rest, _ = server.communicate(timeout=20)
            print(rest.rstrip())
        except subprocess.TimeoutExpired:
            server.kill()
        print("server exit code after SIGTERM:", server.returncode)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
