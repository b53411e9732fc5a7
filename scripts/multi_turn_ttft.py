#!/usr/bin/env python3
"""Time to first token by turn of one conversation, against an
OpenAI-compatible server (ours with and without its prefix cache, or
llama-server): each turn sends the whole conversation so far to
/v1/chat/completions, streaming, and records the time to the first content
chunk and the usage's prompt_tokens / prompt_tokens_details.cached_tokens.

With the prefix cache a later turn should cost only its new tokens: its
time to first token stays flat while the conversation grows; without it,
the time grows with the prompt.

    python3 scripts/multi_turn_ttft.py --url http://127.0.0.1:8080 --turns 6
    python3 scripts/multi_turn_ttft.py --url ... --json out.json --label ours

Standard library only.
"""

import argparse
import http.client
import json
import sys
import time
import urllib.parse

# A long system message, so that re-reading the conversation is costly.
SYSTEM = " ".join(
    f"Rule {i}: answer briefly, in plain words, and stay on the topic of the question."
    for i in range(1, 41)
)
QUESTIONS = [
    "What is a state space model?",
    "How does the selective scan differ from a convolution?",
    "Why is the state of a fixed size?",
    "What does the hardware-aware algorithm keep in fast memory?",
    "How is the model trained?",
    "What are its limits?",
    "How does it compare with attention?",
    "Summarise what we said.",
]


def chat_turn(url, model, messages, max_tokens, seed, timeout):
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    text = []
    usage = None
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise SystemExit(f"error in stream: {chunk['error']}")
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                if first is None:
                    first = time.perf_counter() - start
                text.append(piece)
    total = time.perf_counter() - start
    conn.close()
    return first, total, "".join(text), usage or {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default=None, help="model id (default: the first /v1/models lists)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--label", default="server")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = args.model
    if model is None:
        parsed = urllib.parse.urlparse(args.url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        first, total, text, usage = chat_turn(
            args.url, model, messages, args.max_tokens, args.seed + turn, args.timeout
        )
        messages.append({"role": "assistant", "content": text})
        details = usage.get("prompt_tokens_details") or {}
        rows.append({
            "turn": turn + 1,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens"),
            "ttft_ms": None if first is None else round(first * 1e3, 1),
            "total_ms": round(total * 1e3, 1),
        })
    print(f"{args.label}: time to first token by turn ({model})")
    print("| turn | prompt tokens | from the cache | time to first token (ms) | whole turn (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_ms']} | {r['total_ms']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "model": model, "turns": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
