"""The dashboard's ASGI app: a JSON API over the run dirs under the roots, a live metrics stream, the page.

Routes (every run named as the runs list names it, ``ROOT_INDEX/REL/PATH``; see :mod:`lmforge.dashboard.runs`):

* ``GET /api/runs`` — every run with its status, model, data, steps / tokens, last and best validation loss /
  bits per byte, disk used, garbage lines skipped;
* ``GET /api/run?id=`` — one run: the same, plus checkpoints, eval results, samples files, config, report.md,
  events;
* ``GET /api/series?id=`` — its downsampled series (train and eval columns) and the cursor the stream continues at;
* ``GET /api/stream?id=&ino=&offset=&line=&bad=&t=&last_step=`` — server-sent events: ``rows`` (new rows, in
  file order, each once, with ``_line`` / ``_t``, and the cursor after them), ``reset`` (the file was rewritten
  by a resume / rollback or replaced: fetch the series again and reopen the stream from its cursor);
* ``GET /api/compare?id=A&id=B…`` — each run's summary and series, and the config keys that differ;
* ``GET /api/file?id=&name=report.png|report.md`` — the run's report;
* ``GET /api/samples?id=[&name=]`` — the sample generations the run logged (GRPO's ``completions/step_N.jsonl``):
  the files, or one file's rows (bounded);
* ``GET /api/launch``, ``GET /api/launch/fields?recipe=``, ``POST /api/launch/plan`` (the planner's memory
  verdict for this machine), ``POST /api/launch``, ``POST /api/stop`` — with ``--allow-launch`` only;
* ``GET /`` and ``/static/*`` — the page (``lmforge/dashboard/static``), ``GET /health``.

The front door is serve's :class:`lmforge.serve.limits.Guard` (Host check against DNS rebinding without a key;
with ``--api-key`` every ``/api`` path needs ``Authorization: Bearer KEY``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmforge.config import UserError
from lmforge.dashboard import launch as launching
from lmforge.dashboard.metrics import Cursor, MetricsReader
from lmforge.dashboard.runs import (
    Refused,
    Roots,
    RunCache,
    checkpoints,
    config_diff,
    describe,
    eval_results,
    read_config,
    read_samples,
    read_small,
    sample_files,
)
from lmforge.serve.limits import Guard

IDS = Query(..., description="run names, as /api/runs names them")
STATIC_DIR = Path(__file__).resolve().parent / "static"
POLL_S = 0.25  # how often a live stream looks at its file's size
HEARTBEAT_S = 10.0
MAX_COMPARE = 8
STREAM_CHUNK = 1 << 20  # bytes per stream event at most (a backlog arrives in several events)


class DashboardGuard(Guard):
    """serve's guard, with the API key required on ``/api`` paths (the page and its files stay open)."""

    def _key_error(self, scope, headers: dict):
        path = scope.get("path", "")
        if path == "/api" or path.startswith("/api/"):
            return super()._key_error({**scope, "path": "/v1"}, headers)
        return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _same_origin(req: Request) -> bool:
    """A state-changing request came from this page: JSON (a cross-site form cannot send it without a CORS
    preflight, which this server never grants) and, when the browser names its origin, this host."""
    if req.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return False
    origin = req.headers.get("origin")
    if origin is None:
        return True
    return origin.split("://", 1)[-1].rstrip("/").lower() == req.headers.get("host", "").lower()


