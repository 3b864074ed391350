"""`lmforge serve` against hostile and sloppy clients, through a real process on 127.0.0.1 (raw sockets where a
client library would hide the wire): the key is checked before the body, every error is OpenAI's JSON shape
(parse errors, unknown paths, wrong methods, deep JSON, big bodies, malformed HTTP), invalid Unicode and loose
types are refused naming the field, unimplemented output-changing fields are refused, ``logit_bias`` works,
``Host`` is checked without a key, slow headers and bodies are timed out; and the server log stays free of
tracebacks throughout."""

from __future__ import annotations

import json
import time

import pytest
from _serve_proc import (
    ServeProcess,
    connect,
    error_of,
    post_bytes,
    raw_request,
    read_all,
    split_response,
    tiny_model_dir,
)

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

KEY = "hardening-key"
TIMEOUT = 2  # --header-timeout and --body-timeout of the keyed server (seconds)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tokenizer):
    return tiny_model_dir(tmp_path_factory.mktemp("hardening"), make_tokenizer)


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    p = ServeProcess(model_dir, tmp_path_factory.mktemp("keyed") / "serve.log", "--api-key", KEY, "--max-batch",
                     "2", "--max-context", "128", "--max-body-bytes", "65536", "--header-timeout", str(TIMEOUT),
                     "--body-timeout", str(TIMEOUT))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def open_server(model_dir, tmp_path_factory):
    """No key: the Host check is on."""
    p = ServeProcess(model_dir, tmp_path_factory.mktemp("open") / "serve.log", "--max-batch", "2",
                     "--max-context", "128", "--allow-host", "proxy.internal")
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def no_traceback_in_server_logs(request):
    """Whatever a test sent, the servers it used log no traceback and no uvicorn warning for it."""
    procs = [request.getfixturevalue(n) for n in ("keyed", "open_server") if n in request.fixturenames]
    before = [len(p.log()) for p in procs]
    yield
    time.sleep(0.1)
    for p, n in zip(procs, before):
        new = p.log()[n:]
        assert "Traceback" not in new and "Exception in ASGI" not in new and "WARNING" not in new, new[-3000:]


def post(server, path, body, key=KEY, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kw)


def chat_body(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, **kw}


