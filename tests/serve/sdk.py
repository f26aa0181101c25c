"""Drives `rbee serve` with the real openai SDK: models, chat (whole and streamed with usage),
and the errors the SDK raises by status. Exits non-zero (an AssertionError) on any mismatch."""

import json
import os
import sys

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

base = os.environ["RBEE_BASE_URL"]
key = os.environ["RBEE_KEY"]
model = os.environ["RBEE_MODEL"]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

ids = [m.id for m in client.models.list()]
assert ids == [model], ids

messages = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, user="ignored",
    metadata={"ignored": "yes"},
)
ChatCompletion.model_validate(whole.to_dict())
assert whole.object == "chat.completion"
text = whole.choices[0].message.content
assert text, whole
assert whole.choices[0].message.role == "assistant"
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, whole.usage
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
for c in chunks:
    # The SDK builds its types without checking them; check every chunk against them.
    ChatCompletionChunk.model_validate(c.to_dict())
    assert c.object == "chat.completion.chunk" and c.id == chunks[0].id
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [whole.choices[0].finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1].usage
assert all(c.usage is None for c in chunks[:-1])

wrong = openai.OpenAI(base_url=base, api_key="rbee-" + "0" * 64, max_retries=0)
try:
    wrong.models.list()
    raise AssertionError("a wrong key was taken")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was taken")
except openai.NotFoundError as e:
    assert e.param == "model", e

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, n=2)
    raise AssertionError("n=2 was taken")
except openai.BadRequestError as e:
    assert e.param == "n", e

try:
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=4,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
    )
    raise AssertionError("tools were taken")
except openai.BadRequestError as e:
    assert e.param == "tools", e

json.dump({"text": text, "request_id": whole.id}, sys.stdout)
