"""`lmforge serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]`: run the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress
import os
import sys

HELP = "serve a model dir over an OpenAI-compatible HTTP API (continuous batching) with a chat page at /"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model dir (RUN/model, an imported or fine-tuned model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY)")
    p.add_argument("--model-name", default=None, help="the id clients use (default: the model dir's name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core but one, left to the HTTP "
                   "side; at least 1)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before answering 429")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per sequence, prompt + reply (default: the model's max_seq_len, or what the KV "
                        "cache holds when that is less)")
    # the serving engine: paged KV cache and chunked prefill
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="memory of the paged KV cache's block pool, shared by all sequences (default: --max-batch "
                        "full contexts, at most 80%% of the free GPU memory, or on the CPU 4 GiB and half the "
                        "available memory)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens one engine step computes (decode rows + prompt chunks): a longer prompt is "
                        "prefilled over several steps while other streams keep decoding (default: 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (413 above it; default: the model's context - 1)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above it)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    # ---- connections and slow clients (lmforge.serve.server, lmforge.serve.limits) ----
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at once; one more evicts the longest-stalled one (or gets 503); "
                        "lowered to fit the open-file limit (ulimit -n)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's line and headers (closed after)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request has to send its whole body (408 after)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name answered without --api-key, beside localhost, 127.0.0.1 and [::1] "
                        "(DNS-rebinding protection; repeatable)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    from lmforge.config import UserError

    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"--host {args.host} exposes the server beyond this machine; pass --api-key KEY "
                        "(or bind 127.0.0.1)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1")
    for flag in ("max_batch", "max_queue", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.max_connections < 1:
        raise UserError(f"--max-connections {args.max_connections} must be at least 1")
    for flag in ("header_timeout", "body_timeout"):
        value = getattr(args, flag)
        if not 0 < value <= 3600:  # NaN fails too
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a number of seconds in (0, 3600]")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UserError(f"--max-prompt-tokens {args.max_prompt_tokens} must be at least 1")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise UserError(f"--kv-cache-gb {args.kv_cache_gb} must be a positive number of GiB")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk} must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        raise UserError(f"--max-context {args.max_context} must be at least 2 (a prompt token and a reply token)")
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model} is not a directory; pass a model dir (RUN/model)")


def run(args) -> int:
    from lmforge.config import UserError

    check_args(args)  # before the model is loaded
    try:
        import uvicorn

        from lmforge.serve.app import ServeSettings, create_app
        from lmforge.serve.server import ConnectionLimits, fit_to_fd_limit, make_server
    except ModuleNotFoundError as e:
        raise UserError(f"lmforge serve needs the 'serve' extra ({e.name} is missing); "
                        "pip install 'lmforge[serve]'") from None
    import torch

    from lmforge.generate.batcher import serving_threads

    torch.set_num_threads(args.threads or serving_threads())  # default: all cores but one (the HTTP loop)
    settings = ServeSettings(n_slots=args.max_batch, max_queue=args.max_queue,
                             max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                             max_context=args.max_context, kv_cache_gb=args.kv_cache_gb,
                             prefill_chunk=args.prefill_chunk, body_timeout=args.body_timeout,
                             allowed_hosts=(args.host, *args.allow_host))
    app = create_app(args.model, args.api_key, settings=settings, device=args.device, model_name=args.model_name)
    limits, note = fit_to_fd_limit(ConnectionLimits(max_connections=args.max_connections,
                                                    header_timeout=args.header_timeout))  # counted after loading
    if note:
        print(note, file=sys.stderr, flush=True)
    server = make_server(app, args.host, args.port, limits, log_level=args.log_level, access_log=False,
                         timeout_graceful_shutdown=30,  # then open streams are cut (their slots freed)
                         server_class=_server_class(uvicorn))
    _announce_when_up(server, app.state.engine, limits.max_connections)
    server.run()
    print("lmforge serve: stopped", flush=True)
    return 0


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, except that Ctrl-C / SIGTERM, after the graceful shutdown, end the command
        normally (exit 0) instead of being raised again (a server stopped on request did not fail)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


def _announce_when_up(server, engine, max_connections: int) -> None:
    """Print one line with the bound address once the socket listens (``--port 0`` picks a free port)."""
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"lmforge serve: model '{engine.name}' at http://{shown}:{port}/ (OpenAI API at /v1); "
                      f"{engine.settings.n_slots} slots x {engine.context} tokens, KV cache "
                      f"{_size(engine.cache_bytes())}; up to {max_connections} connections", flush=True)
                return

    server.startup = startup


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):  # the unit the loop stops at is the one printed
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:,.1f} {unit}"