def assert_error(r, status, param="any", code="any"):
    assert r.status_code == status, r.text
    err = error_of(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


# ---- the key before the body ---------------------------------------------------------------------------------
def test_key_is_checked_before_the_body_is_read(keyed):
    assert_error(post(keyed, CHAT, b"{not json", key=None), 401, code="invalid_api_key")
    assert_error(post(keyed, CHAT, b"{not json", key="wrong"), 401, code="invalid_api_key")
    assert_error(post(keyed, CHAT, b"{not json"), 400, code="invalid_json")  # with the key: the body's turn
    # a body that never comes: no key is a 401 at once, and the connection is closed (nothing left waiting)
    with connect(keyed.port) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{\"pro")
        status, headers, body = split_response(read_all(s, 10))
        assert time.monotonic() - t0 < TIMEOUT
    assert status == 401 and error_of(status, headers, body)["code"] == "invalid_api_key"
    assert headers["connection"] == "close"
    # the page, its files and /health need no key
    assert httpx.get(keyed.url + "/health").status_code == 200


# ---- one error shape -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body,status,code", [
    ("POST", CHAT, b"{not json", 400, "invalid_json"),
    ("POST", CHAT, b"", 400, "invalid_json"),
    ("POST", CHAT, b"[1, 2]", 400, "invalid_json"),
    ("POST", CHAT, b'{"messages": NaN}', 400, "invalid_json"),
    ("POST", CHAT, b'{"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "too_deep"),
    ("POST", CHAT, b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "too_deep"),
    ("POST", CHAT, b'{"prompt": "' + b"x" * 70_000 + b'"}', 413, "request_too_large"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
    ("GET", "/v1/nothing-here", None, 404, "not_found"),
    ("GET", "/nothing-here", None, 404, "not_found"),
    ("GET", "/static/no-such-file.js", None, 404, "not_found"),
    ("GET", CHAT, None, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed"),
    ("PUT", "/health", None, 405, "method_not_allowed"),
    ("GET", "/v1/models/other-model", None, 404, "model_not_found"),
])
def test_every_error_is_openai_json(keyed, method, path, body, status, code):
    r = httpx.request(method, keyed.url + path, content=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(r, status, code=code)
    assert "detail" not in r.text


def test_malformed_http_and_huge_headers_get_json_400(keyed):
    big = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (200 << 10)
    for data in (b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n", big, big + b"\r\n\r\n"):  # headers over 16 KiB
        status, headers, body = raw_request(keyed.port, data)
        assert status == 400 and error_of(status, headers, body)["code"] == "invalid_http"


def test_a_failing_handler_is_a_json_500():
    """The catch-all handler (a bug in a route) answers 500 in the same shape."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lmforge.serve.app import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    err = assert_error(r, 500, code="internal_error")
    assert "RuntimeError" in err["message"]


# ---- invalid Unicode, strict types, unsupported fields --------------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    (CHAT, {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\ud800"]}, "stop.1"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "fox", "stop": "\udc00"}, "stop"),
])
def test_lone_surrogates_are_400_naming_the_field(keyed, path, body, param):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \\udXXX escape
    assert b"\\ud" in raw
    err = assert_error(post(keyed, path, raw), 400, param=param, code="invalid_unicode")
    assert param in err["message"]
    # and as raw UTF-8-encoded surrogate bytes: not UTF-8 at all
    raw8 = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert_error(post(keyed, path, raw8), 400, code="invalid_json")


@pytest.mark.parametrize("field,value,param", [
    ("max_tokens", True, "max_tokens"), ("max_tokens", 2.0, "max_tokens"), ("max_tokens", "3", "max_tokens"),
    ("stream", "yes", "stream"), ("stream", 1, "stream"), ("temperature", "0.5", "temperature"),
    ("temperature", True, "temperature"), ("top_p", "1", "top_p"), ("n", True, "n"), ("n", 2, "n"),
    ("seed", 1.5, "seed"), ("stop", 5, "stop"), ("top_k", False, "top_k"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("max_completion_tokens", True, "max_completion_tokens"), ("temperature", 1e400, "temperature"),
    ("messages", [{"role": "user", "content": 5}], "messages.0.content"),
    ("messages", [{"role": True, "content": "x"}], "messages.0.role"),
])
def test_strict_types(keyed, field, value, param):
    body = chat_body()
    body[field] = value
    raw = json.dumps(body).encode().replace(b"Infinity", b"1e400")
    err = assert_error(post(keyed, CHAT, raw), 400, param=param)
    assert param in err["message"]


@pytest.mark.parametrize("path,field,value", [
    (CHAT, "logprobs", True), (CHAT, "top_logprobs", 2), (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    (CHAT, "presence_penalty", 0.5), (CHAT, "frequency_penalty", -1), (CHAT, "repetition_penalty", 1.2),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]), (CHAT, "tool_choice", "auto"),
    ("/v1/completions", "echo", True), ("/v1/completions", "suffix", "end"), ("/v1/completions", "best_of", 2),
    ("/v1/completions", "logprobs", 1), ("/v1/completions", "logprobs", 0),
])
def test_unimplemented_output_changing_fields_are_refused(keyed, path, field, value):
    body = chat_body() if path == CHAT else {"prompt": "fox", "max_tokens": 3}
    body[field] = value
    err = assert_error(post(keyed, path, body), 400, param=field, code="unsupported")
    assert field in err["message"]


def test_neutral_values_of_those_fields_are_accepted(keyed):
    body = chat_body(logprobs=False, response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
                     tools=[], user="u1", metadata={"a": "b"}, store=False)
    r = post(keyed, CHAT, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
             "logit_bias": None, "max_completion_tokens": None, "presence_penalty": None, "response_format": None}
    r = post(keyed, CHAT, {**chat_body(), **nulls})  # null: the default, as OpenAI reads it
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# ---- logit_bias ------------------------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(keyed, model_dir):
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(model_dir)
    base = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
    plain = post(keyed, "/v1/completions", base).json()["choices"][0]["text"]
    forced_id = tok.encode("fox")[-1]
    r = post(keyed, "/v1/completions", {**base, "logit_bias": {str(forced_id): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode([forced_id] * 6) != plain
    sampled = post(keyed, "/v1/completions", {**base, "temperature": 1.0, "seed": 3,
                                              "logit_bias": {str(forced_id): 100}}).json()
    assert sampled["choices"][0]["text"] == tok.decode([forced_id] * 6)
    # banning the greedy first token changes the reply
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.generate.engine import generate

    greedy = generate(load_model_dir(model_dir).eval(), [5, 6, 7], max_new_tokens=6)
    assert tok.decode(greedy) == plain
    banned = post(keyed, "/v1/completions", {**base, "logit_bias": {str(greedy[0]): -100}}).json()
    assert banned["choices"][0]["text"] != plain and banned["usage"]["completion_tokens"] == 6
    for bias, says in (({"99999": 1}, "outside the vocabulary"), ({"abc": 1}, "not a token id"),
                       ({"5": 101}, "outside [-100, 100]"), ({"5": "x"}, "logit_bias.5")):
        err = assert_error(post(keyed, "/v1/completions", {**base, "logit_bias": bias}), 400)
        assert says in err["message"] and err["param"].startswith("logit_bias")


def test_apply_logit_bias_touches_only_its_rows():
    import torch

    from lmforge.generate.sampling import apply_logit_bias

    logits = torch.zeros(3, 5)
    assert apply_logit_bias(logits, [None, None, None]) is logits
    out = apply_logit_bias(logits, [{2: 100.0}, None, {0: -100.0, 4: 1.5}])
    assert out.argmax(-1).tolist()[0] == 2 and out[1].eq(0).all()
    assert out[2].tolist() == [-100.0, 0.0, 0.0, 0.0, 1.5] and logits.eq(0).all()


# ---- Host without a key ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST.", True), ("[::1]:{port}", True),
    ("127.0.0.2", True), ("proxy.internal", True),
    ("evil.example", False), ("evil.example:{port}", False), ("127.0.0.1.evil.example", False),
    ("localhost.evil.example", False), ("0.0.0.0", False), ("192.168.1.5", False),
])
def test_host_is_checked_without_a_key(open_server, host, ok):
    h = {"Host": host.format(port=open_server.port)}
    r = httpx.get(open_server.url + "/v1/models", headers=h, timeout=30)
    if ok:
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    else:
        err = assert_error(r, 403, code="host_not_allowed")
        assert "--api-key" in err["message"]
        assert_error(httpx.post(open_server.url + CHAT, json=chat_body(), headers=h, timeout=30), 403)
        assert_error(httpx.get(open_server.url + "/", headers=h, timeout=30), 403)


def test_with_a_key_any_host_may_carry_it(keyed):
    r = httpx.get(keyed.url + "/v1/models", headers={"Host": "api.example.com", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


# ---- slow clients ---------------------------------------------------------------------------------------------
def test_slow_headers_and_bodies_are_dropped(keyed):
    partial = {
        "headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
        "body": post_bytes(CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', key=KEY)[:-20],
    }
    socks = {}
    t0 = time.monotonic()
    for what, data in partial.items():
        socks[what] = connect(keyed.port)
        socks[what].sendall(data)
    silent = connect(keyed.port)  # connects and sends nothing
    for what, s in socks.items():
        status, headers, body = split_response(read_all(s, TIMEOUT + 10))
        took = time.monotonic() - t0
        assert status == 408 and error_of(status, headers, body)["code"] == "request_timeout", what
        assert TIMEOUT - 0.5 < took < TIMEOUT + 5, (what, took)
        s.close()
    assert read_all(silent, TIMEOUT + 10) == b""  # closed without a word: it had asked nothing
    silent.close()
    # a connection trickling its headers a byte at a time is dropped all the same (a total, not an idle, timeout)
    with connect(keyed.port) as s:
        t0 = time.monotonic()
        closed = False
        for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > TIMEOUT + 5:
                break
        assert closed or read_all(s, 5).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - t0 < TIMEOUT + 5
    assert post(keyed, CHAT, chat_body()).status_code == 200  # and the server serves on


# ---- the open-file limit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("soft,hard,in_use,raised,cap,noted", [
    (100_000, 100_000, 20, None, 512, False),  # room enough: nothing changes
    (1024, 1 << 20, 20, 20 + 512 + 2048 + 32, 512, False),  # the soft limit is raised to what is needed, quietly
    (1024, 1024, 20, None, 512, False),  # only the accept queue shrinks (to 1024 - 20 - 32 - 512 = 460)
    (256, 256, 40, None, 256 - 40 - 32 - 16, True),  # the cap shrinks, with a note
])
def test_the_connection_cap_fits_the_open_file_limit(monkeypatch, soft, hard, in_use, raised, cap, noted):
    import resource

    from lmforge.serve import server

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda what: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda what, lim: calls.append(lim[0]))
    monkeypatch.setattr(server, "open_fds", lambda: in_use)
    limits, note = server.fit_to_fd_limit(server.ConnectionLimits())
    assert calls == ([raised] if raised else [])
    assert limits.max_connections == cap and (note is not None) == noted
    assert in_use + limits.max_connections + limits.backlog + server.FD_MARGIN <= max(soft, raised or 0)
    if noted:
        assert f"accepting at most {cap} at once" in note and "ulimit -n" in note


def test_no_room_for_connections_is_a_one_line_error(monkeypatch):
    import resource

    from lmforge.config import UserError
    from lmforge.serve import server

    monkeypatch.setattr(resource, "getrlimit", lambda what: (64, 64))
    monkeypatch.setattr(server, "open_fds", lambda: 30)
    with pytest.raises(UserError, match="no room for connections; raise it"):
        server.fit_to_fd_limit(server.ConnectionLimits())
