"""`lmforge serve` as a real process for the hardening and load tests: a tiny model dir, the process on
127.0.0.1:free-port (its stderr in a log file), raw-socket and HTTP helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINES = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
         "Serving models with continuous batching is fun.", "你好，世界。今天天气很好。"] * 10


def tiny_model_dir(root: Path, make_tokenizer) -> Path:
    import torch

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    tok = make_tokenizer(root, LINES, vocab_size=300, name="tok")
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=256)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # never end a turn: replies run to max_tokens (deterministic lengths)
        for t in {tok.eos_id, tok.special_tokens["<|end|>"]}:
            model.tok_embeddings.weight[t] = 0.0
            model.output.weight[t] = 0.0
    return Path(save_model_dir(model, root / "tiny", tokenizer_dir=str(root / "tok")))

# `python -m lmforge` under a lowered RLIMIT_NOFILE (soft = hard = argv[1])
LIMITED = ("import resource, runpy, sys; n = int(sys.argv.pop(1)); "
           "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); runpy.run_module('lmforge', run_name='__main__')")


class ServeProcess:
    """``python -m lmforge serve --model DIR --port 0 ARGS``; ``url``, ``port``, ``pid``, ``log()``.
    ``nofile``: the process's open-file limit (soft and hard), set before lmforge starts."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str, nofile: int | None = None,
                 timeout: float = 120):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 — open for the process's life
        start = ["-m", "lmforge"] if nofile is None else ["-c", LIMITED, str(nofile)]
        self.proc = subprocess.Popen([sys.executable, *start, "serve", "--model", str(model_dir),
                                      "--port", "0", "--device", "cpu", "--threads", "1", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        line = ""
        while not line and time.monotonic() < deadline:  # "lmforge serve: model 'tiny' at http://127.0.0.1:P/ …"
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        if " at http://" not in line:
            self.stop()
            raise AssertionError(f"lmforge serve did not start: {line!r}\n{self.log()[-3000:]}")
        self.banner = line
        self.url = line.split(" at ")[1].split("/ ")[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")  # written by the process alone

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def connect(port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_all(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes: then what came)."""
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return out


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
    return status, headers, body


def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection, read until the server closes it (every error response closes)."""
    with connect(port) as s:
        s.sendall(data)
        return split_response(read_all(s, timeout))


def post_bytes(path: str, body: bytes, *, key: str | None = None, host: str = "127.0.0.1",
               extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The ``error`` object of an OpenAI-shaped error response (asserting the shape)."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err
    return err
