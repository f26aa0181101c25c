"""Generation controls through `rbee serve` with the openai SDK: json_schema output that parses
and validates (several seeds), a multi-turn conversation, stop strings, seeds, and raw
completions whole and streamed. Prints what the Rust side compares with `rbee infer`."""

import json
import os
import sys

import jsonschema
import openai

client = openai.OpenAI(
    base_url=os.environ["RBEE_BASE_URL"], api_key=os.environ["RBEE_KEY"], max_retries=0, timeout=120
)
model = os.environ["RBEE_MODEL"]

schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
for seed in (1, 2, 3, 4):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person: name, age and city."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=200, temperature=0.8, seed=seed,
    )
    content = r.choices[0].message.content
    jsonschema.validate(json.loads(content), schema)
    assert r.choices[0].finish_reason == "stop", r

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Give me a JSON object with a cat's name."}],
    response_format={"type": "json_object"}, max_tokens=300, temperature=0,
)
# The grammar holds the output to a JSON object; a small model may not close it within the
# token limit, and then the text is a prefix of one.
content = r.choices[0].message.content
assert content.lstrip().startswith("{"), r
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(content), dict), r

conversation = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ],
    max_tokens=16, temperature=0,
)
assert conversation.choices[0].message.content, conversation

ask = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
full = client.chat.completions.create(model=model, messages=ask, max_tokens=40, temperature=0)
full_text = full.choices[0].message.content
cut = len(full_text) // 2
stop = full_text[cut:cut + 2]
stopped = client.chat.completions.create(model=model, messages=ask, max_tokens=40, temperature=0, stop=[stop, "never-seen"])
assert stopped.choices[0].message.content == full_text[: full_text.index(stop)], (stopped, full_text, stop)
assert stopped.choices[0].finish_reason == "stop"
stream = client.chat.completions.create(model=model, messages=ask, max_tokens=40, temperature=0, stop=stop, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert streamed == full_text[: full_text.index(stop)], (streamed, stop)

story = [{"role": "user", "content": "Tell me a story about a dragon."}]
a, b = (
    client.chat.completions.create(model=model, messages=story, max_tokens=24, temperature=0.9, seed=7)
    .choices[0].message.content
    for _ in range(2)
)
assert a == b, (a, b)

raw = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert raw.object == "text_completion" and raw.choices[0].text, raw
assert raw.choices[0].finish_reason == "length", raw
chunks = list(client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
))
assert "".join(c.choices[0].text for c in chunks if c.choices) == raw.choices[0].text, chunks
assert chunks[-1].usage.completion_tokens == 8, chunks[-1]

json.dump({"raw": raw.choices[0].text, "conversation": conversation.choices[0].message.content}, sys.stdout)
