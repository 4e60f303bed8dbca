"""Schemathesis hooks for the queen: what a JSON schema cannot say, applied to generated bodies.

- Generation stays short: `max_tokens`-like fields are capped at 4 and prompts at a few
  thousand characters, so every case is one quick real inference (a debug build reads a
  context-long prompt for minutes; speed is `cargo xtask bench`'s business).
- Generated requests name the served model, so they reach the worker rather than stopping at 404.
- Rules across fields the schema cannot state (each refused with a 400 naming the field when
  broken, as tests elsewhere show): a forced tool call names a function in `tools`, and is not
  combined with a JSON format; `top_logprobs` needs `logprobs: true`.
- Only values the schema allows are changed, so a negative case stays invalid.
- Facts of the model: `logit_bias` keys are ids of its vocabulary (49152 tokens) and
  `repetition_window` is at most its context; grammars and function parameters are schemas the
  grammar engine compiles (a schema it cannot compile is a clear 400, not what this run is about).
"""
import schemathesis

LIMIT = 4
PROMPT_CHARS = 2000
VOCAB = 49152
MODEL = "smollm2"


def _get(d, k):
    return d.get(k) if isinstance(d, dict) else None


def _name(d):
    """A function's name: `name`, `function.name`, or (the native API) `function` itself."""
    f = _get(d, "function")
    return _get(d, "name") or (f if isinstance(f, str) else _get(f, "name"))


def _forced(choice, tools):
    names = [_name(t) for t in tools] if isinstance(tools, list) else []
    if choice == "required":
        return bool(names)
    if isinstance(choice, dict):
        return _name(choice) in names
    return None


def _sanitize_tools(body):
    tools = body.get("tools")
    if isinstance(tools, list):
        for t in tools:
            if not isinstance(t, dict):
                continue
            holder = t.get("function") if isinstance(t.get("function"), dict) else t
            if isinstance(holder.get("parameters"), dict):
                holder["parameters"] = {"type": "object"}
    choice = body.get("tool_choice")
    forced = _forced(choice, tools)
    if forced is False or (isinstance(choice, dict) and forced is None):
        body["tool_choice"] = "auto"
    if _forced(body.get("tool_choice"), tools):
        for k in ("response_format", "grammar"):
            body.pop(k, None)
        text = body.get("text")
        if isinstance(text, dict):
            text.pop("format", None)


def _sanitize_formats(body):
    rf = body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        rf["json_schema"]["schema"] = {"type": "object"}
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict) and text["format"].get("type") == "json_schema":
        text["format"]["schema"] = {"type": "object"}
    g = body.get("grammar")
    if isinstance(g, dict) and g.get("type") in ("lark", "regex", "json_schema"):
        body["grammar"] = {"type": "json_object"}


@schemathesis.hook
def map_body(ctx, body):
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str) and body["model"].strip():
        body["model"] = MODEL
    for k in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(k), (int, float)) and LIMIT < body[k] <= 4294967295:
            body[k] = LIMIT
    # No limit given: the default would be what the context leaves.
    if "input" in body and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = LIMIT
    elif "input" not in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = LIMIT

    tl = body.get("top_logprobs")
    if isinstance(tl, (int, float)) and 0 < tl <= 20 and body.get("logprobs") in (None, False):
        body["logprobs"] = True
    lb = body.get("logit_bias")
    if isinstance(lb, dict):
        body["logit_bias"] = {str(int(k) % VOCAB) if k.isascii() and k.isdigit() else k: v for k, v in lb.items()}
    if isinstance(body.get("repetition_window"), (int, float)) and 8192 < body["repetition_window"] <= 4294967295:
        body["repetition_window"] = 64
    for k in ("messages", "input"):
        if isinstance(body.get(k), list) and len(body[k]) <= 1024:
            body[k] = body[k][:16]
    for k in ("prompt", "input", "instructions"):
        if isinstance(body.get(k), str):
            body[k] = body[k][:PROMPT_CHARS]
    msgs = body.get("messages") if isinstance(body.get("messages"), list) else body.get("input")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                m["content"] = m["content"][:PROMPT_CHARS // 16]
            elif isinstance(m, dict) and isinstance(m.get("content"), list):
                m["content"] = m["content"][:8]
                for part in m["content"]:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = part["text"][:PROMPT_CHARS // 128]
    _sanitize_tools(body)
    _sanitize_formats(body)
    return body
