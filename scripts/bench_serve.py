"""Measures an OpenAI-compatible server with the openai SDK, as a client of it would: the
median time to the first streamed token of RUNS one-token chats, and the aggregate decode
tokens/s of N concurrent streamed chats of TOKENS tokens each. Prints `ttft_ms aggregate_tps`.

    python3 bench_serve.py BASE_URL KEY MODEL N TOKENS RUNS PROMPT...
"""

import statistics
import sys
import threading
import time

import openai

base, key, model = sys.argv[1:4]
n, tokens, runs = (int(x) for x in sys.argv[4:7])
prompts = sys.argv[7:]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)


def first_token_ms():
    t = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ms = (time.perf_counter() - t) * 1000
            stream.close()
            return ms
    return (time.perf_counter() - t) * 1000


first_token_ms()
ttft = statistics.median(first_token_ms() for _ in range(runs))

counts = [0] * n


def one(i):
    c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
    stream = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
        max_tokens=tokens, temperature=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            counts[i] += 1


t = time.perf_counter()
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for x in threads:
    x.start()
for x in threads:
    x.join()
print(round(ttft, 1), round(sum(counts) / (time.perf_counter() - t), 1))
