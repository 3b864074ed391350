"""`lmforge serve` under a slow-client flood: a real server process with its open-file limit lowered to
`NOFILE`, `N_SLOW` raw connections that send part of their headers, part of their body (with the key) or trickle
their headers a byte at a time, and real clients asking for completions all the while. The real clients keep
getting answers within `BOUND` seconds, the server's descriptors never reach the limit, every slow connection
is closed by the server, and afterwards the server's open descriptors are back at their baseline."""

from __future__ import annotations

import re
import threading
import time

import pytest
from _serve_proc import ServeProcess, connect, post_bytes, tiny_model_dir

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

KEY = "load-key"
NOFILE = 160  # the server's RLIMIT_NOFILE (soft and hard): fewer than the slow clients
N_SLOW = 200
TIMEOUT = 3  # --header-timeout and --body-timeout
BOUND = 5.0  # seconds a real client may wait for its answer (503 retries included)


def _slow_openings() -> list[bytes]:
    chat = post_bytes("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', key=KEY)
    headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
    kinds = [headers, headers, headers,
             chat[:-10],  # all the headers, the body but its last 10 bytes
             b"G"]  # then a byte at a time
    return [kinds[i % len(kinds)] for i in range(N_SLOW)]


def _closed_by_server(s) -> bool:
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
        return True  # EOF
    except BlockingIOError:
        return False  # still open, nothing to read
    except OSError:
        return True  # reset


@pytest.mark.slow
def test_slow_clients_neither_starve_real_ones_nor_keep_descriptors(tmp_path, make_tokenizer):
    model_dir = tiny_model_dir(tmp_path, make_tokenizer)
    server = ServeProcess(model_dir, tmp_path / "serve.log", "--api-key", KEY, "--max-batch", "4", "--max-context",
                          "64", "--max-connections", "1000", "--header-timeout", str(TIMEOUT), "--body-timeout",
                          str(TIMEOUT), nofile=NOFILE)
    try:
        # the cap was lowered to fit the limit, and the start-up said so in one line
        cap = int(re.search(r"up to (\d+) connections", server.banner).group(1))
        note = [x for x in server.log().splitlines() if x.startswith("note: the open-file limit")]
        assert len(note) == 1 and f"accepting at most {cap} at once" in note[0] and cap < NOFILE - 16
        client = {"Authorization": f"Bearer {KEY}", "Connection": "close"}
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}

        def ask() -> float:
            """One real request, retried on 503 (as the openai client does); its wall time."""
            t0 = time.monotonic()
            while True:
                r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=client, timeout=BOUND)
                if r.status_code != 503 or time.monotonic() - t0 > BOUND:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            return time.monotonic() - t0

        ask()
        time.sleep(0.5)
        baseline = server.fds()

        stop = threading.Event()
        times: list[float] = []
        failures: list[BaseException] = []

        def real_client():
            while not stop.is_set():
                try:
                    times.append(ask())
                except BaseException as e:  # noqa: BLE001 — reported below
                    failures.append(e)
                    return

        peak = [baseline]

        def watch_fds():
            while not stop.is_set():
                peak[0] = max(peak[0], server.fds())
                time.sleep(0.02)

        threads = [threading.Thread(target=real_client) for _ in range(3)] + [threading.Thread(target=watch_fds)]
        for t in threads:
            t.start()
        slow, trickling = [], []
        for i, opening in enumerate(_slow_openings()):
            try:
                s = connect(server.port, timeout=5)
                s.sendall(opening)
            except OSError:
                continue  # refused or reset at once: dropped is what a slow client should be
            slow.append(s)
            if opening == b"G":
                trickling.append(s)

        def trickle():
            rest = b"ET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
            for b in rest:
                if stop.is_set() or not trickling:
                    return
                for s in list(trickling):
                    try:
                        s.send(bytes([b]))
                    except OSError:
                        trickling.remove(s)
                time.sleep(0.25)

        trickler = threading.Thread(target=trickle)
        trickler.start()
        time.sleep(TIMEOUT + 3)  # real clients keep asking while the slow ones hold on, until they are dropped
        stop.set()
        for t in [*threads, trickler]:
            t.join(60)
        assert not failures, failures[0]
        assert len(times) >= 6 and max(times) < BOUND, times
        # descriptors stay within the cap (+ the accept queue asyncio may take in one go, 16 here)
        assert peak[0] <= baseline + cap + 16, f"the server's descriptors reached {peak[0]} (cap {cap})"
        assert len(slow) >= N_SLOW // 2
        deadline = time.monotonic() + TIMEOUT + 10
        while not all(_closed_by_server(s) for s in slow) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_closed_by_server(s) for s in slow), "a slow connection is still open"
        for s in slow:
            s.close()
        while server.fds() > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.fds() <= baseline + 2, (server.fds(), baseline)
        log = server.log()
        for bad in ("Traceback", "Too many open files", "out of system resource", "WARNING"):
            assert bad not in log, log[-3000:]
    finally:
        assert server.stop() == 0
