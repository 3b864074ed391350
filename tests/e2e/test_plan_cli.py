"""`lmforge plan` end to end: JSON keys, no torch import, modes, calibration, recipes and model dirs, errors.

(How fast it answers is measured by `bench/plan_speed.py`, not asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=60)


def test_issue_command_json_keys():
    r = lmforge("plan", "--model", "llama2-7b", "--gpus", "8", "--gpu-mem-gb", "80", "--json", "--tokens", "2T")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    # Llama 2 7B: vocabulary 32000, width 4096, 32 layers (32 heads of 128), SwiGLU 11008, untied head
    V, d, L, ffn, T = 32000, 4096, 32, 11008, 4096
    matmul = L * (4 * d * d + 3 * d * ffn) + V * d  # attention q/k/v/o, SwiGLU w1/w2/w3, the LM head
    params = matmul + V * d + (2 * L + 1) * d  # + the embedding and the RMSNorm weights
    assert plan["params"] == params == 6_738_415_616 and plan["tokens"] == 2e12
    assert plan["parallel"]["dp_shard"] == 8 and plan["params_per_gpu"] == params // 8  # FSDP over the 8 GPUs
    # training FLOPs per token: 6·(matmul params) + 12·L·d·T (attention scores), the PaLM estimate
    per_token = 6 * matmul + 12 * L * d * T
    assert plan["flops"]["per_token"] == per_token and plan["flops"]["total"] == pytest.approx(per_token * 2e12)
    assert plan["chinchilla_tokens"] == 20 * params
    # bf16 autocast over fp32 master weights: 4 bytes of weights, 4 of grads, 8 of AdamW moments per parameter
    mem = plan["memory_gb"]
    shard = params / 8 / 1e9
    assert mem["weights"] == pytest.approx(4 * shard, abs=1e-3) and mem["grads"] == pytest.approx(4 * shard, abs=1e-3)
    assert mem["optimizer"] == pytest.approx(8 * shard, abs=1e-3)
    assert mem["activations"] > 0 and mem["buffers"] > 0
    parts = ("weights", "grads", "optimizer", "activations", "buffers")
    assert mem["total"] == pytest.approx(sum(mem[k] for k in parts), abs=3e-3)
    assert plan["fits"] == (mem["total"] <= 80) and plan["headroom_gb"] == pytest.approx(80 - mem["total"], abs=2e-3)
    # time: 8 GPUs x the H100's dense bf16 peak x the assumed MFU, over the FLOPs per token
    tok_s = 8 * plan["peak_tflops"] * 1e12 * plan["mfu"]["effective"] / per_token
    assert plan["peak_tflops"] == pytest.approx(989.4) and plan["tokens_per_s"] == pytest.approx(tok_s, rel=1e-4)
    assert plan["hours"] == pytest.approx(2e12 / tok_s / 3600, rel=1e-4)
    assert plan["gpu_hours"] == pytest.approx(8 * plan["hours"], rel=1e-4)
    peak = plan["memory_peak_gb"]
    assert peak["verdict_uses"] == "device" and peak["device"] == plan["memory_gb"]["total"]
    assert peak["allocated"] <= peak["reserved"] <= peak["device"]


def test_issue_17_torchtitan_configuration_fits():
    r = lmforge("plan", "--model", "llama3.1-8b", "--gpus", "8", "--gpu", "h100", "--gpu-mem-gb", "96",
                "--seq-len", "8192", "--micro-batch", "2", "--ac", "selective", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["fits"] and plan["ac"] == "selective" and plan["memory_gb"]["total"] < 96


def test_modes_from_the_command_line():
    r = lmforge("plan", "--model", "llama2-13b", "--mode", "qlora", "--gpu", "4090", "--seq-len", "2048",
                "--lora-rank", "16", "--lora-targets", "all-linear", "--ac", "full", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["mode"] == "qlora" and plan["quant"] == "nf4-dq" and plan["lora"]["rank"] == 16
    assert plan["fits"] and plan["memory_gb"]["weights"] < 8
    r = lmforge("plan", "--model", "llama2-7b", "--mode", "infer", "--seq-len", "4096", "--micro-batch", "16")
    assert r.returncode == 0 and "infer" in r.stdout and "no optimizer" in r.stdout, r.stderr
    r = lmforge("plan", "--model", "llama2-7b", "--mode", "dpo", "--dpo-reference", "adapter", "--suggest",
                "--seq-len", "2048", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["suggested"] is True


def test_calibration_table_without_torch():
    code = ("import sys; from lmforge.cli import main; main(['plan', '--calibration']); "
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("NO_TORCH")
    assert "| torchtitan Llama 3.1 8B, 8x H100" in r.stdout and "82.40 GiB" in r.stdout


def test_plan_never_imports_torch():
    code = ("import sys; from lmforge.cli import main; "
            "main(['plan', '--model', 'llama3-8b', '--gpus', '16', '--suggest', '--json']); "
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("NO_TORCH")
    assert json.loads(r.stdout)["suggested"] is True


def test_summary_line_and_hours_without_json():
    r = lmforge("plan", "--model", "llama2-7b", "--gpus", "8", "--tokens", "1e12")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) == 1 and "GB per GPU of 80" in out[0] and "GPU-hours" in out[0]


def test_recipe_yaml_supplies_defaults():
    r = lmforge("plan", "--model", "lmforge/recipes/pretrain/llama2-7b.yaml", "--gpus", "8", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["model"] == "llama2-7b" and plan["seq_len"] == 4096 and plan["micro_batch"] == 2


def test_model_dir_config_json(tmp_path):
    from lmforge.config import to_dict
    from lmforge.models.presets import get_preset

    (tmp_path / "config.json").write_text(json.dumps(to_dict(get_preset("small"))))
    r = lmforge("plan", "--model", str(tmp_path), "--json", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == get_preset("small").num_params()


@pytest.mark.parametrize("args, message", [
    (["--model", "llama2-7b", "--gpus", "8", "--tp", "3"], "does not divide --gpus 8"),
    (["--model", "nope-7b"], "unknown model preset"),
    (["--model", "llama2-7b", "--gpu", "h300"], "did you mean 'h200'"),
    (["--model", "llama2-7b", "--seq-len", "9000"], "max_seq_len"),
    (["--model", "llama2-7b", "--ac", "layer-x"], "layer-N"),
    (["--model", "llama2-7b", "--mode", "lora", "--lora-targets", "wq,foo"], "unknown 'foo'"),
    (["--model", "llama2-7b", "--quant", "nf4"], "--quant nf4 applies"),
    (["--gpus", "8"], "needs --model"),
])
def test_errors_exit_2_with_one_line(args, message):
    r = lmforge("plan", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
