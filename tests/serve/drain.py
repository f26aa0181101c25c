"""A streamed chat of `RBEE_MAX_TOKENS` tokens at most that says `reading` after its first token,
then reads until the stream ends and prints how it ended: its finish reason, or the class and
message of the error the SDK raised (the server is asked to stop in between)."""

import json
import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["RBEE_BASE_URL"], api_key=os.environ["RBEE_KEY"], max_retries=0)
text, finish, said, error = "", None, False, None
try:
    stream = client.chat.completions.create(
        model=os.environ["RBEE_MODEL"],
        messages=[{"role": "user", "content": "Write a long essay about the history of the bicycle."}],
        max_tokens=int(os.environ["RBEE_MAX_TOKENS"]), temperature=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if text and not said:
            print("reading", flush=True)
            said = True
except openai.OpenAIError as e:
    error = {"class": type(e).__name__, "message": str(e)}
json.dump({"text": text, "finish_reason": finish, "error": error}, sys.stdout)
