"""`lmforge serve` for real: uvicorn on 127.0.0.1:free-port with a tiny model dir, driven by the official
`openai` client (streaming and not, chat and completions, stop strings, seeds, a client hanging up mid-stream,
a full queue, bad requests, auth) and by raw HTTP where the client hides the wire."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _ports import free_port

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx

KEY = "test-key-123"
CONTEXT = 1024
MAX_PROMPT = 200
LINES = ["The quick brown fox jumps over the lazy dog.", "你好，世界。今天天气很好。",
         "Hello there, how are you today?", "Serving models with continuous batching is fun."] * 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tokenizer):
    import torch

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer(root, LINES, vocab_size=300, name="tok")
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=CONTEXT)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # never end a turn: every stream runs to its length or stop string (deterministic tests)
        for t in {tok.eos_id, tok.special_tokens["<|end|>"]}:
            model.tok_embeddings.weight[t] = 0.0
            model.output.weight[t] = 0.0
    return save_model_dir(model, root / "tiny-chat", tokenizer_dir=str(root / "tok"))


class Served:
    """uvicorn running `create_app` in a thread, its app, and clients."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.scheduler = app.state.engine.scheduler
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)

    def wait_for(self, cond, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not cond(self.scheduler.stats()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.scheduler.stats()}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def served(model_dir):
    from lmforge.serve.app import ServeSettings, create_app

    app = create_app(model_dir, KEY, settings=ServeSettings(n_slots=4, max_queue=16, max_prompt_tokens=MAX_PROMPT,
                                                            max_body_bytes=64 << 10), device="cpu")
    s = Served(app)
    yield s
    s.stop()


def chat(served, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return served.client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": content}],
                                                 **kw)


def stream_text(stream):
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            if getattr(c, "delta", None) is not None:
                text += c.delta.content or ""
            else:
                text += c.text
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, reasons


# ---- API surface -----------------------------------------------------------------------------------
def test_models_auth_and_page(served):
    assert [m.id for m in served.client.models.list()] == ["tiny-chat"]
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=served.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                                default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert httpx.get(served.url + "/static/no-such-file.js").status_code == 404
    assert httpx.get(served.url + "/health").json()["slots"] == 4


def test_chat_streaming_equals_non_streaming_with_usage(served, model_dir):
    from lmforge.tokenizer.chat_template import encode_prompt
    from lmforge.tokenizer.core import load_tokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，世界"}]
    full = served.client.chat.completions.create(model="tiny-chat", messages=msgs, temperature=0, max_tokens=20)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    prompt_ids = encode_prompt(load_tokenizer(model_dir), msgs)
    assert full.usage.prompt_tokens == len(prompt_ids) and full.usage.completion_tokens == 20
    assert full.usage.total_tokens == len(prompt_ids) + 20
    stream = served.client.chat.completions.create(model="tiny-chat", messages=msgs, temperature=0, max_tokens=20,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert stream_text(chunks) == (choice.message.content, ["length"])


def test_completions_stop_strings_streamed_and_not(served):
    free = served.client.completions.create(model="tiny-chat", prompt="The quick brown", temperature=0,
                                            max_tokens=40)
    text = free.choices[0].text
    assert free.object == "text_completion" and free.choices[0].finish_reason == "length" and len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters from the middle of the greedy text
    want = text[: text.find(stop)]
    cut = served.client.completions.create(model="tiny-chat", prompt="The quick brown", temperature=0,
                                           max_tokens=40, stop=[stop, "never-there"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (want, "stop")
    assert cut.usage.completion_tokens < 40
    streamed = served.client.completions.create(model="tiny-chat", prompt="The quick brown", temperature=0,
                                                max_tokens=40, stop=stop, stream=True)
    assert stream_text(streamed) == (want, ["stop"])
    # several prompts in one request: one choice each, each equal to its prompt alone
    multi = served.client.completions.create(model="tiny-chat", prompt=["The quick brown", "Hello"],
                                             temperature=0, max_tokens=40)
    assert [c.index for c in multi.choices] == [0, 1] and multi.choices[0].text == text


def test_greedy_in_a_batch_equals_alone_and_the_library(served, model_dir):
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.generate.engine import generate
    from lmforge.tokenizer.chat_template import encode_prompt
    from lmforge.tokenizer.core import load_tokenizer

    prompts = ["你好", "The lazy dog", "How are you?", "Serving models", "fox", "今天天气"]
    lengths = [30, 12, 25, 8, 40, 16]  # different lengths: requests leave the batch at different steps
    # the first four start together; the rest join a running batch
    with served.scheduler.paused(), ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(chat, served, p, max_tokens=n, stream=True) for p, n in zip(prompts[:4], lengths)]
        served.wait_for(lambda s: s["queued"] == 4, "four queued requests")
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = [f.result() for f in futs]
        late = [pool.submit(lambda p=p, n=n: stream_text(chat(served, p, max_tokens=n, stream=True)))
                for p, n in zip(prompts[4:], lengths[4:])]
        batched = [pool.submit(stream_text, s) for s in streams]
        batched = [f.result()[0] for f in batched] + [f.result()[0] for f in late]
    assert served.scheduler.batcher.free_slots == 4
    alone = [chat(served, p, max_tokens=n).choices[0].message.content for p, n in zip(prompts, lengths)]
    assert batched == alone
    model, tok = load_model_dir(model_dir).eval(), load_tokenizer(model_dir)
    for p, n, got in zip(prompts, lengths, alone):
        ids = encode_prompt(tok, [{"role": "user", "content": p}])
        assert got == tok.decode(generate(model, ids, max_new_tokens=n))


def test_seed_reproduces_sampling_even_beside_other_requests(served):
    kw = {"temperature": 1.2, "top_p": 0.95, "max_tokens": 24}
    a = chat(served, "Hello there", seed=7, **kw).choices[0].message.content
    with ThreadPoolExecutor(3) as pool:
        noise = [pool.submit(chat, served, "fox", max_tokens=30) for _ in range(2)]
        b = pool.submit(chat, served, "Hello there", seed=7, **kw).result().choices[0].message.content
        [f.result() for f in noise]
    assert a == b
    others = {chat(served, "Hello there", seed=s, **kw).choices[0].message.content for s in (8, 9, 10)}
    assert others != {a}
    for odd in (-1, 2**64 + 7):  # any integer is a seed
        assert chat(served, "Hello there", seed=odd, **kw).choices[0].finish_reason == "length"


# ---- limits and failures ------------------------------------------------------------------------------
def test_client_hanging_up_mid_stream_frees_its_slot(served):
    before = served.scheduler.stats()["cancelled"]
    stream = chat(served, "Hello there", max_tokens=CONTEXT - 64, stream=True)
    got = ""
    for chunk in stream:  # read until real text arrives: the request holds a slot and is decoding
        got += chunk.choices[0].delta.content or ""
        if got:
            break
    assert served.scheduler.stats()["active"] == 1
    stream.close()  # hang up
    served.wait_for(lambda s: s["active"] == 0 and s["cancelled"] == before + 1, "the slot to be freed")
    assert served.scheduler.stats()["steps"] > 0
    assert chat(served, "fox", max_tokens=5).choices[0].finish_reason == "length"  # the next one is served


def test_client_hanging_up_before_its_turn_leaves_the_queue(served):
    before = served.scheduler.stats()["cancelled"]
    body = {"messages": [{"role": "user", "content": "fox"}], "max_tokens": 5}
    with served.scheduler.paused():  # the request waits in the queue; its client gives up after 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=httpx.Timeout(60, read=1.0))
        served.wait_for(lambda s: s["queued"] == 0 and s["cancelled"] == before + 1, "the request to be dropped")
    assert served.scheduler.stats()["active"] == 0


def test_full_queue_answers_429_then_recovers(served):
    sched = served.scheduler
    old = sched.max_queue
    try:
        sched.max_queue = 2
        with ThreadPoolExecutor(2) as pool:
            with sched.paused():
                waiting = [pool.submit(chat, served, "fox", max_tokens=4) for _ in range(2)]
                served.wait_for(lambda s: s["queued"] == 2, "two queued requests")
                with pytest.raises(openai.RateLimitError) as e:
                    chat(served, "fox", max_tokens=4)
                assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            assert [f.result().choices[0].finish_reason for f in waiting] == ["length", "length"]
    finally:
        sched.max_queue = old


@pytest.mark.parametrize("body,status,param", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "fox " * (MAX_PROMPT + 10)}]}, 413, "messages"),
])
def test_bad_chat_requests_get_openai_errors(served, body, status, param):
    r = httpx.post(served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_bad_bodies_and_completion_prompts(served):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", content=json.dumps({"prompt": "x" * (70 << 10)}), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(served.url + "/v1/completions", json={"prompt": [5, 99999]}, headers=h)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="tiny-chat", prompt="", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="other", prompt="fox", max_tokens=3)
    # the server is still healthy after every refusal
    ok = served.client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ok.usage.prompt_tokens == 3 and ok.usage.completion_tokens == 3


def test_a_server_shutting_down_answers_503(model_dir, served):
    from lmforge.serve.app import create_app

    engine = served.app.state.engine  # reuse the loaded model: a second app around it
    other = Served(create_app(model_dir, KEY, model=engine.model, tokenizer=engine.tokenizer))
    try:
        other.scheduler.stop()  # what the app's shutdown does first
        with pytest.raises(openai.InternalServerError) as e:
            other.client.completions.create(model="tiny-chat", prompt="fox", max_tokens=3)
        assert e.value.status_code == 503 and e.value.body["code"] == "unavailable"
        assert httpx.get(other.url + "/health").status_code == 503
    finally:
        other.stop()


# ---- the command ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,says", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 exposes the server"),
    (["--host", "192.168.1.5", "--port", "8080"], "pass --api-key"),
    (["--port", "70000"], "--port 70000"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--max-context", "1"], "--max-context 1"),
    (["--max-connections", "0"], "--max-connections 0"),
    (["--header-timeout", "0"], "--header-timeout 0.0 must be a number of seconds"),
    (["--body-timeout", "nan"], "--body-timeout nan"),
    (["--model", "{empty}"], "{empty}"),
    (["--model", "{missing}"], "is not a directory"),
])
def test_bad_serve_arguments_are_one_line_errors(model_dir, tmp_path, capsys, argv, says):
    from lmforge.cli import main

    (tmp_path / "empty").mkdir()
    fill = {"{empty}": str(tmp_path / "empty"), "{missing}": str(tmp_path / "missing")}
    argv = [fill.get(a, a) for a in argv]
    full = ["serve", *([] if "--model" in argv else ["--model", str(model_dir)]), *argv]
    assert main(full) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert fill.get(says, says) in err


