"""The OpenAI wire format: request bodies (parsed and validated here), response / chunk objects, error bodies.

A request body goes through `parse_request`: JSON (UTF-8, no ``NaN``/``Infinity``, at most `MAX_JSON_DEPTH`
levels), every string valid Unicode (a lone surrogate such as ``"\\ud800"`` is a 400 naming the field), then
the pydantic model in strict mode (``max_tokens: true`` or ``1.0`` is not an integer, ``stream: "yes"`` is not a
boolean). Fields that would change the output but that lmforge does not implement (`UNSUPPORTED`) are refused
with a 400 naming the field when set to anything but their neutral value; ``logit_bias`` is implemented;
other unknown fields are ignored (metadata such as ``user`` or ``store``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_JSON_DEPTH = 32  # a chat request is 4 levels deep (messages[i].content[j].text)
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
        413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
        500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()


# ---- parsing a body ------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _path(parts: list) -> str:
    return ".".join(str(p) for p in parts)


def check_json_tree(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse (400) nesting deeper than ``max_depth`` and any string or key that is not valid Unicode (a lone
    surrogate: JSON's ``\\ud800`` escape decodes to one, and UTF-8 cannot encode it), naming where it is."""
    def check_str(text: str, where: list) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            param = _path(where) or None
            raise APIError(400, f"{param or 'the body'} holds invalid Unicode (a lone surrogate, "
                           f"{text[e.start]!r}, at character {e.start}); send valid UTF-8 text",
                           param=param, code="invalid_unicode") from None

    if isinstance(obj, str):
        check_str(obj, [])
    stack: list[tuple[Any, list]] = [(obj, [])] if isinstance(obj, (dict, list)) else []
    while stack:
        node, where = stack.pop()
        if len(where) >= max_depth:
            raise APIError(400, f"the request body is nested deeper than {max_depth} levels (at "
                           f"{_path(where[:3])}…); an OpenAI request is a few levels deep",
                           param=_path(where[:1]) or None, code="too_deep")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if isinstance(k, str):
                check_str(k, where)
            if isinstance(v, str):
                check_str(v, [*where, k])
            elif isinstance(v, (dict, list)):
                stack.append((v, [*where, k]))


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte {e.start}); send JSON in UTF-8",
                       code="invalid_json") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels; an OpenAI "
                       "request is a few levels deep", code="too_deep") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of over 4300 digits
        raise APIError(400, f"the request body is not JSON: {str(e).splitlines()[0][:200]}; send a JSON object",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body is a JSON {type(obj).__name__}, not an object; send a JSON "
                       "object", code="invalid_json")
    check_json_tree(obj)
    return obj


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def _param(loc) -> str | None:
    # pydantic puts union members ('str', 'list[int]', …) into the location; the field path is the rest
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) not in _TYPE_TAGS)]
    return ".".join(parts) or None


def validate(model: type[BaseModel], obj: dict[str, Any]):
    """``model`` from a parsed body; a validation error is a 400 naming the first field at fault."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        param = _param(err.get("loc", ()))
        got = _JSON_TYPES.get(type(err.get("input")), "")
        if err.get("type") == "union_tag_invalid" or (len(errors) > 1 and all(_param(x["loc"]) == param
                                                                            for x in errors)):
            msg = f"{param} has the wrong type or shape (got {got or 'something else'}); see the API reference"
        else:
            msg = f"{param}: {err.get('msg', 'invalid')}" + (f" (got {got})" if got and "type" in err["type"]
                                                               else "")
        raise APIError(400, msg, param=param, code="invalid_value") from None


def parse_request(model: type[_Request], body: bytes) -> _Request:
    """A request model from the raw body: JSON, Unicode and depth checks, unsupported fields, then pydantic."""
    obj = parse_json(body)
    check_unsupported(obj, model.UNSUPPORTED)
    obj = {k: v for k, v in obj.items() if v is not None}  # null means the default (OpenAI's reading)
    req = validate(model, obj)
    req.check()
    return req


# field -> its neutral values (same JSON type); anything else would change the output and is refused
_COMMON_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None,), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "min_p": (None, 0), "typical_p": (None, 1), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "audio": (None,), "modalities": (None, ["text"]),
    "web_search_options": (None,), "echo": (None, False), "suffix": (None, ""),
}
_WHY = {
    "logprobs": "log probabilities are not returned by lmforge serve",
    "top_logprobs": "log probabilities are not returned by lmforge serve",
    "response_format": "lmforge serve does not constrain decoding to JSON; send {\"type\": \"text\"} or leave it out",
    "tools": "tools are not supported by lmforge serve", "tool_choice": "tools are not supported by lmforge serve",
    "functions": "function calling is not supported by lmforge serve",
    "function_call": "function calling is not supported by lmforge serve",
    "echo": "echo is not supported by lmforge serve", "suffix": "suffix (insertion) is not supported by lmforge serve",
}


def _same(a: Any, b: Any) -> bool:
    num = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, num) and isinstance(b, num):
        return a == b
    return type(a) is type(b) and a == b


def check_unsupported(obj: dict[str, Any], fields: dict[str, tuple]) -> None:
    for name, neutral in fields.items():
        if name in obj and not any(_same(obj[name], n) for n in neutral):
            why = _WHY.get(name, f"{name} is not implemented by lmforge serve")
            raise APIError(400, f"{name}={json.dumps(obj[name], ensure_ascii=False)[:80]} would change the "
                           f"output but is not supported: {why}; leave it out", param=name, code="unsupported")


# ---- requests ---------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    UNSUPPORTED: ClassVar[dict[str, tuple]] = _COMMON_UNSUPPORTED

    model: str | None = None  # optional here (the one served); when given it must match
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # an extension (vLLM, llama.cpp have it too)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"stop has {len(stops)} strings; pass at most 16", param="stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self) -> None:
        """Checks across fields and values pydantic's types do not express."""
        self.stop_strings()
        self.token_bias(None)

    def token_bias(self, vocab_size: int | None) -> dict[int, float] | None:
        """``logit_bias`` as {token id: bias}: keys are token ids (decimal strings, within the vocabulary when
        ``vocab_size`` is given), values in [-100, 100] (OpenAI's range; -100 bans a token, 100 forces it)."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias has {len(self.logit_bias)} entries; pass at most {MAX_LOGIT_BIAS}",
                           param="logit_bias")
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise APIError(400, f"logit_bias key {key[:40]!r} is not a token id; keys are token ids as "
                               "decimal strings, e.g. {\"50256\": -100}", param="logit_bias")
            if vocab_size is not None and int(key) >= vocab_size:
                raise APIError(400, f"logit_bias names token {key}, outside the vocabulary [0, {vocab_size})",
                               param="logit_bias")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias[{key}] = {bias} is outside [-100, 100]", param="logit_bias")
            out[int(key)] = float(bias)
        return out


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise APIError(400, "prompt is empty; pass some text or token ids", param="prompt")
        if len(out) > 64:
            raise APIError(400, f"prompt holds {len(out)} prompts; pass at most 64 per request", param="prompt")
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content part of type {part.get('type')!r} is not supported; send text parts",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ----------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, created: int | None = None, **fields) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, **fields}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
