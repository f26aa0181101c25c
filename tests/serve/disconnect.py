"""Opens a long streamed chat, says `reading` after its first token, waits for a line on stdin,
closes the stream (the process stays), says `closed`, then waits for stdin to end."""

import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["RBEE_BASE_URL"], api_key=os.environ["RBEE_KEY"], max_retries=0)
stream = client.chat.completions.create(
    model=os.environ["RBEE_MODEL"],
    messages=[{"role": "user", "content": "Write a very long essay about the history of the bicycle."}],
    max_tokens=4000, temperature=1.5, seed=11, stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        break
print("reading", flush=True)
sys.stdin.readline()
stream.close()
print("closed", flush=True)
sys.stdin.read()
