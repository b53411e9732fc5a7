#!/usr/bin/env python3
"""Checks `selective serve` with OpenAI's own Python client.

    pip install openai
    selective serve --port 8080 &
    python3 tests/python/openai_client_check.py --base-url http://127.0.0.1:8080/v1

Prints one line per check and exits non-zero at the first failure (an
assertion says what was expected and what came). tests/serve_process.rs runs
it against a server it starts.
"""

import argparse
import sys
import time
import traceback

try:
    import openai
except ImportError:
    print("openai_client_check: the `openai` package is missing: pip install openai", file=sys.stderr)
    sys.exit(2)


def expect(condition, what, expected, got):
    """Asserts `condition`, saying what was expected and what came."""
    assert condition, f"{what}: expected {expected}, got {got!r}"


def expect_eq(got, expected, what):
    expect(got == expected, what, repr(expected), got)


class Checks:
    def __init__(self, client, model):
        self.client = client
        self.model = model
        self.passed = 0

    def run(self, name, check):
        started = time.monotonic()
        try:
            detail = check()
        except Exception:
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
            raise
        self.passed += 1
        elapsed = time.monotonic() - started
        suffix = f": {detail}" if detail else ""
        print(f"ok   {name} ({elapsed:.2f} s){suffix}", flush=True)

    # --- the checks ------------------------------------------------------

    def models(self):
        listed = [m.id for m in self.client.models.list()]
        expect(len(listed) > 0, "models.list()", "at least one model", listed)
        if self.model is None:
            self.model = listed[0]
        expect(self.model in listed, "models.list()", f"a list holding {self.model!r}", listed)
        return f"{listed}"

    def completion_args(self):
        return dict(model=self.model, prompt="ROMEO:", max_tokens=20, temperature=0, seed=1)

    def completion_whole(self):
        r = self.client.completions.create(**self.completion_args())
        expect_eq(r.object, "text_completion", "completion object")
        expect_eq(len(r.choices), 1, "number of choices")
        c = r.choices[0]
        expect(len(c.text) > 0, "completion text", "non-empty text", c.text)
        expect_eq(c.finish_reason, "length", "finish_reason")
        expect_eq(c.index, 0, "choice index")
        expect(r.usage is not None, "usage", "a usage object", r.usage)
        expect_eq(r.usage.completion_tokens, 20, "usage.completion_tokens")
        expect(r.usage.prompt_tokens > 0, "usage.prompt_tokens", "> 0", r.usage.prompt_tokens)
        expect_eq(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens, "usage.total_tokens")
        self.greedy_text = c.text
        return repr(c.text)

    def completion_stream(self):
        stream = self.client.completions.create(
            **self.completion_args(), stream=True, stream_options={"include_usage": True}
        )
        texts, finish, usage, chunks = [], None, None, 0
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                expect_eq(len(chunk.choices), 0, "choices of the usage chunk")
                usage = chunk.usage
            for c in chunk.choices:
                expect_eq(c.index, 0, "chunk choice index")
                texts.append(c.text)
                if c.finish_reason is not None:
                    finish = c.finish_reason
        text = "".join(texts)
        expect_eq(text, self.greedy_text, "streamed text (greedy: as the whole answer)")
        expect_eq(finish, "length", "streamed finish_reason")
        expect(usage is not None, "the final usage chunk", "a chunk with usage", None)
        expect_eq(usage.completion_tokens, 20, "streamed usage.completion_tokens")
        expect(usage.prompt_tokens > 0, "streamed usage.prompt_tokens", "> 0", usage.prompt_tokens)
        return f"{chunks} chunks"

    def chat_args(self):
        return dict(
            model=self.model,
            messages=[{"role": "user", "content": "Speak."}],
            max_tokens=16,
            temperature=0.7,
            seed=5,
        )

    def chat_whole_and_streamed(self):
        r = self.client.chat.completions.create(**self.chat_args())
        expect_eq(r.object, "chat.completion", "chat object")
        expect_eq(len(r.choices), 1, "number of chat choices")
        m = r.choices[0].message
        expect_eq(m.role, "assistant", "message role")
        expect(m.content is not None and len(m.content) > 0, "chat content", "non-empty content", m.content)
        expect(r.choices[0].finish_reason in ("length", "stop"), "chat finish_reason", "length or stop",
               r.choices[0].finish_reason)
        expect(r.usage is not None and r.usage.completion_tokens <= 16, "chat usage.completion_tokens",
               "<= 16", r.usage)

        stream = self.client.chat.completions.create(
            **self.chat_args(), stream=True, stream_options={"include_usage": True}
        )
        role, parts, finish, usage = None, [], None, None
        for chunk in stream:
            expect_eq(chunk.object, "chat.completion.chunk", "chat chunk object")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.role is not None:
                    role = c.delta.role
                if c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason is not None:
                    finish = c.finish_reason
        expect_eq(role, "assistant", "streamed delta role")
        expect_eq("".join(parts), m.content, "streamed chat content (same seed: as the whole answer)")
        expect_eq(finish, r.choices[0].finish_reason, "streamed chat finish_reason")
        expect(usage is not None, "the final chat usage chunk", "a chunk with usage", None)
        expect_eq(usage.completion_tokens, r.usage.completion_tokens, "streamed chat usage.completion_tokens")
        self.first_turn = (self.chat_args()["messages"], m.content)
        return repr(m.content)

    def n_choices(self):
        r = self.client.completions.create(
            model=self.model, prompt="ROMEO:", max_tokens=8, temperature=1.0, seed=3, n=2
        )
        expect_eq(sorted(c.index for c in r.choices), [0, 1], "completion choice indices with n=2")
        expect_eq(r.usage.completion_tokens, 16, "usage.completion_tokens with n=2 (8 each)")
        r = self.client.chat.completions.create(**{**self.chat_args(), "n": 2, "max_tokens": 8})
        expect_eq(sorted(c.index for c in r.choices), [0, 1], "chat choice indices with n=2")
        for c in r.choices:
            expect_eq(c.message.role, "assistant", f"role of chat choice {c.index}")
        return f"{[c.message.content for c in r.choices]!r}"

    def completion_logprobs(self):
        r = self.client.completions.create(
            model=self.model, prompt="ROMEO:", max_tokens=6, temperature=0, seed=1, logprobs=2
        )
        lp = r.choices[0].logprobs
        expect(lp is not None, "completion logprobs", "a logprobs object", lp)
        n = r.usage.completion_tokens
        expect_eq(n, 6, "usage.completion_tokens")
        expect_eq(len(lp.token_logprobs), n, "len(token_logprobs)")
        expect_eq(len(lp.tokens), n, "len(tokens)")
        expect_eq("".join(lp.tokens), r.choices[0].text, "the tokens joined (as the text)")
        for i, x in enumerate(lp.token_logprobs):
            expect(x <= 0, f"token_logprobs[{i}]", "<= 0", x)
        expect_eq(len(lp.top_logprobs), n, "len(top_logprobs)")
        for i, top in enumerate(lp.top_logprobs):
            expect(isinstance(top, dict) and len(top) == 2, f"top_logprobs[{i}]", "a dict of 2 entries", top)
            for token, x in top.items():
                expect(x <= 0, f"top_logprobs[{i}][{token!r}]", "<= 0", x)
            # greedy: the chosen token is the likeliest
            expect(lp.token_logprobs[i] >= max(top.values()) - 1e-5, f"token_logprobs[{i}] (greedy)",
                   f">= the best alternative {max(top.values())}", lp.token_logprobs[i])
        return f"{lp.token_logprobs[:3]}..."

    def chat_logprobs(self):
        r = self.client.chat.completions.create(**self.chat_args(), logprobs=True, top_logprobs=2)
        lp = r.choices[0].logprobs
        expect(lp is not None and lp.content is not None, "chat logprobs", "a logprobs object with content", lp)
        n = r.usage.completion_tokens
        expect_eq(len(lp.content), n, "len(logprobs.content)")
        expect_eq("".join(t.token for t in lp.content), r.choices[0].message.content, "the tokens joined")
        for i, t in enumerate(lp.content):
            expect(t.logprob <= 0, f"content[{i}].logprob", "<= 0", t.logprob)
            expect_eq(len(t.top_logprobs), 2, f"len(content[{i}].top_logprobs)")
            for alt in t.top_logprobs:
                expect(alt.logprob <= 0, f"content[{i}].top_logprobs logprob", "<= 0", alt.logprob)
        return f"{n} tokens"

    def errors(self):
        try:
            self.client.completions.create(model=self.model, prompt="ROMEO:", max_tokens=4, temperature=-1)
        except openai.BadRequestError as e:
            expect_eq(e.status_code, 400, "status of temperature=-1")
            expect("temperature" in str(e.message), "the message of temperature=-1", "a mention of temperature",
                   e.message)
            bad = e.message
        else:
            raise AssertionError("temperature=-1: expected openai.BadRequestError, got a completion")
        # a route this server does not have
        try:
            self.client.embeddings.create(model=self.model, input="ROMEO:")
        except openai.NotFoundError as e:
            expect_eq(e.status_code, 404, "status of an unknown route")
        except openai.APIStatusError as e:
            expect_eq(e.status_code, 404, "status of an unknown route")
        else:
            raise AssertionError("POST /v1/embeddings: expected a 404 error, got an answer")
        return repr(bad)

    def cached_second_turn(self):
        messages, reply = self.first_turn
        second = messages + [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "Say more."},
        ]
        r = self.client.chat.completions.create(
            model=self.model, messages=second, max_tokens=8, temperature=0.7, seed=5
        )
        details = r.usage.prompt_tokens_details
        expect(details is not None, "usage.prompt_tokens_details", "present", r.usage)
        cached = details.cached_tokens
        expect(cached is not None and cached > 0, "usage.prompt_tokens_details.cached_tokens of a second turn",
               "> 0 (the first turn's prefix is cached)", cached)
        expect(cached <= r.usage.prompt_tokens, "cached_tokens", f"<= prompt_tokens {r.usage.prompt_tokens}",
               cached)
        return f"{cached} of {r.usage.prompt_tokens} prompt tokens cached"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", help="the model id the server lists (default: the first listed)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=args.timeout)
    checks = Checks(client, args.model)
    print(f"openai {openai.__version__} against {args.base_url}", flush=True)
    steps = [
        ("models.list lists the model", checks.models),
        ("completions: greedy, whole", checks.completion_whole),
        ("completions: greedy, streamed with usage, as the whole", checks.completion_stream),
        ("chat: whole and streamed with one seed agree", checks.chat_whole_and_streamed),
        ("n=2: two choices", checks.n_choices),
        ("completions: logprobs=2", checks.completion_logprobs),
        ("chat: logprobs with top_logprobs=2", checks.chat_logprobs),
        ("errors: a bad temperature and an unknown route", checks.errors),
        ("chat: a second turn starts from the cached first", checks.cached_second_turn),
    ]
    try:
        for name, check in steps:
            checks.run(name, check)
    except Exception:
        print(f"openai_client_check: FAILED after {checks.passed} of {len(steps)} checks", flush=True)
        return 1
    print(f"openai_client_check: all {len(steps)} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
