"""The FastAPI app: OpenAI-compatible routes over one `Scheduler`, plus the chat page at ``/``.

``create_app(model_dir, ...)`` loads the model and tokenizer, builds the continuous batcher and returns the
app; the engine thread starts with the app (lifespan) and stops with it.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events ``data: {json}\\n\\n`` ending with ``data: [DONE]``), ``GET /health`` (slot and queue
counts), ``GET /`` (``lmforge/serve/static/index.html``) and ``/static/*`` (that folder).

In front of the routes, `lmforge.serve.limits.Guard` checks ``Host`` (without a key), the key (before the body
is read), the body's size and the time it takes to arrive; bodies are parsed by `lmforge.serve.protocol`
(strict types, valid Unicode, a depth cap); `install_error_handlers` gives every error OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.artifacts.identity import check_model_dir_tokenizer
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import UserError
from lmforge.generate.batcher import DEFAULT_BLOCK_SIZE, ContinuousBatcher, SamplingParams, Sequence, Update
from lmforge.generate.kv_cache import paged_cache_plan
from lmforge.serve import protocol as P
from lmforge.serve.limits import Guard
from lmforge.serve.scheduler import Job, QueueFull, Scheduler, Unavailable
from lmforge.tokenizer.chat_template import encode_prompt, special_token_strings, uses_bos
from lmforge.tokenizer.core import load_tokenizer

STATIC_DIR = Path(__file__).resolve().parent / "static"
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")
FALLBACK_PAGE = ("<!doctype html><meta charset='utf-8'><title>lmforge serve</title>"
                 "<p>lmforge serve is running. The chat page (lmforge/serve/static/index.html) is not installed; "
                 "use the API at <code>/v1/chat/completions</code>.</p>")


@dataclass
class ServeSettings:
    n_slots: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting for a slot before 429
    max_prompt_tokens: int | None = None  # default: the context minus one
    max_context: int | None = None  # tokens per sequence (prompt + reply); default: the model's context
    kv_cache_gb: float | None = None  # the paged KV cache's pool; default: n_slots full contexts within a budget
    prefill_chunk: int | None = None  # tokens per engine step before a prompt's prefill is split
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds to receive a whole request body (408 after)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered without an API key, beside the loopback ones
    default_completion_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    extra: dict = field(default_factory=dict)


class Engine:
    """The model side of the app: tokenizer, batcher, scheduler and request building."""

    def __init__(self, model, tokenizer, name: str, settings: ServeSettings):
        self.model, self.tokenizer, self.name, self.settings = model, tokenizer, name, settings

        p = next(model.parameters())  # the cache is sized from the memory it may take, before allocating it
        self.context, blocks = paged_cache_plan(model.cfg, settings.n_slots, settings.max_context,
                                                settings.kv_cache_gb, DEFAULT_BLOCK_SIZE, p.device, p.dtype)
        self.max_prompt = min(settings.max_prompt_tokens or self.context - 1, self.context - 1)
        batcher = ContinuousBatcher(model, tokenizer, settings.n_slots, self.context, kv_blocks=blocks,
                                    prefill_chunk=settings.prefill_chunk)
        self.scheduler = Scheduler(batcher, settings.max_queue)
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_ids = frozenset() if eos is None else frozenset([eos])
        specials = special_token_strings(tokenizer)
        self.turn_end_ids = self.eos_ids | {specials[t] for t in END_OF_TURN_TOKENS if specials.get(t) is not None}
        bos = getattr(tokenizer, "bos_id", None)
        self.text_prefix = [bos] if bos is not None and uses_bos(tokenizer) else []
        self.created = int(time.time())

    def cache_bytes(self) -> int:
        c = self.scheduler.batcher.cache
        return c.k.numel() * c.k.element_size() * 2

    # ---- request -> sequences ------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise P.APIError(404, f"model '{requested}' is not served here; this server serves '{self.name}' "
                             "(GET /v1/models)", param="model", code="model_not_found")

    def encode_completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.text_prefix + self.tokenizer.encode(prompt)
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise P.APIError(400, f"prompt holds token ids outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, messages)
        except UserError as e:  # the template refused the conversation (roles out of order, …)
            raise P.APIError(400, f"messages: {e}", param="messages") from None

    def sequence(self, ids: list[int], req: P._Request, max_tokens: int | None, default: int,
                 stop_ids: frozenset[int]) -> Sequence:
        n = len(ids)
        if n > self.max_prompt:
            raise P.APIError(413, f"the prompt has {n} tokens; this server accepts at most {self.max_prompt} "
                             f"(context {self.context}); shorten it", param="messages" if isinstance(
                                 req, P.ChatRequest) else "prompt", code="context_length_exceeded")
        room = self.context - n
        if max_tokens is not None and max_tokens > room:
            raise P.APIError(400, f"the prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.context} tokens; ask for at most {room}", param="max_tokens",
                             code="context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens or min(default, room), temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1.0 else None, top_k=req.top_k or None,
                                seed=req.seed, stop_strings=req.stop_strings(), stop_ids=stop_ids,
                                logit_bias=req.token_bias(self.model.cfg.vocab_size))
        return Sequence(ids, params, self.tokenizer)


class _Mailbox:
    """Hands the engine thread's updates to one event loop: one wake-up per engine step for every stream
    together (``call_soon_threadsafe`` writes to the loop's self-pipe and costs a loop iteration), not one
    per token per stream. ``post`` is called on the engine thread; ``_drain`` runs on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # (the mailbox must not keep a finished loop alive)
        self.items: deque = deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        self.items.append((queue, item))
        if not self.scheduled:  # the drain already scheduled (and not yet begun) takes this item too
            self.scheduled = True
            try:
                loop = self.loop()
                if loop is None:
                    raise RuntimeError("the event loop is gone")
                loop.call_soon_threadsafe(self._drain)
            except BaseException:  # a closed loop: nothing will drain; the caller cancels the job
                self.items.clear()
                self.scheduled = False
                raise

    def _drain(self) -> None:
        self.scheduled = False  # before taking: an item posted from here on schedules another drain
        items = self.items
        while items:
            queue, item = items.popleft()
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its _Mailbox


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


class _Stream:
    """The HTTP side of one request: its jobs in the scheduler and a queue their updates arrive on."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler = scheduler
        self.index = {s.id: i for i, s in enumerate(seqs)}
        post = _mailbox(asyncio.get_running_loop()).post

        def sink(item, _post=post, _q=self.queue):
            _post(_q, item)

        self.jobs = [Job(s, sink) for s in seqs]
        self.open = len(seqs)

    def submit(self) -> None:
        try:
            self.scheduler.submit(self.jobs)
        except QueueFull as e:
            raise P.APIError(429, str(e), code="queue_full") from None
        except Unavailable as e:
            raise P.APIError(503, f"{e}; try again later", code="unavailable") from None

    async def updates(self):
        """(choice index, Update) until every sequence has finished. What piled up while the event loop was
        busy is merged per choice (one chunk instead of one per token)."""
        while self.open:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            merged: dict[int, Update] = {}
            for item in items:
                if isinstance(item, Unavailable):
                    raise P.APIError(503, f"{item}; try again later", code="unavailable")
                if isinstance(item, BaseException):
                    raise P.APIError(500, f"generation failed: {type(item).__name__}: {item}", code="engine_error")
                i = self.index[item.seq.id]
                if i in merged:
                    prev = merged[i]
                    item = Update(item.seq, prev.text + item.text, prev.token_ids + item.token_ids, item.finished)
                merged[i] = item
                if item.finished:
                    self.open -= 1
            for i, update in merged.items():
                yield i, update

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.seq.finished:
                self.scheduler.cancel(job)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


_INDEX_MARK, _TEXT_MARK = 918273645, "\ue000lmforge-text\ue000"


def _sse_template(rendered: bytes):
    """``fill(index, text)`` giving the bytes of the event ``rendered`` with ``_INDEX_MARK`` and
    ``_TEXT_MARK`` replaced: the JSON of the envelope is built once per stream, not once per token."""
    # from the right: the id, model name and timestamp come first and could contain a marker's digits
    front, tail = rendered.rsplit(json.dumps(_TEXT_MARK, ensure_ascii=False).encode(), 1)
    head, middle = front.rsplit(str(_INDEX_MARK).encode(), 1)
    dumps = json.JSONEncoder(ensure_ascii=False).encode

    def fill(index: int, text: str) -> bytes:
        return b"".join((head, str(index).encode(), middle, dumps(text).encode(), tail))

    return fill


def create_app(model_dir, api_key: str | None = None, *, settings: ServeSettings | None = None,
               device: str | None = None, model_name: str | None = None, model=None, tokenizer=None) -> FastAPI:
    """The app serving ``model_dir`` (or an already loaded ``model`` + ``tokenizer``)."""
    settings = settings or ServeSettings()
    if model is None:
        model, tokenizer = load_for_serving(model_dir, device)
    name = model_name or Path(str(model_dir)).resolve().name
    engine = Engine(model, tokenizer, name, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="lmforge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=settings.allowed_hosts,
                       max_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)
    install_error_handlers(app)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "lmforge", "max_model_len": engine.context}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str):
        engine.check_model(model_id)
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "lmforge"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await asyncio.to_thread(P.parse_request, P.CompletionRequest, await request.body())  # CPU work
        engine.check_model(req.model)

        def build():  # tokenizing is CPU work: off the event loop
            return [engine.sequence(engine.encode_completion(p), req, req.max_tokens,
                                    settings.default_completion_tokens, engine.eos_ids) for p in req.prompts()]

        return await _respond(request, req, await asyncio.to_thread(build), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await asyncio.to_thread(P.parse_request, P.ChatRequest, await request.body())  # CPU work
        engine.check_model(req.model)

        def build():  # rendering the chat template and tokenizing: off the event loop
            ids = engine.encode_chat(req.conversation())
            return [engine.sequence(ids, req, req.token_limit(), engine.context, engine.turn_end_ids)]

        return await _respond(request, req, await asyncio.to_thread(build), chat=True)

    async def _respond(request: Request, req, seqs: list[Sequence], chat: bool):
        stream = _Stream(engine.scheduler, seqs)
        stream.submit()
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(_events(stream, req, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * len(seqs)
        reasons: list[str | None] = [None] * len(seqs)
        waiter = asyncio.ensure_future(_collect(stream, texts, reasons))
        try:
            while not waiter.done():  # a client that hangs up frees its slots
                await asyncio.wait([waiter], timeout=0.5)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    stream.cancel()
                    return _error(P.APIError(499, "the client closed the connection", code="client_closed"))
            waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
            stream.cancel()
        choice = P.chat_choice if chat else P.completion_choice
        obj = "chat.completion" if chat else "text_completion"
        return P.envelope(rid, obj, engine.name, choices=[choice(i, t, r) for i, (t, r) in
                                                          enumerate(zip(texts, reasons))], usage=_usage(seqs))

    async def _collect(stream: _Stream, texts: list[str], reasons: list[str | None]) -> None:
        async for i, u in stream.updates():
            texts[i] += u.text
            if u.finished:
                reasons[i] = u.seq.finish_reason

    async def _events(stream: _Stream, req, rid: str, chat: bool):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            return _sse(P.envelope(rid, obj, engine.name, created, choices=choices, **extra))

        # the per-token event, rendered once with markers and then filled in (equal to `chunk`'s bytes)
        delta = _sse_template(chunk([P.chat_delta(_INDEX_MARK, {"content": _TEXT_MARK}, None) if chat else
                                     P.completion_choice(_INDEX_MARK, _TEXT_MARK, None)]))

        try:
            if chat:
                yield chunk([P.chat_delta(0, {"role": "assistant", "content": ""}, None)])
            async for i, u in stream.updates():
                reason = u.seq.finish_reason if u.finished else None
                if not u.text and reason is None:
                    continue  # held-back text (a possible stop string, half a character)
                if chat:
                    if u.text:
                        yield delta(i, u.text)
                    if reason:
                        yield chunk([P.chat_delta(i, {}, reason)])
                elif reason is None:
                    yield delta(i, u.text)
                else:
                    yield chunk([P.completion_choice(i, u.text, reason)])
            if req.include_usage():
                yield chunk([], usage=_usage([j.seq for j in stream.jobs]))
        except P.APIError as e:  # mid-stream: the error travels as an event, then the stream ends
            yield _sse(e.body())
        finally:
            stream.cancel()
        yield b"data: [DONE]\n\n"

    @app.get("/health")
    async def health():
        stats = engine.scheduler.stats()
        ok = engine.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": engine.name, **stats},
                            status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(FALLBACK_PAGE)

    if STATIC_DIR.is_dir():  # the chat page's scripts and styles
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _error(err: P.APIError, headers=None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """One shape for every error the app answers: OpenAI's ``{"error": {message, type, param, code}}``.

    Client errors (4xx) are answered without a log line; an unexpected exception is a 500 in the same shape
    (the server then logs its traceback: a bug to report)."""

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        method, path = request.method, request.url.path[:200]
        if exc.status_code == 404:
            err = P.APIError(404, f"no route {method} {path}; the API is under /v1 (GET /v1/models, POST "
                             "/v1/chat/completions, POST /v1/completions)", code="not_found")
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            err = P.APIError(405, f"{method} is not allowed on {path}" + (f"; use {allow}" if allow else ""),
                             code="method_not_allowed")
        else:
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)[:200]
            err = P.APIError(exc.status_code, f"{detail} ({method} {path})")
        return _error(err, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):  # path parameters (bodies are parsed by P)
        err = exc.errors()[0] if exc.errors() else {}
        param = P._param([x for x in err.get("loc", ()) if x not in ("body", "path", "query")])
        return _error(P.APIError(400, f"{param or 'request'}: {err.get('msg', 'invalid')}", param=param))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return _error(P.APIError(500, f"internal error ({type(exc).__name__}); the server log has the "
                                 "details", code="internal_error"))


def _usage(seqs: list[Sequence]):
    return P.usage(sum(len(s.prompt) for s in seqs), sum(len(s.out) for s in seqs))


def load_for_serving(model_dir, device: str | None = None):
    """(model in eval mode, tokenizer) from a model dir; bf16 on CUDA, fp32 on CPU."""
    import torch

    check_model_dir_tokenizer(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = load_model_dir(model_dir, device=device, dtype=dtype).eval()
    return model, load_tokenizer(model_dir)


__all__ = ["Engine", "ServeSettings", "create_app", "install_error_handlers", "load_for_serving"]
