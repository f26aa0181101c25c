"""A streamed chat that says `reading` after its first token, then reads to the end and prints
how it ended (the server is asked to stop in between)."""

import json
import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["RBEE_BASE_URL"], api_key=os.environ["RBEE_KEY"], max_retries=0)
stream = client.chat.completions.create(
    model=os.environ["RBEE_MODEL"],
    messages=[{"role": "user", "content": "Write a long essay about the history of the bicycle."}],
    max_tokens=48, temperature=0, stream=True,
)
text, finish, said = "", None, False
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if text and not said:
        print("reading", flush=True)
        said = True
json.dump({"text": text, "finish_reason": finish}, sys.stdout)
