"""Drives the queen with the stock `openai` SDK; prints one JSON object of what it saw.

Run by tests/queen.rs with RBEE_URL, RBEE_TOKEN and REF_CASE (a greedy chat reference case
from testdata/smollm2-reference.json) in the environment.
"""
import json
import os
import time

import openai

base = os.environ["RBEE_URL"] + "/v1"
client = openai.OpenAI(base_url=base, api_key=os.environ["RBEE_TOKEN"], max_retries=0, timeout=180)
case = json.loads(os.environ["REF_CASE"])
out = {}

t0 = time.time()
r = client.chat.completions.create(
    model="smollm2",
    messages=case["messages"],
    max_tokens=case["max_tokens"],
    temperature=0,
    user="end-user-7",
)
out["cold_s"] = time.time() - t0
out["chat"] = {
    "text": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
    "object": r.object,
    # OpenAI's schema requires the field (null); the SDK keeps what the server sent.
    "has_refusal": "refusal" in r.choices[0].message.model_dump(exclude_unset=True),
}

t0 = time.time()
stream = client.chat.completions.create(
    model="smollm2",
    messages=case["messages"],
    max_tokens=case["max_tokens"],
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["warm_s"] = time.time() - t0
out["stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage}

c = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason}

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

try:
    client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], temperature=7
    )
    out["bad_temperature"] = "no error"
except openai.BadRequestError as e:
    out["bad_temperature"] = {"status": e.status_code, "code": e.code, "message": e.message}

out["models"] = [m.id for m in client.models.list().data]
out["model"] = client.models.retrieve("smollm2").id
try:
    client.models.retrieve("no-such-model")
    out["unknown_model_card"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model_card"] = e.status_code

bad = openai.OpenAI(base_url=base, api_key="wrong-token-0123456789abcdef", max_retries=0)
try:
    bad.models.list()
    out["wrong_token"] = "no error"
except openai.AuthenticationError as e:
    out["wrong_token"] = e.status_code

print(json.dumps(out))
