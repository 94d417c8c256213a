#!/usr/bin/env python3
"""A bounded loopback load on `peft serve`: N concurrent clients send R completion requests in all, spread
round-robin over the given models (adapters), and report throughput and latency percentiles.

Standard library only (asyncio, HTTP/1.1 with Connection: close). Greedy, `ignore_eos` so that every request
generates exactly --max-tokens tokens.

Usage: bench_serve.py --url http://127.0.0.1:8000 --models a,b,c,d [--clients 32] [--requests 200]
                      [--max-tokens 16] [--prompt TEXT]
"""
import argparse
import asyncio
import json
import time
from urllib.parse import urlparse


async def one(host: str, port: int, body: bytes) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return status, json.loads(payload or b"{}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--models", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="w5 w6 w7 w8")
    a = ap.parse_args()
    u = urlparse(a.url)
    models = a.models.split(",")
    todo = list(range(a.requests))
    lat, tokens, errors = [], 0, {}

    async def client() -> None:
        nonlocal tokens
        while todo:
            i = todo.pop()
            body = json.dumps({"model": models[i % len(models)], "prompt": a.prompt, "max_tokens": a.max_tokens,
                               "temperature": 0, "ignore_eos": True}).encode()
            t0 = time.perf_counter()
            status, v = await one(u.hostname, u.port, body)
            if status == 200:
                lat.append(time.perf_counter() - t0)
                tokens += v["usage"]["completion_tokens"]
            else:
                errors[status] = errors.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(a.clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")
    print(f"{a.requests} requests, {a.clients} concurrent clients, models {models}, {a.max_tokens} tokens each")
    print(f"ok {len(lat)}, errors {errors or 'none'}, wall {wall:.2f} s")
    print(f"throughput: {len(lat) / wall:.1f} req/s, {tokens / wall:.0f} generated tok/s")
    print(f"latency: p50 {pct(50):.0f} ms, p99 {pct(99):.0f} ms, max {lat[-1] * 1000 if lat else 0:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
