"""N concurrent streamed chats to an OpenAI-compatible llama-server at 127.0.0.1:PORT, as
scripts/bench.sh and scripts/bench_llama.sh measure llama.cpp's own server: prints the tokens
the server says it generated and the wall milliseconds.

    python3 ls_many.py PORT N TOKENS PROMPT...
"""

import http.client
import json
import sys
import threading
import time

port, n, tokens, prompts = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
counts = [0] * n


def run(i):
    c = http.client.HTTPConnection("127.0.0.1", port)
    body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "max_tokens": tokens, "temperature": 0, "stream": True}
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    for line in c.getresponse():
        if line.startswith(b"data: {"):
            d = json.loads(line[6:])
            if "timings" in d:
                counts[i] = d["timings"]["predicted_n"]


t = time.time()
threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
[x.start() for x in threads]
[x.join() for x in threads]
print(sum(counts), round((time.time() - t) * 1000))
