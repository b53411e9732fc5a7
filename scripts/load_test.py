#!/usr/bin/env python3
"""Load test for an OpenAI-compatible completions server on loopback.

What it measures: for each concurrency level C, C client threads each send
--requests-per-client streaming POST /v1/completions requests, one after the
other.  Every SSE chunk that carries text is timestamped.  Per level it reports

  * aggregate completion tokens/s = all tokens streamed / wall time of the level
  * p50/p99 time to first token (request sent -> first text chunk)
  * p50/p99 inter-token latency (gap between successive text chunks of a request)
  * errors (HTTP errors, broken streams, requests cut off by --timeout)

Tokens of a request are counted from the `usage` the server sends at the end of
the stream ("stream_options": {"include_usage": true} is asked for), else as the
number of text chunks.  Generation is greedy by default (temperature 0) and
stops at max_tokens or at end of text, whichever comes first; the tok/req
column shows how many tokens requests actually got.  Each client's prompt
starts with its own tag ("[run 0000 level 016 client 007 request 01]") so that
a prefix cache cannot serve requests from each other, while prompts keep about
the same length; a server that is not restarted between runs may still cache a
previous run's prompts unless --seed (which sets "run") changes.

Python 3.11 standard library only.  Example:

  python3 scripts/load_test.py --url http://127.0.0.1:8080 \\
      --concurrency 1,4,16,64 --max-tokens 64 --label selective --json out.json

The script ends within --timeout seconds in total (unfinished requests count
as errors), prints one Markdown table over the levels, and writes --json.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when "
    "movable metal type made it possible to produce books quickly and cheaply. "
    "Within a few decades printers worked in most European cities, and"
)


def percentile(values, p):
    """Linear-interpolated percentile (p in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.base = u.path.rstrip("/")

    def conn(self, timeout):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def first_model(self, timeout):
        c = self.conn(timeout)
        try:
            c.request("GET", self.base + "/v1/models")
            r = c.getresponse()
            body = json.loads(r.read())
            return body["data"][0]["id"]
        finally:
            c.close()


def one_request(server, body, deadline):
    """Send one streaming completion; return a dict with timings and tokens."""
    res = {"ttft": None, "gaps": [], "tokens": 0, "chunks": 0, "error": None}
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        res["error"] = "timeout"
        return res
    conn = server.conn(timeout=remaining)
    usage_tokens = None
    try:
        t0 = time.monotonic()
        conn.request("POST", server.base + "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            res["error"] = f"HTTP {resp.status}: {resp.read(300)!r}"
            return res
        last = None
        while True:
            if time.monotonic() > deadline:
                res["error"] = "timeout"
                break
            line = resp.readline()
            if not line:
                res["error"] = "stream ended without [DONE]"
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event: lines
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                res["error"] = f"server error: {str(msg['error'])[:300]}"
                break
            if msg.get("usage"):
                usage_tokens = msg["usage"].get("completion_tokens")
            choices = msg.get("choices") or []
            text = choices[0].get("text") if choices else None
            if text:
                now = time.monotonic()
                if last is None:
                    res["ttft"] = now - t0
                else:
                    res["gaps"].append(now - last)
                last = now
                res["chunks"] += 1
    except Exception as e:  # noqa: BLE001 - any failure is one error
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    res["tokens"] = usage_tokens if usage_tokens is not None else res["chunks"]
    return res


def run_level(server, args, model, concurrency, deadline):
    results = []
    lock = threading.Lock()

    def client(cid):
        for i in range(args.requests_per_client):
            if time.monotonic() > deadline:
                r = {"ttft": None, "gaps": [], "tokens": 0, "chunks": 0, "error": "timeout"}
            else:
                tag = f"[run {args.seed:04d} level {concurrency:03d} client {cid:03d} request {i:02d}] "
                body = {"model": model, "prompt": tag + args.prompt,
                        "max_tokens": args.max_tokens, "temperature": args.temperature,
                        "seed": args.seed + cid, "stream": True,
                        "stream_options": {"include_usage": True}}
                r = one_request(server, body, deadline)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,), daemon=True)
               for c in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + 1.0 - time.monotonic()))
    wall = time.monotonic() - t0
    with lock:
        done = list(results)
    expected = concurrency * args.requests_per_client
    missing = expected - len(done)  # threads still stuck past the deadline
    errors = [r["error"] for r in done if r["error"]] + ["timeout"] * missing
    tokens = sum(r["tokens"] for r in done)
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    ok = [r for r in done if not r["error"]]
    ms = lambda x: None if x is None else round(x * 1000, 2)  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": expected,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "completion_tokens": tokens,
        "text_chunks": sum(r["chunks"] for r in done),
        "tokens_per_request": round(sum(r["tokens"] for r in ok) / len(ok), 1) if ok else None,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
    }


def markdown(label, levels):
    cols = ["concurrency", "requests", "errors", "tokens_per_request", "completion_tokens",
            "wall_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    heads = ["conc", "reqs", "errors", "tok/req", "tokens", "wall s", "tok/s",
             "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    lines = [f"{label}:", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    for lv in levels:
        lines.append("| " + " | ".join("-" if lv[c] is None else str(lv[c]) for c in cols) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,4,16,64",
                    help="comma-separated concurrency levels (default 1,4,16,64)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--prompt-file", help="read the prompt from this file instead")
    ap.add_argument("--seed", type=int, default=0,
                    help="goes into the prompt tags and, plus the client number, into \"seed\"")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="bound on the total run time in seconds (default 600)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="requests sent (and not counted) before the first level")
    ap.add_argument("--model", help="model name in requests (default: first of /v1/models)")
    ap.add_argument("--label", default="server")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.prompt_file:
        with open(args.prompt_file) as f:
            args.prompt = f.read()
    levels_c = [int(x) for x in args.concurrency.split(",") if x.strip()]

    deadline = time.monotonic() + args.timeout
    server = Server(args.url)
    model = args.model
    if model is None:
        try:
            model = server.first_model(timeout=min(30.0, max(1.0, deadline - time.monotonic())))
        except Exception as e:  # noqa: BLE001
            print(f"could not read /v1/models ({e}); using model 'default'", file=sys.stderr)
            model = "default"
    for i in range(args.warmup):
        body = {"model": model, "prompt": f"[warmup {i:02d}] " + args.prompt,
                "max_tokens": min(8, args.max_tokens), "temperature": args.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        w = one_request(server, body, deadline)
        if w["error"]:
            print(f"warmup request failed: {w['error']}", file=sys.stderr)

    levels = []
    for c in levels_c:
        if time.monotonic() > deadline:
            print(f"--timeout reached; skipping concurrency {c}", file=sys.stderr)
            break
        lv = run_level(server, args, model, c, deadline)
        print(f"{args.label}: concurrency {c}: {lv['tokens_per_s']} tok/s, "
              f"{lv['errors']} errors {lv['error_samples'] or ''}", file=sys.stderr)
        levels.append(lv)

    print(markdown(args.label, levels))
    if args.json:
        out = {"label": args.label, "url": args.url, "model": model,
               "max_tokens": args.max_tokens, "temperature": args.temperature,
               "requests_per_client": args.requests_per_client, "seed": args.seed,
               "levels": levels}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    sys.exit(1 if any(lv["errors"] for lv in levels) else 0)


if __name__ == "__main__":
    main()
