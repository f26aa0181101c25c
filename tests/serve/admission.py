"""16 concurrent streaming requests over a model with 4 slots and `--max-queue 4`: those beyond
slots and queue get 429 with Retry-After, every other one completes with the text the same
request gives alone. Prints the counts."""

import json
import os
import sys
import threading

import openai

base, key, model = os.environ["RBEE_BASE_URL"], os.environ["RBEE_KEY"], os.environ["RBEE_MODEL"]
N = int(os.environ.get("RBEE_CONCURRENT", "16"))
ask = dict(
    model=model, messages=[{"role": "user", "content": "Write a long essay about the history of the bicycle."}],
    max_tokens=64, temperature=0, seed=3,
)

def client():
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

alone = client().chat.completions.create(**ask).choices[0].message.content
results = [None] * N
barrier = threading.Barrier(N)

def one(i):
    c = client()
    barrier.wait()
    try:
        stream = c.chat.completions.create(**ask, stream=True)
        results[i] = ("ok", "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    except openai.RateLimitError as e:
        results[i] = ("429", e.response.headers.get("retry-after"))

threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ok = [r for r in results if r[0] == "ok"]
busy = [r for r in results if r[0] == "429"]
assert len(ok) + len(busy) == N, results
assert all(text == alone for _, text in ok), (alone, ok)
assert all(retry is not None and int(retry) >= 1 for _, retry in busy), busy
json.dump({"ok": len(ok), "busy": len(busy)}, sys.stdout)
