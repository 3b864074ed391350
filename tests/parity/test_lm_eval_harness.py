"""lm-evaluation-harness parity: `--model lmforge` (this package's adapter, through lm-eval's real CLI) and
`lmforge eval --task choice` give the numbers `--model hf` gives on the same model exported to HF.

One tiny random Llama-shaped model; local task YAMLs over small files: the harness's own MMLU, C-Eval,
CMMLU and HellaSwag templates (read from the installed lm-eval) over tests/data/choice, a generation task
and a rolling log-likelihood task. The hf run happens once, in-process; everything is compared per sample.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TEST_DATA

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # lm-eval + transformers + datasets, in two processes: ~35 s of CPU
CHOICE = TEST_DATA / "choice"
MC_TASKS = ("lmf_mmlu", "lmf_ceval", "lmf_cmmlu", "lmf_hellaswag")
GEN = [{"question": "What color is the sky on a clear day?", "answer": "blue"},
       {"question": "中国的首都是哪里？", "answer": "北京"},
       {"question": "How many legs does a spider have?", "answer": "eight"},
       {"question": "Name a fruit that is yellow.", "answer": "banana"},
       {"question": "What is 2 plus 2?", "answer": "4"}]
ROLLING = [{"text": ("The harness scores long documents in rolling windows of the model's context. " * 12).strip()},
           {"text": "短文本，也要一样的分数。 Short text scores the same way."}]


def _corpus() -> list[str]:
    lines = [json.dumps(r, ensure_ascii=False) for r in GEN + ROLLING]
    for name in ("mmlu.jsonl", "hellaswag.jsonl", "ceval.csv", "cmmlu.csv"):
        lines += (CHOICE / name).read_text(encoding="utf-8").splitlines()
    return lines * 3


def _harness_template(rel: str) -> dict:
    """The fields of one of lm-eval's own task templates (prompt, choices, target, output type)."""
    class Loader(yaml.SafeLoader):  # the harness's `!function` tags are not needed here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    text = (Path(lm_eval.__file__).parent / "tasks" / rel).read_text(encoding="utf-8")
    cfg = yaml.load(text, Loader=Loader)  # a SafeLoader subclass
    return {k: cfg[k] for k in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target")}


def _csv_to_jsonl(src: Path, dst: Path) -> Path:
    with src.open(encoding="utf-8") as f:
        rows = [{k: v for k, v in row.items() if k} for row in csv.DictReader(f)]  # CMMLU's unnamed index column
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return dst


def _write_tasks(d: Path) -> None:
    def local(name, data_file, extra):
        cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
               "test_split": "test", **extra}
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    mc_metrics = {"metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    local("lmf_mmlu", CHOICE / "mmlu.jsonl", {**_harness_template("mmlu/default/_default_template_yaml"),
                                              **mc_metrics})
    local("lmf_ceval", _csv_to_jsonl(CHOICE / "ceval.csv", d / "ceval.jsonl"),
          {**_harness_template("ceval/_default_ceval_yaml"), **mc_metrics})
    local("lmf_cmmlu", _csv_to_jsonl(CHOICE / "cmmlu.csv", d / "cmmlu.jsonl"),
          {**_harness_template("cmmlu/_default_template_yaml"), **mc_metrics})
    (d / "gen.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GEN), encoding="utf-8")
    local("lmf_gen", d / "gen.jsonl", {
        "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 10, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
    (d / "rolling.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROLLING),
                                     encoding="utf-8")
    local("lmf_rolling", d / "rolling.jsonl", {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]})
    # HellaSwag through the harness's own process_docs (a !function tag, so written by hand)
    (d / "lmf_hs_utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    hs = _harness_template("hellaswag/hellaswag.yaml")
    (d / "lmf_hellaswag.yaml").write_text(
        f"task: lmf_hellaswag\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {CHOICE / 'hellaswag.jsonl'}\n"
        f"test_split: test\noutput_type: {hs['output_type']}\nprocess_docs: !function lmf_hs_utils.process_docs\n"
        f"doc_to_text: \"{hs['doc_to_text']}\"\ndoc_to_target: \"{hs['doc_to_target']}\"\n"
        f"doc_to_choice: \"{hs['doc_to_choice']}\"\n" + yaml.safe_dump(mc_metrics), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tokenizer):
    from lmforge.artifacts.hf.convert import export_hf
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    root = tmp_path_factory.mktemp("harness")
    make_tokenizer(root, _corpus(), vocab_size=420, name="tok")
    cfg = ModelConfig(vocab_size=448, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=96)
    model = build_model(cfg, seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: sharper, less tie-prone predictions than a fresh init
            p.mul_(3.0) if p.dim() > 1 else p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model_dir = save_model_dir(model, root / "model", tokenizer_dir=str(root / "tok"))
    export_hf(model_dir, root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(root / "ds_cache"), "TRANSFORMERS_VERBOSITY": "error"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE")})
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        hf = simple_evaluate(model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", device="cpu",
                             tasks=[*MC_TASKS, "lmf_gen", "lmf_rolling"], batch_size=4, log_samples=True,
                             task_manager=TaskManager(include_path=str(tasks)))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"root": root, "model": model_dir, "tasks": tasks, "env": env, "hf": hf}


def _samples_by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def test_lm_eval_cli_with_lmforge_model_equals_hf(setup):
    """`python -m lmforge.eval.harness --model lmforge ...` (lm-eval's own CLI) == `--model hf`, per sample."""
    out = setup["root"] / "lmforge_run"
    cmd = [sys.executable, "-m", "lmforge.eval.harness", "--model", "lmforge",
           "--model_args", f"path={setup['model']}", "--batch_size", "3",
           "--tasks", "lmf_mmlu,lmf_hellaswag,lmf_gen,lmf_rolling",
           "--include_path", str(setup["tasks"]), "--output_path", str(out), "--log_samples", "--device", "cpu"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=setup["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    results_file = next(out.rglob("results_*.json"))
    ours = json.loads(results_file.read_text())["results"]
    theirs = setup["hf"]["results"]
    for task in ("lmf_mmlu", "lmf_hellaswag"):
        assert ours[task]["acc,none"] == theirs[task]["acc,none"], task
        assert ours[task]["acc_norm,none"] == theirs[task]["acc_norm,none"], task
    assert ours["lmf_gen"]["exact_match,none"] == theirs["lmf_gen"]["exact_match,none"]
    for m in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["lmf_rolling"][m] == pytest.approx(theirs["lmf_rolling"][m], rel=1e-5), m

    for task in ("lmf_mmlu", "lmf_hellaswag", "lmf_gen", "lmf_rolling"):
        path = next(out.rglob(f"samples_{task}_*.jsonl"))
        mine = _samples_by_doc([json.loads(line) for line in path.read_text().splitlines()])
        ref = _samples_by_doc(setup["hf"]["samples"][task])
        assert sorted(mine) == sorted(ref) and len(mine) > 0
        for doc_id, s in mine.items():
            a, b = s["resps"], ref[doc_id]["resps"]
            if task == "lmf_gen":  # the generated text itself, not only its score
                assert a == b, (doc_id, a, b)
            elif task == "lmf_rolling":
                assert float(a[0][0]) == pytest.approx(float(b[0][0]), abs=1e-3)
            else:
                lls_a = [float(x[0][0]) for x in a]
                lls_b = [float(x[0][0]) for x in b]
                assert lls_a == pytest.approx(lls_b, abs=1e-4), (task, doc_id)
    assert len(next(iter(_samples_by_doc(setup["hf"]["samples"]["lmf_rolling"]).values()))["resps"]) == 1


@pytest.mark.parametrize("name,task", [("mmlu.jsonl", "lmf_mmlu"), ("ceval.csv", "lmf_ceval"),
                                       ("cmmlu.csv", "lmf_cmmlu"), ("hellaswag.jsonl", "lmf_hellaswag")])
def test_eval_task_choice_equals_harness(setup, name, task):
    """`lmforge eval --task choice` on the fixture files == the harness's own templates scored by `--model hf`."""
    from lmforge.eval.choice import evaluate_choice, load_choice
    from lmforge.eval.loading import load_for_eval

    model, tok, _ = load_for_eval(setup["model"], "cpu", torch.float32)
    examples = load_choice(str(CHOICE / name))
    from lmforge.tokenizer.chat_template import uses_bos

    metrics, predictions = evaluate_choice(model, tok, examples, batch_size=5, add_bos=uses_bos(tok))
    ref = setup["hf"]["results"][task]
    assert metrics["n"] == len(setup["hf"]["samples"][task])
    assert metrics["acc"] == ref["acc,none"] and metrics["acc_norm"] == ref["acc_norm,none"]
    assert metrics["acc_stderr"] == pytest.approx(ref["acc_stderr,none"])
    for doc_id, s in _samples_by_doc(setup["hf"]["samples"][task]).items():
        assert predictions[doc_id]["gold"] == s["target"]
        lls = [float(x[0][0]) for x in s["resps"]]
        assert predictions[doc_id]["loglikelihoods"] == pytest.approx(lls, abs=1e-4)


def test_eval_cli_task_choice(setup, tmp_path):
    out = tmp_path / "choice.json"
    cmd = [sys.executable, "-m", "lmforge", "eval", "--model", str(setup["model"]), "--task", "choice",
           "--data", str(CHOICE / "ceval.csv"), "--out", str(out), "--json", "--batch-size", "4"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=setup["env"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    ref = setup["hf"]["results"]["lmf_ceval"]
    assert s["metrics"]["acc"] == ref["acc,none"] and s["metrics"]["layouts"] == ["ceval"]
    assert len(json.loads(out.read_text())["predictions"]) == 6
    bad = subprocess.run([*cmd[:8], "--data", str(CHOICE / "SOURCE.md"), "--out", str(tmp_path / "x.json")],
                         check=False, capture_output=True, text=True, timeout=300, env=setup["env"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in bad.stderr


def test_adapter_batches_give_the_same_answers_and_bad_args_are_named(setup):
    """Batch size does not change a score or a generation; a misspelt model arg is an error naming it."""
    from lm_eval.api.instance import Instance

    from lmforge.config import UserError
    from lmforge.eval.harness import LMForgeLM

    def reqs(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    pairs = [("Question: 中国的首都是哪里？\nAnswer:", " 北京"), ("The sky is", " blue"), ("", "Hello world"),
             ("A long context " * 30, " end")]
    gens = [(q, {"until": ["\n"], "max_gen_toks": 6}) for q in ("Q: What is 2 plus 2?\nA:", "Q: 你好\nA:", "Hi")]
    one, many = LMForgeLM(path=str(setup["model"]), batch_size=1), LMForgeLM(path=str(setup["model"]), batch_size=7)
    a, b = one.loglikelihood(reqs("loglikelihood", pairs)), many.loglikelihood(reqs("loglikelihood", pairs))
    assert [x[1] for x in a] == [x[1] for x in b]
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
    assert one.generate_until(reqs("generate_until", gens)) == many.generate_until(reqs("generate_until", gens))
    chat = one.apply_chat_template([{"role": "user", "content": "你好"}])
    assert chat == "<|user|>\n你好<|end|>\n<|assistant|>\n" and one.chat_template(True) == one.tokenizer_lm.chat_template
    with pytest.raises(UserError, match="btach_size"):
        LMForgeLM(path=str(setup["model"]), btach_size=4)
