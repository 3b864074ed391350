"""The guards behind the CLI, one by one: output targets, YAML aliases, JSON caps, sampling parameters,
tokenizer identity (issue 11, items 2-6 and 10)."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import ConfigError, UserError, load_yaml, parse_override, read_json_bounded
from lmforge.generate.sampling import SamplingError, check_budget, check_sampling, sample_next
from lmforge.outputs import (
    RUN_MARKER,
    check_location,
    claim_run_dir,
    guard_output_dir,
    guard_output_file,
    is_run_dir,
    run_dir_claim,
)

REPO = Path(__file__).resolve().parents[2]

# ---- output targets ---------------------------------------------------------------------------


def test_output_dir_new_or_empty_is_fine_nonempty_needs_overwrite(tmp_path):
    guard_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    guard_output_dir(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="--overwrite"):
        guard_output_dir(tmp_path / "full")
    guard_output_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        guard_output_dir(tmp_path / "afile", overwrite=True)
    assert (tmp_path / "full" / "thesis.tex").read_text() == "years of work"  # a guard never deletes


def test_output_never_replaces_an_input_or_a_folder_holding_one(tmp_path):
    model = tmp_path / "runs" / "r" / "model"
    model.mkdir(parents=True)
    for out in (model, tmp_path / "runs" / "r", tmp_path / "runs", tmp_path):
        with pytest.raises(UserError, match="input"):
            guard_output_dir(out, inputs=[model], overwrite=True)
    with pytest.raises(UserError, match="inside the input dir"):
        guard_output_dir(model / "hf", inputs=[model], overwrite=True)
    guard_output_dir(tmp_path / "runs" / "r" / "hf", inputs=[model])  # a sibling is fine
    # globs, URLs and hf: names are inputs too (globs up to their first wildcard), never crash the check
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(UserError, match="input"):
        guard_output_dir(tmp_path, inputs=[str(data / "*.txt")])
    guard_output_dir(tmp_path / "o", inputs=["s3://bucket/x", "hf:wikitext", None, ""])


def test_output_file_refuses_inputs_and_foreign_files_but_replaces_its_own(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match="inputs"):
        guard_output_file(data, inputs=[data], overwrite=True)
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(UserError, match="--overwrite"):
        guard_output_file(notes)
    guard_output_file(notes, ours=lambda p: True)
    guard_output_file(notes, overwrite=True)
    with pytest.raises(UserError, match="directory"):
        guard_output_file(tmp_path)


@pytest.mark.parametrize("where", ["/proc/x", "/proc/self/x/y", "/sys/lmforge", "/dev/lmforge"])
def test_system_paths_are_refused(where):
    with pytest.raises(UserError, match="holds no user files"):
        check_location(where)


def test_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_location(tmp_path / "f" / "out")


def test_run_dir_is_marked_and_accepted_again(tmp_path):
    run = tmp_path / "run"
    assert claim_run_dir(run, "lmforge pretrain") == (True, True)
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["created_by"] == "lmforge pretrain" and is_run_dir(run)
    (run / "config.yaml").write_text("a: 1")
    assert claim_run_dir(run, "lmforge pretrain") == (False, False)  # resume=auto: its own run


def test_run_dir_refuses_a_foreign_folder_unless_overwrite(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes")
    with pytest.raises(UserError, match="run.overwrite=true"):
        claim_run_dir(folder, "lmforge pretrain")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    claim_run_dir(folder, "lmforge pretrain", overwrite=True)
    assert (folder / RUN_MARKER).is_file() and (folder / "config.yaml").read_text() == "my own notes"


def test_run_dir_from_before_markers_is_still_a_run(tmp_path):
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.yaml").write_text("x")
    claim_run_dir(old, "lmforge pretrain")
    assert (old / RUN_MARKER).is_file()


def test_finetune_base_inside_its_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}")
    with pytest.raises(UserError, match="holds the input"):
        claim_run_dir(run, "lmforge finetune", inputs=[run / "model"])
    assert (run / "model").is_dir()


def test_failed_start_leaves_no_trace(tmp_path):
    run = tmp_path / "a" / "run"
    with pytest.raises(UserError), run_dir_claim(run, "lmforge pretrain"):
        assert (run / RUN_MARKER).is_file()
        raise UserError("config problem found late")
    assert not run.exists()
    with pytest.raises(KeyboardInterrupt), run_dir_claim(run, "lmforge pretrain"):
        (run / "config.yaml").write_text("x")  # the run wrote something: it stays a (marked) run dir
        raise KeyboardInterrupt
    assert (run / RUN_MARKER).is_file() and (run / "config.yaml").is_file()


def test_run_dir_may_hold_inputs_outside_its_own_outputs(tmp_path):
    run = tmp_path / "quickstart"
    (run / "data" / "shards").mkdir(parents=True)  # quickstart's layout: the data lives in the run dir
    claim_run_dir(run, "lmforge pretrain", inputs=[run / "data" / "shards"], overwrite=True)
    for place in ("model", "checkpoints/x", "config.yaml"):
        with pytest.raises(UserError, match="which this run replaces"):
            claim_run_dir(run, "lmforge pretrain", inputs=[run / place])
    with pytest.raises(UserError, match="inside the input dir"):
        claim_run_dir(run / "data" / "shards" / "run", "lmforge pretrain", inputs=[run / "data" / "shards"])


def test_non_zero_ranks_do_not_create(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert claim_run_dir(tmp_path / "r", "lmforge pretrain") == (False, False)
    assert not (tmp_path / "r").exists()


# ---- YAML and JSON bounds ---------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


def test_yaml_alias_bomb_is_refused_at_the_first_alias(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("run:\n  dir: x\n" + BILLION_LAUGHS)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("e", _catch(load_yaml, bomb)), daemon=True)
    worker.start()
    worker.join(timeout=120)  # generous (loaded machine); an expanding load would run for minutes
    assert not worker.is_alive(), "the alias bomb was expanded"
    e = result["e"]
    assert isinstance(e, ConfigError) and "alias" in str(e) and "line 4" in str(e) and "\n" not in str(e)


def _catch(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for the assertion
        return e
    return None


def test_yaml_merge_keys_are_aliases_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: &b {lr: 1}\noptim:\n  <<: *b\n")
    with pytest.raises(ConfigError, match="alias"):
        load_yaml(f)
    f.write_text("optim:\n  lr: 0.001\n")  # plain configs are untouched
    assert load_yaml(f) == {"optim": {"lr": 0.001}}


def test_override_values_cannot_smuggle_aliases():
    assert parse_override("a.b=*x") == (["a", "b"], "*x")  # kept as the literal text


@pytest.mark.parametrize("content,match", [
    ("[" * 100 + "]" * 100, "nested"),
    ("[" * 100000 + "]" * 100000, "nested"),
    ('{"a": ', "not valid JSON"),
    ("", "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
])
def test_json_reader_caps_depth_and_names_the_file(tmp_path, content, match):
    f = tmp_path / "index.json"
    f.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=match) as e:
        read_json_bounded(f, what="token-shard index")
    assert "token-shard index" in str(e.value) and "\n" not in str(e.value)


def test_json_reader_caps_size(tmp_path):
    f = tmp_path / "big.json"
    f.write_text('"' + "x" * 2000 + '"')
    with pytest.raises(UserError, match="limit"):
        read_json_bounded(f, max_bytes=1000)
    assert read_json_bounded(f) == "x" * 2000


# ---- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -0.5}, {"temperature": "hot"},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": math.nan}, {"top_k": -1}, {"top_k": 2.5},
])
def test_bad_sampling_parameters_are_refused(kwargs):
    with pytest.raises(SamplingError):
        check_sampling(**kwargs)
    with pytest.raises(ValueError):  # callers that catch ValueError (the server) still do
        sample_next(torch.zeros(1, 5), **{"temperature": 1.0, **kwargs})


def test_good_sampling_parameters_pass_and_sample():
    check_sampling(0.0, None, None)
    check_sampling(0.7, 0, 1.0)
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample_next(logits, 0.0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1]


def test_generation_budget_stays_within_the_context():
    check_budget([3, 5], 11, 16)
    with pytest.raises(SamplingError, match="at most 11 new tokens"):
        check_budget([3, 5], 100_000_000, 16)
    with pytest.raises(SamplingError, match="shorten the prompt"):
        check_budget([20], 1, 16)
    with pytest.raises(SamplingError, match="empty"):
        check_budget([0], 1, 16)
    with pytest.raises(SamplingError, match="positive"):
        check_budget([1], 0, 16)


# ---- tokenizer identity -----------------------------------------------------------------------

def test_model_dir_tokenizer_is_checked_against_config(tmp_path, make_tokenizer):
    from lmforge.artifacts.identity import check_model_dir_tokenizer
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    tok = make_tokenizer(tmp_path, ["the cat sat on the mat"] * 20, vocab_size=300, name="tok")
    (tmp_path / "o").mkdir()
    other = make_tokenizer(tmp_path / "o", ["completely different words here"] * 20, vocab_size=290, name="tok")
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, ffn_hidden=32)
    model_dir = tmp_path / "model"
    save_model_dir(build_model(cfg), model_dir, tokenizer_dir=str(tmp_path / "tok"),
                   extra={"tokenizer_hash": tok.hash})
    check_model_dir_tokenizer(model_dir)
    (model_dir / "tokenizer.json").write_bytes((tmp_path / "o" / "tok" / "tokenizer.json").read_bytes())
    with pytest.raises(UserError, match="not the ones its weights were trained with") as e:
        check_model_dir_tokenizer(model_dir)
    assert tok.hash in str(e.value) and other.hash in str(e.value)


# ---- chat template render bounds (issue 22) -------------------------------------------------------------

LONG = "the quick brown fox " * 150
HOSTILE_TEMPLATES = {
    "nested-loops": "{% for m in messages %}{% for a in m['content'] %}{% for b in m['content'] %}"
                    "{% for c in m['content'] %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
    "nested-loops-setting": "{% set s = messages[0]['content'] %}{% for a in s %}{% for b in s %}{% for c in s %}"
                            "{% set x = a ~ b %}{% endfor %}{% endfor %}{% endfor %}",
    "nested-loops-literal": "{% for a in range(1000) %}{% for b in 'x' * 3000 %}{% for c in 'y' * 3000 %}"
                            "{% endfor %}{% endfor %}{% endfor %}",
    "recursive-loop": "{% for a in [messages] recursive %}{% for b in LONG %}{% endfor %}{{ loop([a]) }}{% endfor %}",
    "macro-recursion": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "macro-loop-recursion": "{% macro f(x) %}{% for c in x %}{{ f(x) }}{% endfor %}{% endmacro %}"
                            "{{ f(messages[0]['content']) }}",
    "macro-doubling": "{% macro f(x) %}{{ f(x ~ x) }}{% endmacro %}{{ f(messages[0]['content']) }}",
    "string-multiplication": "{{ messages[0]['content'] * 1000000000 }}",
    "list-multiplication-join": "{{ ([messages[0]['content']] * 1000000)|join }}",
    "generator-join": "{{ (range(4000000)|map('string'))|join(messages[0]['content']) }}",
    "replace-amplification": "{{ messages[0]['content']|replace('', messages[0]['content']) }}",
    "method-replace-amplification": "{{ messages[0]['content'].replace('', messages[0]['content']) }}",
    "indent-amplification": "{{ messages[0]['content']|replace(' ', '\\n')|indent(4000000) }}",
    "percent-width": "{{ '%999999999d' % 1 }}",
    "format-width": "{{ '{:>999999999}'.format(1) }}",
    "power": "{{ 10 ** 100000000 }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_fails_within_the_limit(name, monkeypatch):
    from lmforge.tokenizer import chat_template as ct

    monkeypatch.setattr(ct._budget, "seconds", 1.0)  # the same clock as the 5 s default, quicker to test
    template = HOSTILE_TEMPLATES[name].replace("LONG", repr(LONG))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        ct.render(template, [{"role": "user", "content": LONG}], name="'hostile.jinja'")
    took = time.monotonic() - t0
    assert took < 1.0 + 1.5, f"{name}: {took:.1f} s"
    message = str(e.value)
    assert "\n" not in message
    assert "recursed" in message or ("'hostile.jinja'" in message and "1 s" in message)


def test_the_render_limit_error_names_the_template_file(tmp_path):
    from lmforge.tokenizer.chat_template import RENDER_SECONDS, TemplateLimitError, get_chat_template, render

    f = tmp_path / "slow.jinja"
    f.write_text("{{ messages[0]['content'] * 1000000000 }}")
    with pytest.raises(TemplateLimitError, match=f"chat template '{f}' builds a repetition") as e:
        render(get_chat_template(None, str(f)), [{"role": "user", "content": "xyz"}])
    assert f"{RENDER_SECONDS:g} s" in str(e.value)


def test_ordinary_templates_render_as_before():
    from lmforge.tokenizer.chat_template import render

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi %d {x}"},
            {"role": "assistant", "content": "hello"}]
    t = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% if loop.first %}F{% endif %}"
         "{% if loop.last %}L{% endif %}{{ m['role'] }}:{{ m['content']|replace('h', 'H') }}|"
         "{% endfor %}{{ messages|map(attribute='role')|join(',') }}{{ ' %s' % 'ok' }}{{ ' {:>3}'.format(7) }}"
         "{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% endfor %}{{ range(3)|list|sum }}"
         "{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}"
         "{% endfor %}{{ (messages|selectattr('role', 'eq', 'user')|first)['content']|indent(2) }}")
    assert render(t, msgs) == ("1/3Fsystem:be brief|2/3user:Hi %d {x}|3/3Lassistant:Hello|system,user,assistant"
                               " ok   7a13123hi %d {x}")


# ---- model config sizes against the weights and the machine (issue 22) --------------------------------

@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    d = tmp_path_factory.mktemp("sizes") / "model"
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=300, max_seq_len=64)
    save_model_dir(build_model(cfg, seed=0), d)
    return d


def _with_model_fields(src, dst, **fields):
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data["model"].update(fields)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("field,expect", [
    ("dim", "model.dim=1,000,000,000"), ("n_layers", "model.n_layers=1,000,000,000"),
    ("vocab_size", "model.vocab_size=1,000,000,000"), ("n_heads", "model.n_heads x model.head_dim="),
    ("ffn_hidden", "model.ffn_hidden=1,000,000,000"), ("max_seq_len", None)])
def test_a_config_that_disagrees_with_its_tensors_is_refused_before_allocating(small_model_dir, tmp_path, field,
                                                                                expect):
    from lmforge.artifacts.model_dir import load_model_dir

    d = _with_model_fields(small_model_dir, tmp_path / "m", **{field: 10**9})
    t0 = time.monotonic()
    if expect is None:  # rope positions are no tensor: a long max_seq_len is the config's to choose
        assert load_model_dir(d).cfg.max_seq_len == 10**9
        return
    with pytest.raises(UserError, match=re.escape(expect)) as e:
        load_model_dir(d)
    assert time.monotonic() - t0 < 10
    assert f"'{d / 'config.json'}'" in str(e.value) and "fix config.json" in str(e.value)


def test_a_model_larger_than_the_memory_is_refused_before_allocating(small_model_dir, monkeypatch):
    from lmforge.artifacts import model_dir as md

    monkeypatch.setattr(md, "available_memory", lambda device="cpu": (100_000, "available in this machine's memory"))
    with pytest.raises(UserError, match=r"describes a model of 37,\d{3} parameters .* over the 0.0 GiB available "
                                        r"in this machine's memory; use a machine with more memory"):
        md.load_model_dir(small_model_dir)
    monkeypatch.undo()
    assert md.load_model_dir(small_model_dir).cfg.dim == 32
    free, _ = md.available_memory("cpu")
    assert free is None or free > 0


def test_serve_refuses_to_start_on_a_config_that_disagrees_with_its_tensors(small_model_dir, tmp_path):
    pytest.importorskip("fastapi")
    d = _with_model_fields(small_model_dir, tmp_path / "m", dim=10**9)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(d), "--port", "0"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("error: ") and "model.dim=1,000,000,000" in lines[0]


def test_serve_refuses_to_start_with_a_template_that_cannot_render_one_turn(small_model_dir, tmp_path,
                                                                            make_tokenizer):
    import shutil

    pytest.importorskip("fastapi")
    make_tokenizer(tmp_path, ["the cat sat on the mat"] * 20, vocab_size=300, name="tok")
    d = shutil.copytree(small_model_dir, tmp_path / "m")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, d / f.name)
    (d / "chat_template.jinja").write_text("{% for a in range(1000) %}{% for b in 'x' * 3000 %}"
                                           "{% for c in 'y' * 3000 %}{% endfor %}{% endfor %}{% endfor %}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(d), "--port", "0"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and lines and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("error: chat template ") and "did not finish rendering within 5 s" in lines[-1]
    assert f"'{d / 'chat_template.jinja'}'" in lines[-1]


def test_sharded_weights_are_checked_from_their_headers(small_model_dir, tmp_path):
    import shutil

    from lmforge.artifacts.model_dir import check_model_dir, load_weights, save_weights, weight_shapes

    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(small_model_dir / "config.json", d / "config.json")
    names = save_weights(load_weights(small_model_dir), d, max_shard_bytes=20_000)
    assert len(names) > 2 and "model.safetensors.index.json" in names
    assert weight_shapes(d) == weight_shapes(small_model_dir)
    assert weight_shapes(d)["tok_embeddings.weight"] == (300, 32)
    assert check_model_dir(d).dim == 32
    data = json.loads((d / "config.json").read_text())
    data["model"]["n_layers"] = 3
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"says model.n_layers=3 but the weights hold 2 layers"):
        check_model_dir(d)