def test_lmforge_serve_command_serves_until_terminated(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", "0",
                             "--model-name", "mine", "--device", "cpu", "--max-batch", "2", "--max-context", "64"],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "lmforge serve: model 'mine' at http://127.0.0.1:PORT/ ..."
        assert "model 'mine' at http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() else line
        assert "2 slots x 64 tokens, KV cache 32.0 KiB" in line  # 2 layers x 2 slots x 2 KV heads x 64 x 8 x 4 B x 2
        url = line.split(" at ")[1].split("/ ")[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["mine"]
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        with pytest.raises(openai.BadRequestError, match="context of 64 tokens"):
            client.completions.create(model="mine", prompt="fox", max_tokens=64)
        out = client.chat.completions.create(model="mine", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason == "length"
    finally:
        proc.terminate()  # a graceful shutdown and a normal end
        rc = proc.wait(60)
    assert rc == 0 and proc.stdout.read().strip() == "lmforge serve: stopped"
    assert "Traceback" not in proc.stderr.read()


def test_updates_that_piled_up_are_merged_per_choice():
    """When the event loop falls behind the engine, each choice's waiting updates go out as one chunk."""
    import asyncio

    from lmforge.generate.batcher import SamplingParams, Sequence, Update
    from lmforge.serve.app import _Stream

    async def drain():
        seqs = [Sequence([1], SamplingParams()), Sequence([2], SamplingParams())]
        stream = _Stream(None, seqs)
        for u in (Update(seqs[0], "a", [5], False), Update(seqs[1], "x", [6], False),
                  Update(seqs[0], "b", [7], True), Update(seqs[1], "y", [8], False)):
            stream.queue.put_nowait(u)
        got = []
        async for i, u in stream.updates():
            got.append((i, u.text, u.token_ids, u.finished))
            if len(got) == 2:
                stream.queue.put_nowait(Update(seqs[1], "z", [9], True))
        return got

    assert asyncio.run(drain()) == [(0, "ab", [5, 7], True), (1, "xy", [6, 8], False), (1, "z", [9], True)]
