"""The dashboard page in headless Chromium (Selenium, as the chat page's tests) against the real `lmforge
dashboard` over a real tiny `lmforge pretrain` run that trains while the page watches: the run shows in the
list as running, its loss curve is drawn and grows live, and comparing it with a second run draws two series;
the launch form refuses a bad value with the CLI's own message, launches a good one, and its stop button leaves
a checkpoint and turns the run's status to stopped.

With LMFORGE_DASHBOARD_SCREENSHOT=PATH the page is saved there as a PNG (docs/images/dashboard.png is made
this way). Without Chromium, chromedriver or selenium the tests skip — and fail under LMFORGE_REQUIRE_DATA=1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _ports import free_port
from test_chat_page import browser, wait_for  # noqa: F401 - the shared headless Chromium fixture
from test_dashboard import get, write_run

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 180
STEPS = 400  # long enough to still be training while the page watches; the test stops it with SIGTERM


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    src = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"
    d = tmp_path_factory.mktemp("data")
    train_tokenizer([str(src)], 512, d / "tok", txt_mode="blank", progress=False)
    prepare([str(src)], d / "tok", d / "shards", val_fraction=0.05, txt_mode="blank", progress=False)
    return d / "shards"


@pytest.fixture(scope="module")
def training(shards, tmp_path_factory):
    """(runs root, the pretrain process) — a tiny run training in RUNS/tiny, stopped at the end."""
    root = tmp_path_factory.mktemp("runs")
    other = write_run(root / "other", 30, "max_steps")
    (other / "completions").mkdir()  # sample generations, as GRPO logs them
    for step in (10, 20):
        (other / "completions" / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(
            {"step": step, "prompt": f"What is {i}+{i}?", "answer": str(2 * i), "completion": f"{2 * i} at step {step}",
             "reward": 1.0, "rewards": {"answer": 1.0}, "advantage": 0.25 * i}) + "\n" for i in range(3)))
    run_dir = root / "tiny"
    log = open(tmp_path_factory.mktemp("log") / "pretrain.log", "wb")  # noqa: SIM115 - open while it trains
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "pretrain", "--config", str(REPO / "lmforge/recipes/pretrain/tiny.yaml"),
         f"data.dir={shards}", f"run.dir={run_dir}", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=8",
         f"train.max_steps={STEPS}", "train.threads=1", "log.interval=2", "eval.interval=20", "eval.batches=2",
         "checkpoint.interval=50", "log.peak_tflops=1", "log.progress=false"],
        cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield root, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(training):
    root, _ = training
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "dashboard", "--runs", str(root), "--port", str(port),
                             "--allow-launch"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            assert proc.poll() is None, f"lmforge dashboard exited with {proc.returncode}"
            try:
                if get(url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "lmforge dashboard did not answer"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chart(driver, chart_id: str) -> dict:
    return driver.execute_script("""const c = document.getElementById('chart-' + arguments[0]);
        return c ? {series: Number(c.dataset.series), points: Number(c.dataset.points),
                    canvas: !!c.querySelector('canvas')} : null;""", chart_id)


def row_state(driver, run_id: str):
    return driver.execute_script("""const r = document.querySelector('#runs tbody tr[data-id="' + arguments[0] + '"]');
        return r ? r.dataset.state : null;""", run_id)


@pytest.mark.slow
def test_live_run_list_curve_and_compare(server, training, browser):  # noqa: F811 - the fixture
    _root, proc = training
    driver = browser
    driver.get(server + "/")
    wait_for(driver, lambda d: d.execute_script("return !!window.lmforgeDash"), "dashboard.js to load")
    # the real run appears, running (its lock names the live pretrain process)
    wait_for(driver, lambda d: row_state(d, "0/tiny") == "running", "the training run listed as running",
             timeout=WAIT_S)
    assert proc.poll() is None
    driver.find_element("css selector", '#runs tbody tr[data-id="0/tiny"]').click()
    wait_for(driver, lambda d: (chart(d, "loss") or {}).get("points", 0) >= 2, "the loss curve", timeout=WAIT_S)
    first = chart(driver, "loss")
    assert first["canvas"] and first["series"] >= 1
    # it grows while the run trains (live rows from the stream; no reload)
    wait_for(driver, lambda d: chart(d, "loss")["points"] >= first["points"] + 3, "the curve to grow",
             timeout=WAIT_S)
    assert proc.poll() is None, "the run ended before the page saw it grow; raise STEPS"
    wait_for(driver, lambda d: (chart(d, "lr") or {}).get("points", 0) >= 2, "the lr curve")
    shot = os.environ.get("LMFORGE_DASHBOARD_SCREENSHOT")
    if shot:
        driver.save_screenshot(shot)
    # compare: two runs selected, two loss series per kind drawn, a config diff and a final-metrics table
    for run_id in ("0/tiny", "0/other"):
        driver.find_element("css selector", f'#runs tbody tr[data-id="{run_id}"] input').click()
    driver.find_element("id", "compare").click()
    wait_for(driver, lambda d: (chart(d, "loss") or {}).get("series", 0) >= 2, "two runs' loss series")
    wait_for(driver, lambda d: d.execute_script("return document.querySelectorAll('#final-table tbody tr').length")
             == 2, "the final metrics table")
    diff_keys = driver.execute_script(
        "return Array.from(document.querySelectorAll('#config-diff tbody tr td:first-child')).map(t => t.textContent)")
    assert "optim.lr" in diff_keys or "run.name" in diff_keys
    error = driver.execute_script("return document.getElementById('error').textContent")
    assert error == "", error
    # a narrow window: one column, the charts redrawn to fit, nothing wider than the window
    driver.set_window_size(360, 900)
    try:
        wait_for(driver, lambda d: d.execute_script(
            "const c = document.querySelector('#chart-loss canvas'); const w = document.documentElement.clientWidth;"
            "return c && c.getBoundingClientRect().right <= w && document.documentElement.scrollWidth <= w + 1"),
            "the page to fit a narrow window")
    finally:
        driver.set_window_size(1200, 760)
    if shot:
        driver.save_screenshot(str(Path(shot).with_name(Path(shot).stem + "-compare.png")))


@pytest.mark.slow
def test_sample_generations_shown(server, browser):  # noqa: F811 - the fixture
    driver = browser
    driver.get(server + "/")
    wait_for(driver, lambda d: row_state(d, "0/other") is not None, "the runs list")
    driver.find_element("css selector", '#runs tbody tr[data-id="0/other"]').click()

    def completions(d):
        return d.execute_script("return Array.from(document.querySelectorAll('#samples-table td.sample-completion'))"
                                ".map(t => t.textContent)")
    wait_for(driver, lambda d: completions(d) == ["0 at step 20", "2 at step 20", "4 at step 20"],
             "the newest step's sample generations")
    options = driver.execute_script("return Array.from(document.querySelectorAll('#samples-file option'))"
                                    ".map(o => o.value)")
    assert options == ["completions/step_000020.jsonl", "completions/step_000010.jsonl"]
    driver.execute_script("const s = document.getElementById('samples-file'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('change'));", options[1])
    wait_for(driver, lambda d: completions(d) == ["0 at step 10", "2 at step 10", "4 at step 10"],
             "another step's sample generations")


def set_field(driver, key: str, value) -> None:
    driver.execute_script("""const el = document.getElementById('field-' + arguments[0]);
        el.value = arguments[1]; el.dispatchEvent(new Event('input'));""", key, str(value))


@pytest.mark.slow
def test_launch_form_refuses_bad_value_launches_and_stops(server, training, shards, browser):  # noqa: F811
    root, _ = training
    driver = browser
    driver.get(server + "/")
    wait_for(driver, lambda d: d.execute_script("return !document.getElementById('launch-pane').hidden && "
                                                "!!document.getElementById('field-train.max_steps')"),
             "the launch form with the recipe's fields")
    driver.execute_script("document.getElementById('launch-pane').open = true")
    driver.find_element("id", "launch-name").send_keys("launched")
    set_field(driver, "train.max_steps", "many")
    assert not driver.find_element("id", "launch-submit").is_enabled()  # no plan shown yet
    driver.find_element("id", "launch-check").click()
    wait_for(driver, lambda d: d.find_element("id", "launch-result").text.startswith("error: "), "the refusal")
    assert not driver.find_element("id", "launch-submit").is_enabled()
    shown = driver.find_element("id", "launch-result").text
    cli = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "pretrain/tiny",
                          "train.max_steps=many", f"run.dir={root / 'launched'}"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 2 and shown == cli.stderr.strip()  # the CLI's own message, word for word
    assert not (root / "launched").exists()
    good = {"train.max_steps": 5000, "data.dir": shards, "data.seq_len": 64, "train.global_batch": 8,
            "train.micro_batch": 8, "train.threads": 1, "checkpoint.interval": 4, "log.interval": 1,
            "log.progress": "false", "eval.interval": 1000, "log.peak_tflops": 1}
    for key, value in good.items():
        set_field(driver, key, value)
    driver.find_element("id", "launch-check").click()
    wait_for(driver, lambda d: d.find_element("id", "launch-submit").is_enabled(), "the plan and the launch button")
    verdict = driver.find_element("id", "launch-plan").text
    assert verdict.startswith("memory plan: tiny pretrain, seq 64 x micro batch 8, fp32: weights "), verdict
    assert " GB of CPU RAM " in verdict and verdict.endswith("-> fits"), verdict
    driver.find_element("id", "launch-submit").click()
    wait_for(driver, lambda d: d.find_element("id", "launch-result").text.startswith("started pid"), "the launch")
    wait_for(driver, lambda d: row_state(d, "0/launched") == "running", "the launched run listed as running")
    driver.find_element("css selector", '#runs tbody tr[data-id="0/launched"]').click()
    wait_for(driver, lambda d: (chart(d, "loss") or {}).get("points", 0) >= 6, "the launched run's curve")
    wait_for(driver, lambda d: d.find_element("id", "stop").is_displayed(), "the stop button")
    driver.find_element("id", "stop").click()
    wait_for(driver, lambda d: row_state(d, "0/launched") == "stopped", "the status to turn to stopped")
    wait_for(driver, lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('#checkpoints tbody tr')).some(r => r.textContent.includes('LATEST'))"),
        "the checkpoint the stop left")
    latest = (root / "launched" / "checkpoints" / "LATEST").read_text().strip()
    assert (root / "launched" / "checkpoints" / latest / "MANIFEST.json").is_file()
