"""The parts of the OpenAI API agents use, through the stock `openai` SDK; prints one JSON object
of what it checked. Answers are validated with `jsonschema` (a validator nobody here wrote).

Run by tests/openai_api.rs with RBEE_URL and RBEE_TOKEN in the environment.
"""
import json
import math
import os

import jsonschema
import openai

client = openai.OpenAI(
    base_url=os.environ["RBEE_URL"] + "/v1", api_key=os.environ["RBEE_TOKEN"], max_retries=0, timeout=300
)
M = "smollm2"
out = {}

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "items": {
                "type": "array",
                "items": {"type": "string", "maxLength": 16},
                "minItems": 1,
                "maxItems": 3,
            },
            "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.5},
            "express": {"type": "boolean"},
        },
        "required": ["status", "items", "total", "express"],
        "additionalProperties": False,
    },
}


def schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": SCHEMAS[name]}}


# 1. response_format json_schema, not streaming and streaming; the answer validates.
checked = []
for name in SCHEMAS:
    for temperature in (0, 1):
        r = client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": f"Give me an example {name} as JSON."}],
            response_format=schema_format(name),
            max_tokens=200,
            temperature=temperature,
            seed=3,
        )
        text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        checked.append([name, temperature, r.choices[0].finish_reason])
    stream = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": f"Give me an example {name} as JSON."}],
        response_format=schema_format(name),
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[name])
    checked.append([name, "stream", "ok"])
out["schemas"] = checked

# json_object on chat and on completions.
r = client.chat.completions.create(
    model=M,
    messages=[{"role": "user", "content": "Reply with a JSON object with a field colour."}],
    response_format={"type": "json_object"},
    max_tokens=200,
    temperature=0,
)
out["json_object"] = isinstance(json.loads(r.choices[0].message.content), dict)
c = client.completions.create(
    model=M,
    prompt='A JSON object describing a cat: ',
    max_tokens=200,
    temperature=0,
    extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}},
)
jsonschema.validate(json.loads(c.choices[0].text), SCHEMAS["person"])
out["completion_schema"] = True

# 2. A forced tool call whose arguments validate, then a second turn with the result.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32}}, "required": ["city"]}}},
]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(
    model=M,
    messages=messages,
    tools=TOOLS,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=100,
    temperature=0,
)
msg = r.choices[0].message
call = msg.tool_calls[0]
args = json.loads(call.function.arguments)
jsonschema.validate(args, WEATHER)
out["forced"] = {
    "name": call.function.name,
    "finish_reason": r.choices[0].finish_reason,
    "content": msg.content,
    "id": call.id,
}
messages.append(msg.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "unit": args["unit"]})})
r2 = client.chat.completions.create(model=M, messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
out["second_turn"] = {
    "content": r2.choices[0].message.content,
    "finish_reason": r2.choices[0].finish_reason,
    "prompt_tokens": r2.usage.prompt_tokens,
    "first_prompt_tokens": r.usage.prompt_tokens,
}

# required, streaming: tool_calls deltas as the SDK assembles them.
stream = client.chat.completions.create(
    model=M,
    messages=[{"role": "user", "content": "What time is it in Tokyo, and what is the weather there?"}],
    tools=TOOLS,
    tool_choice="required",
    max_tokens=150,
    temperature=0,
    stream=True,
)
calls, finish = {}, None
for chunk in stream:
    for ch in chunk.choices:
        for d in ch.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = d.id or entry["id"]
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
for entry in calls.values():
    params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == entry["name"])
    jsonschema.validate(json.loads(entry["arguments"]), params)
out["required_stream"] = {"calls": len(calls), "names": [c["name"] for c in calls.values()], "finish_reason": finish}

# 3. logprobs with top_logprobs=3, greedy: the chosen token is the most likely one.
r = client.chat.completions.create(
    model=M,
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=12,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = r.choices[0].logprobs.content
ok = True
for t in content:
    top = t.top_logprobs
    ok &= len(top) == 3 and t.logprob <= 0 and top[0].token == t.token
    ok &= abs(top[0].logprob - t.logprob) < 1e-4 and all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
    ok &= sum(math.exp(a.logprob) for a in top) <= 1.0001
out["logprobs"] = {
    "ok": ok,
    "tokens": len(content),
    "completion_tokens": r.usage.completion_tokens,
    "text_matches": "".join(t.token for t in content) == r.choices[0].message.content,
}
c = client.completions.create(model=M, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=2)
lp = c.choices[0].logprobs
out["completion_logprobs"] = {
    "tokens": len(lp.tokens),
    "top": [len(t) for t in lp.top_logprobs],
    "joined": "".join(lp.tokens) == c.choices[0].text,
}

# 4. n=3: three choices; streaming n=2 carries both indexes.
r = client.chat.completions.create(
    model=M,
    messages=[{"role": "user", "content": "Write a word."}],
    max_tokens=8,
    temperature=1,
    n=3,
    seed=11,
)
out["n"] = {
    "choices": sorted(c.index for c in r.choices),
    "texts": [c.message.content for c in r.choices],
    "completion_tokens": r.usage.completion_tokens,
}
stream = client.chat.completions.create(
    model=M,
    messages=[{"role": "user", "content": "Write a word."}],
    max_tokens=8,
    temperature=1,
    n=2,
    stream=True,
    stream_options={"include_usage": True},
)
finished, usage = set(), None
for chunk in stream:
    usage = chunk.usage or usage
    for ch in chunk.choices:
        if ch.finish_reason:
            finished.add(ch.index)
out["n_stream"] = {"finished": sorted(finished), "completion_tokens": usage.completion_tokens if usage else None}

# 5. /v1/responses: plain, streamed, structured, and a tool round trip.
r = client.responses.create(
    model=M, input="What is 2+2?", instructions="Answer briefly.", max_output_tokens=16, temperature=0
)
out["responses"] = {
    "object": r.object,
    "status": r.status,
    "text": r.output_text,
    "output_tokens": r.usage.output_tokens,
    "id": r.id,
}
kinds, deltas, final = [], [], None
with client.responses.stream(model=M, input="What is 2+2?", instructions="Answer briefly.", max_output_tokens=16, temperature=0) as stream:
    for ev in stream:
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
    final = stream.get_final_response()
out["responses_stream"] = {
    "first": kinds[:2],
    "last": kinds[-1],
    "text": "".join(deltas),
    "final_text": final.output_text,
    "status": final.status,
}
r = client.responses.create(
    model=M,
    input=[{"role": "user", "content": [{"type": "input_text", "text": "Give me an example order as JSON."}]}],
    text={"format": {"type": "json_schema", "name": "order", "schema": SCHEMAS["order"], "strict": True}},
    max_output_tokens=200,
    temperature=0,
)
jsonschema.validate(json.loads(r.output_text), SCHEMAS["order"])
RTOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER, "strict": True}]
r = client.responses.create(
    model=M, input="What is the weather in Rome?", tools=RTOOLS, tool_choice="required", max_output_tokens=80, temperature=0
)
fc = next(o for o in r.output if o.type == "function_call")
jsonschema.validate(json.loads(fc.arguments), WEATHER)
r2 = client.responses.create(
    model=M,
    input=[
        {"role": "user", "content": "What is the weather in Rome?"},
        {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
        {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temperature": 21}'},
    ],
    tools=RTOOLS,
    max_output_tokens=30,
    temperature=0,
)
out["responses_tools"] = {
    "name": fc.name,
    "second_status": r2.status,
    "second_text": r2.output_text,
    "second_input_tokens": r2.usage.input_tokens,
    "first_input_tokens": r.usage.input_tokens,
}

print(json.dumps(out))
