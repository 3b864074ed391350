"""`lmforge dashboard [--runs DIR ...] [--host 127.0.0.1] [--port 8050] [--api-key KEY] [--allow-launch]`:
watch, compare (and with --allow-launch start and stop) runs in a browser."""

from __future__ import annotations

import os
import sys

HELP = "watch and compare training runs in a browser: run list, live curves, checkpoints, config diff"


def add_arguments(p) -> None:
    p.add_argument("--runs", action="append", default=None, metavar="DIR",
                   help="a dir holding run dirs (or one run dir), walked 4 levels deep; repeatable "
                        "(default: ./runs if it exists, else .)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8050, help="port (0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /api/* (default: $LMFORGE_API_KEY)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name answered without --api-key, beside localhost, 127.0.0.1 and [::1] "
                        "(DNS-rebinding protection; repeatable)")
    p.add_argument("--allow-launch", action="store_true",
                   help="let the page start `lmforge pretrain` runs (in the first --runs dir) from a packaged "
                        "recipe and stop the runs it started (SIGTERM: they checkpoint and exit)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def check_args(args) -> list[str]:
    """The roots, checked; one-line errors for a bad flag."""
    from lmforge.cli.serve import is_loopback
    from lmforge.config import UserError

    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"--host {args.host} exposes the dashboard beyond this machine; pass --api-key KEY "
                        "(or bind 127.0.0.1)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    roots = args.runs or (["runs"] if os.path.isdir("runs") else ["."])
    for r in roots:
        if not os.path.isdir(r):
            raise UserError(f"--runs {r} is not a directory; pass the dir your runs are written under "
                            "(run.dir's parent)")
    return roots


def cuda_machine() -> dict | None:
    """The first CUDA device's memory, for the launch form's planner verdict (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 1e9, 2)}


def run(args) -> int:
    from lmforge.config import UserError

    roots = check_args(args)
    try:
        from lmforge.dashboard.app import create_app
        from lmforge.serve.server import make_server
    except ModuleNotFoundError as e:
        raise UserError(f"lmforge dashboard needs the 'serve' extra ({e.name} is missing); "
                        "pip install 'lmforge[serve]'") from None
    app = create_app(roots, api_key=args.api_key, allowed_hosts=(args.host, *args.allow_host),
                     allow_launch=args.allow_launch, machine=cuda_machine() if args.allow_launch else None)
    server = make_server(app, args.host, args.port, log_level=args.log_level, access_log=False,
                         timeout_graceful_shutdown=2)  # open live streams are cut after 2 s
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"lmforge dashboard: http://{shown}:{port}/ watching {', '.join(roots)}", flush=True)
                return

    server.startup = startup
    server.run()
    print("lmforge dashboard: stopped", file=sys.stderr, flush=True)
    return 0
