"""A chat of up to `RBEE_MAX_TOKENS` tokens, not streamed, with the SDK's default retries (the
server is asked to stop while it waits); prints how it ended: the text, or the class, status
and message of the error the SDK raised."""

import json
import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["RBEE_BASE_URL"], api_key=os.environ["RBEE_KEY"])
text, error = None, None
try:
    answer = client.chat.completions.create(
        model=os.environ["RBEE_MODEL"],
        messages=[{"role": "user", "content": "Write a long essay about the history of the bicycle."}],
        max_tokens=int(os.environ["RBEE_MAX_TOKENS"]), temperature=0,
    )
    text = answer.choices[0].message.content
except openai.OpenAIError as e:
    error = {"class": type(e).__name__, "status": getattr(e, "status_code", None), "message": str(e)}
json.dump({"text": text, "error": error}, sys.stdout)
