import json

import torch

from lmforge.train import metrics


def test_peak_flops_cache_keeps_the_best_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(device="cpu", dtype=torch.float32, n=2048, seconds=1.0):
        calls.append(seconds)
        return 100e9

    monkeypatch.setattr(metrics, "measure_matmul_flops", fake_measure)
    value, source = metrics.peak_flops(torch.device("cpu"))
    assert value == 100e9 and source == "measured fp32 matmul" and calls == [1.0]
    # a low figure measured while the machine was busy must not stick: the cache keeps the maximum
    path = tmp_path / "peak_flops.json"
    table = json.loads(path.read_text())
    key = next(iter(table))
    path.write_text(json.dumps({key: 30e9}))
    assert metrics.peak_flops(torch.device("cpu"))[0] == 100e9 and calls[-1] == 0.3
    assert json.loads(path.read_text())[key] == 100e9
    assert metrics.peak_flops(torch.device("cpu"), configured_tflops=2.5) == (2.5e12, "configured")


def test_real_matmul_measurement_is_plausible(monkeypatch):
    import time

    # the FLOP count, exactly: with a clock that ticks 1/64 s per reading, every timed slice (4 matmuls of
    # n×n by n×n, 2·n³ FLOPs each) lasts 1/64 s
    class Clock:
        t = 0.0

        def perf_counter(self):
            self.t += 1 / 64
            return self.t

    with monkeypatch.context() as m:
        m.setattr(metrics, "time", Clock())
        assert metrics.measure_matmul_flops("cpu", torch.float32, n=48, seconds=0.1) == 4 * 2 * 48**3 * 64

    # the real measurement agrees with an independent timing of the same matmul (best of many, like it), on
    # one thread: with several, a CPU shared with other jobs makes every call wait for the slowest thread
    n, threads = 256, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, end = float("inf"), time.perf_counter() + 0.2
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        independent = 2 * n**3 / best
        flops = metrics.measure_matmul_flops("cpu", torch.float32, n=n, seconds=0.2)
    finally:
        torch.set_num_threads(threads)
    assert independent / 4 < flops < independent * 4, (flops, independent)
    state = torch.get_rng_state()
    metrics.measure_matmul_flops("cpu", torch.float32, n=64, seconds=0.01)
    assert torch.equal(state, torch.get_rng_state())  # never disturbs the training RNG (exact resume)


def test_metrics_writer_truncates_rows_past_a_resume_step(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write({"kind": "train", "step": step, "loss": float("nan") if step == 3 else 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn by a kill
    w.truncate_after(3)
    rows = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == "nan"  # JSON has no NaN
