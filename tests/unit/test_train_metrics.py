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


def test_real_matmul_measurement_is_plausible():
    flops = metrics.measure_matmul_flops("cpu", torch.float32, n=256, seconds=0.05)
    assert 1e8 < flops < 1e14
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