def create_app(roots: list[str], *, api_key: str | None = None, allowed_hosts=(), budget_s: float = 1.0,
               max_points: int | None = None, poll_s: float = POLL_S, allow_launch: bool = False,
               machine: dict[str, Any] | None = None):
    """The guarded ASGI app over ``roots``; ``budget_s``: reading time per request for a big metrics file;
    ``allow_launch``: pretrain / finetune runs may be started (in the first root) and stopped from the page;
    ``machine``: ``{"device": "cuda"|"cpu", "name", "memory_gb"}`` the launch plans are checked against
    (default: this machine's RAM)."""
    machine = machine or launching.machine_memory()
    app = FastAPI(title="lmforge dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    state = Roots(roots)
    cache = RunCache(budget_s=budget_s, max_points=max_points)
    launcher = launching.Launcher(state.roots[0]) if allow_launch else None

    def stoppable(path: Path) -> bool:
        proc = launcher.procs.get(path) if launcher else None
        return proc is not None and proc.poll() is None
    lock = asyncio.Lock()  # the cache's readers are advanced by one request at a time

    @app.exception_handler(Refused)
    async def refused(_req, exc: Refused):
        return _error(exc.status, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "roots": [str(r) for r in state.roots]}

    @app.get("/api/runs")
    async def runs():
        async with lock:
            found = await asyncio.to_thread(state.discover)
            rows = []
            for name, path in found:
                row = await asyncio.to_thread(describe, state, cache, name, path, min(budget_s, 0.25))
                rows.append({**row, "stoppable": stoppable(path)})
        return {"roots": [str(r) for r in state.roots], "runs": rows, "launch": allow_launch}

    @app.get("/api/run")
    async def run(id: str = Query(..., max_length=4096)):
        path = state.resolve(id)
        async with lock:
            row = await asyncio.to_thread(describe, state, cache, id, path)
            events = list(cache.readers[path].events)
        return {**row, "stoppable": stoppable(path), "events": events, "checkpoints": await asyncio.to_thread(checkpoints, path),
                "eval_results": await asyncio.to_thread(eval_results, path), "config": read_config(path),
                "samples": await asyncio.to_thread(sample_files, path),
                "report_md": read_small(path / "report.md", 1 << 20),
                "report_png": (path / "report.png").is_file() and not (path / "report.png").is_symlink()}

    @app.get("/api/series")
    async def series(id: str = Query(..., max_length=4096)):
        path = state.resolve(id)
        async with lock:
            r = await asyncio.to_thread(cache.reader, path)
            return {"id": id, "series": r.series(), "events": list(r.events), "summary": r.summary(),
                    "cursor": r.cursor.as_dict(), "size": r.size(), "indexed": r.done()}

    @app.get("/api/compare")
    async def compare(id: list[str] = IDS):
        if len(id) > MAX_COMPARE:
            return _error(400, f"compare takes at most {MAX_COMPARE} runs; {len(id)} were given")
        paths = {name: state.resolve(name) for name in id}
        out: dict[str, Any] = {"runs": {}, "series": {}}
        async with lock:
            for name, path in paths.items():
                out["runs"][name] = await asyncio.to_thread(describe, state, cache, name, path)
                out["series"][name] = cache.readers[path].series()
        out["config_diff"] = config_diff({name: read_config(path) for name, path in paths.items()})
        return out

    @app.get("/api/file")
    async def file(id: str = Query(..., max_length=4096), name: str = Query(...)):
        path = state.resolve(id)
        if name not in ("report.png", "report.md"):
            return _error(404, f"'{name[:100]}' is not served; ask for report.png or report.md")
        f = path / name
        if f.is_symlink() or not f.is_file():
            return _error(404, f"{id} has no {name} yet (written at the end of a run)")
        if name == "report.md":
            return PlainTextResponse(read_small(f, 1 << 20) or "")
        return FileResponse(f, media_type="image/png")

    @app.get("/api/samples")
    async def samples(id: str = Query(..., max_length=4096), name: str | None = Query(None, max_length=300)):
        path = state.resolve(id)
        if name is None:
            return {"id": id, "files": await asyncio.to_thread(sample_files, path)}
        return {"id": id, **await asyncio.to_thread(read_samples, path, name)}

    @app.get("/api/stream")
    async def stream(req: Request, id: str = Query(..., max_length=4096), ino: int = 0,
                     offset: int = 0, line: int = 0, bad: int = 0, t: float = 0.0, last_step: int = 0):
        path = state.resolve(id)
        if min(ino, offset, line, bad, last_step) < 0:
            return _error(400, "the stream's cursor (ino, offset, line, bad, last_step) cannot be negative")
        reader = MetricsReader(path / "metrics.jsonl", keep_series=False)
        reader.cursor = Cursor(ino=ino, offset=offset, line=line, bad=bad, t=t, last_step=last_step)
        return StreamingResponse(_events(req, reader, poll_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/launch")
    async def launch_info():
        if launcher is None:
            return {"allowed": False, "recipes": []}
        return {"allowed": True, "recipes": launching.recipes(), "root": str(state.roots[0]), "verbs": launching.VERBS}

    @app.get("/api/launch/fields")
    async def launch_fields(recipe: str = Query(..., max_length=200)):
        if launcher is None:
            return _error(403, "launching is off; start the dashboard with --allow-launch")
        try:
            return {"recipe": recipe, "fields": await asyncio.to_thread(launching.fields, recipe)}
        except UserError as e:
            return _error(400, str(e))

    async def launch_body(req: Request) -> dict[str, Any] | JSONResponse:
        if launcher is None:
            return _error(403, "launching is off; start the dashboard with --allow-launch")
        if not _same_origin(req):
            return _error(403, "send the launch as JSON from the dashboard's own page")
        try:
            body = await req.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        return body

    @app.post("/api/launch/plan")
    async def launch_plan(req: Request):
        body = await launch_body(req)
        if isinstance(body, JSONResponse):
            return body
        try:
            return await asyncio.to_thread(launching.plan, body, state.roots[0], machine)
        except UserError as e:  # ConfigError included: the CLI's own one-line message
            return _error(400, str(e))

    @app.post("/api/launch")
    async def launch(req: Request):
        body = await launch_body(req)
        if isinstance(body, JSONResponse):
            return body
        try:
            started = await asyncio.to_thread(launcher.launch, body)
        except UserError as e:  # ConfigError included: the CLI's own one-line message
            return _error(400, str(e))
        return {**started, "id": "0/" + Path(started["run_dir"]).name}

    @app.post("/api/stop")
    async def stop(req: Request):
        if launcher is None:
            return _error(403, "launching is off; start the dashboard with --allow-launch")
        if not _same_origin(req):
            return _error(403, "send the stop as JSON from the dashboard's own page")
        try:
            body = await req.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        path = state.resolve(body.get("id") if isinstance(body, dict) else None)
        try:
            return launcher.stop(path)
        except UserError as e:
            return _error(409, str(e))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = STATIC_DIR / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return DashboardGuard(app, api_key=api_key, allowed_hosts=allowed_hosts)


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(req: Request, reader: MetricsReader, poll_s: float):
    """``rows`` events as the file grows; ``reset`` (and the end of this stream) when it is rewritten."""
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    yield b": lmforge dashboard stream\n\n"
    while True:
        if reader.replaced():
            yield _sse("reset", {"reason": "metrics.jsonl was rewritten (a resume or a rollback) or replaced"})
            return
        before = reader.cursor.bad
        rows = await asyncio.to_thread(reader.read, STREAM_CHUNK)
        if rows or reader.cursor.bad != before:
            yield _sse("rows", {"rows": rows, "cursor": reader.cursor.as_dict()}, reader.cursor.offset)
            quiet_since = loop.time()
            continue
        if await req.is_disconnected():
            return
        if loop.time() - quiet_since > HEARTBEAT_S:
            yield b": heartbeat\n\n"
            quiet_since = loop.time()
        await asyncio.sleep(poll_s)

