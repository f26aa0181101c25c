"""16 streaming requests over a model with 4 slots and `--max-queue 4`: those beyond slots and
queue get 429 with Retry-After, every other one completes with the text the same request gives
alone. The requests go in three steps, each once the server shows the one before in place (4
streaming, 4 waiting in its queue), so that the count does not hang on how fast threads start:
only on the first 4 generations outlasting 8 refusals. Prints the counts."""

import json
import os
import sys
import threading
import time
import urllib.request

import openai

base, key, model = os.environ["RBEE_BASE_URL"], os.environ["RBEE_KEY"], os.environ["RBEE_MODEL"]
SLOTS, QUEUE, N = 4, 4, 16
ask = dict(
    model=model, messages=[{"role": "user", "content": "Write a long essay about the history of the bicycle."}],
    max_tokens=64, temperature=0, seed=3,
)

def client():
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)

def queued():
    health = base.removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    return body["queued"].get(model, 0)

def until(check, what, limit=120):
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)

alone = client().chat.completions.create(**ask).choices[0].message.content
results = [None] * N
streaming = threading.Semaphore(0)

def one(i):
    c = client()
    try:
        stream = c.chat.completions.create(**ask, stream=True)
        text, told = "", False
        for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
            if text and not told:
                streaming.release()
                told = True
        results[i] = ("ok", text)
    except openai.RateLimitError as e:
        results[i] = ("429", e.response.headers.get("retry-after"))

def start(ids):
    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    return threads

# Every slot streaming; then the queue full; then the rest, each of which finds neither.
threads = start(range(SLOTS))
for _ in range(SLOTS):
    assert streaming.acquire(timeout=120), "the first requests did not stream"
threads += start(range(SLOTS, SLOTS + QUEUE))
until(lambda: queued() == QUEUE, "the queue to fill")
threads += start(range(SLOTS + QUEUE, N))
for t in threads:
    t.join()
ok = [r for r in results if r[0] == "ok"]
busy = [r for r in results if r[0] == "429"]
assert len(ok) + len(busy) == N, results
assert all(text == alone for _, text in ok), (alone, ok)
assert all(retry is not None and int(retry) >= 1 for _, retry in busy), busy
json.dump({"ok": len(ok), "busy": len(busy)}, sys.stdout)
