import json
import subprocess
import sys

from lmforge.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


def test_model_info_json_prints_published_count():
    r = run_cli("model", "info", "llama2-7b", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["params"] == 6_738_415_616 and d["layers"] == 32 and d["dim"] == 4096
    assert d["flops_per_token"] > 6 * d["params"]


def test_model_info_does_not_import_torch():
    code = "import sys; from lmforge.cli import main; main(['model','info','tiny']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["model", "info", "llama-3-8b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model preset") and "\n" not in err


def test_model_list(capsys):
    assert main(["model", "list", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)["presets"]]
    assert {"tiny", "small", "llama2-7b", "llama3-8b", "mistral-7b", "qwen2.5-7b", "bert-base"} <= set(names)
