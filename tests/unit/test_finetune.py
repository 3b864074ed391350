"""The fine-tuning recipes on a tiny model dir: assistant-only SFT loss, LoRA (only adapters train,
adapter-only checkpoints, merged = unmerged), exact resume, classification with dev metrics, early
stopping that keeps the best weights, and clear errors."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from lmforge.artifacts.adapter_dir import load_adapter
from lmforge.artifacts.classifier_dir import load_classifier_dir
from lmforge.artifacts.model_dir import load_model_dir, load_weights
from lmforge.config import ConfigError, UserError
from lmforge.tasks.classify import DevEvaluator, LabelledBatches
from lmforge.tasks.config import config_dict, config_from_dict
from lmforge.tasks.run import run as finetune
from lmforge.tasks.sft import SFTBatches, sft_loss

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "What is two plus two? Two plus two is four. Answer briefly and be helpful.",
    "今天天气很好，我们去公园散步吧。你好，世界！机器学习很有趣。",
    "a charming and affecting journey . a bleak and desperate film . great fun . dull and boring .",
] * 20
SFT = [{"instruction": "Say hello.", "input": "", "output": "Hello there."},
       {"instruction": "What is two plus two?", "input": "", "output": "Four."},
       {"instruction": "Greet in Chinese.", "input": "", "output": "你好，世界！"},
       {"instruction": "Name an animal.", "input": "Something quick.", "output": "The quick brown fox."},
       {"instruction": "Describe the dog.", "input": "", "output": "The dog is lazy."},
       {"instruction": "How are you?", "input": "", "output": "Great fun, thank you."}] * 4
POS = ["a charming and affecting journey", "great fun", "charming", "a great and charming film"]
NEG = ["a bleak and desperate film", "dull and boring", "boring", "a dull , desperate journey"]
# Dev sentences are new: the same polarity words in combinations the training split never shows.
POS_DEV = ["great and charming", "a fun , affecting film", "charming fun", "an affecting , great journey"]
NEG_DEV = ["boring and bleak", "a desperate , dull film", "dull", "a boring , bleak journey"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()  # train.threads sets it process-wide
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("ft")
    (d / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    train_tokenizer([str(d / "corpus.txt")], 400, d / "tok", progress=False)
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      tie_embeddings=True)
    return save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sftdata") / "train.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SFT), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tsv_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clsdata")
    rows = [(t, "1") for t in POS] + [(t, "0") for t in NEG]
    dev = [(t, "1") for t in POS_DEV] + [(t, "0") for t in NEG_DEV]
    assert not {t for t, _ in rows} & {t for t, _ in dev}  # disjoint splits
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * 6))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in dev))
    return d / "train.tsv", d / "dev.tsv"


def sft_cfg(model_dir, sft_file, run_dir, **sections):
    data = {"run": {"dir": str(run_dir)}, "model": {"from": str(model_dir)},
            "data": {"train": [str(sft_file)], "dev_fraction": 0.25, "seq_len": 48, "batching": "pack"},
            "train": {"global_batch": 4, "micro_batch": 2, "max_steps": 6, "device": "cpu"},
            "optim": {"lr": 1e-2}, "schedule": {"name": "constant"},
            "eval": {"interval": 3, "batch_size": 4}, "checkpoint": {"interval": 3},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0}}
    data["train"]["threads"] = 1  # tiny models: one thread beats two on a shared CPU
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def cls_cfg(model_dir, tsv_files, run_dir, **sections):
    train, dev = tsv_files
    sections.setdefault("finetune", {"mode": "classify"})
    sections.setdefault("data", {})
    sections["data"] = {"train": [str(train)], "dev": [str(dev)], "text_field": "sentence", "seq_len": 32,
                        "batching": "shuffle", **sections["data"]}
    sections.setdefault("classify", {"pooling": "mean", "dropout": 0.0})
    sections.setdefault("train", {})
    sections["train"] = {"global_batch": 8, "micro_batch": 4, "max_steps": 8, **sections["train"]}
    return sft_cfg(model_dir, train, run_dir, **sections)


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_sft_loss_covers_only_the_assistant_replies(model_dir, sft_file, tmp_path):
    """The loss is the cross-entropy of exactly the reply tokens + end-of-turn + EOS, nothing else."""
    from lmforge.data.sft import encode_examples, load_sft_examples
    from lmforge.data.sft_batching import SFTBatchIterator
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(model_dir)
    examples = load_sft_examples(sft_file)[:6]
    ds = encode_examples(tok, examples, 48)
    batch = SFTBatches(SFTBatchIterator(ds, 6, 48, mode="shuffle", pad_id=tok.pad_id)).next_batch()
    model = load_model_dir(model_dir)
    loss, n = sft_loss(model, batch)
    # the trained targets of each row, decoded, are its reply followed by the end-of-turn marker and EOS
    targets = sorted(tok.decode([t for t in row.tolist() if t != -100], skip_special_tokens=False)
                     for row in batch["labels"])
    expected = sorted(e.messages[-1]["content"] + "<|end|><|eos|>" for e in examples)
    assert targets == expected
    logits = model(batch["tokens"], positions=batch["positions"])
    keep = batch["labels"] != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum")
    assert int(n) == int(keep.sum()) and torch.allclose(loss, manual, rtol=1e-5)


def test_full_sft_lowers_val_loss_and_writes_a_model_dir(model_dir, sft_file, tmp_path):
    res = finetune(sft_cfg(model_dir, sft_file, tmp_path, train={"max_steps": 12}, eval={"interval": 6}))
    evals = rows(tmp_path, "eval")
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals
    assert res.trainable_fraction == 1.0 and res.adapter_dir is None
    out = load_model_dir(res.model_dir)  # `generate` and `eval` load it like any model dir
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["trained_with"] == "lmforge finetune" and meta["finetune"]["mode"] == "sft"
    assert out.cfg == load_model_dir(model_dir).cfg


def test_lora_trains_only_adapters_and_merges_exactly(model_dir, sft_file, tmp_path):
    res = finetune(sft_cfg(model_dir, sft_file, tmp_path, finetune={"mode": "lora"},
                           lora={"rank": 4, "alpha": 8, "targets": ["wq", "wv"], "dropout": 0.0}))
    base = load_weights(model_dir)
    adapters = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # 2 layers x rank x (in + out) of wq, wv (2 kv heads)
    assert res.trainable_params == adapters and res.total_params == adapters + sum(
        v.numel() for v in base.values())
    assert 0 < res.trainable_fraction < 0.1
    # checkpoints hold the adapters (and their optimizer state), not the frozen base
    ckpt = max((tmp_path / "checkpoints").glob("step_*"))
    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert keys and all("lora_" in k for k in keys), keys
    # RUN/model: merged; untouched modules equal the base, adapted ones moved
    merged = load_weights(res.model_dir)
    assert set(merged) == set(base)
    for k, v in base.items():
        changed = not torch.equal(v, merged[k])
        assert changed == (k.endswith(("wq.weight", "wv.weight"))), k
    # RUN/adapter (base + unmerged adapters) computes what the merged model computes
    unmerged, meta = load_adapter(res.adapter_dir)
    assert meta["rank"] == 4 and meta["base_model"] == str(model_dir.resolve())
    x = torch.randint(0, 400, (2, 12))
    assert torch.allclose(unmerged(x), load_model_dir(res.model_dir)(x), atol=1e-5)


def interrupted(monkeypatch, at_call: int):
    """Make the SFT/classification batch source fail on its ``at_call``-th batch (a crash mid-run)."""
    from lmforge.tasks.classify import LabelledBatches as LB

    calls = {"n": 0}
    for cls in (SFTBatches, LB):
        orig = cls.next_batch

        def next_batch(self, orig=orig):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise RuntimeError("simulated crash")
            return orig(self)

        monkeypatch.setattr(cls, "next_batch", next_batch)


@pytest.mark.parametrize("mode", ["lora", "classify"])
def test_resume_after_a_crash_is_exact(model_dir, sft_file, tsv_files, tmp_path, monkeypatch, mode):
    def make(run_dir):
        if mode == "lora":
            return sft_cfg(model_dir, sft_file, run_dir, finetune={"mode": "lora"}, train={"max_steps": 8},
                           lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["all-linear"]},
                           eval={"interval": 4}, checkpoint={"interval": 4})
        return cls_cfg(model_dir, tsv_files, run_dir, classify={"pooling": "last", "dropout": 0.2},
                       eval={"interval": 4}, checkpoint={"interval": 4})

    straight = finetune(make(tmp_path / "a"))
    with monkeypatch.context() as m:
        interrupted(m, at_call=6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune(make(tmp_path / "b"))
    resumed = finetune(make(tmp_path / "b"))
    assert resumed.train.resumed_from and resumed.train.resumed_from.endswith("step_000004")
    a, b = load_weights(straight.model_dir), load_weights(resumed.model_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "a", "train")] == [r["loss"] for r in rows(tmp_path / "b", "train")]


def test_classifier_reports_dev_metrics_and_beats_chance(model_dir, tsv_files, tmp_path):
    res = finetune(cls_cfg(model_dir, tsv_files, tmp_path, train={"max_steps": 30}, eval={"interval": 10},
                           optim={"lr": 3e-3}))
    evals = rows(tmp_path, "eval")
    assert all({"accuracy", "macro_f1", "val_loss"} <= set(e) for e in evals)
    assert res.majority_baseline == 50.0 and res.labels == ["0", "1"]
    # 8 unseen dev sentences, 4 per class: chance and the majority baseline are 50%
    assert evals[-1]["accuracy"] >= 75.0, evals  # 87.5 on torch 2.13 CPU
    clf, labels = load_classifier_dir(res.model_dir)
    assert labels == ["0", "1"] and clf.pooling == "mean"


def test_early_stopping_keeps_the_best_weights(model_dir, tsv_files, tmp_path):
    """patience=1 with an unreachable min_delta: the first periodic evaluation is the best, the second stops
    the run; RUN/model must hold the first one's weights, whose dev accuracy is the one logged."""
    res = finetune(cls_cfg(model_dir, tsv_files, tmp_path, train={"max_steps": 20},
                           eval={"interval": 3, "patience": 1, "min_delta": 1000.0, "keep_best": True}))
    assert res.train.stop_reason == "early_stop" and res.train.step == 6
    assert res.train.best_step == 3 and res.weights_step == 3 and res.train.best_metric == "accuracy"
    best = {k.removeprefix("backbone."): v for k, v in load_file(str(tmp_path / "best" / "weights.safetensors")).items()}
    final = load_weights(res.model_dir)
    assert set(best) == set(final) - {"output.weight"}  # the tied head is stored once
    assert all(torch.equal(best[k], final[k]) for k in best)
    last = max((tmp_path / "checkpoints").glob("step_*"))
    assert last.name == "step_000006"  # the last step's state is still checkpointed (resume), not exported
    # the exported classifier scores on dev exactly what the step-3 evaluation logged
    from lmforge.data.labelled import encode_labelled, load_labelled
    from lmforge.tokenizer.core import load_tokenizer

    clf, labels = load_classifier_dir(res.model_dir)
    dev = load_labelled(tsv_files[1], "sentence")
    ids, ys = encode_labelled(load_tokenizer(res.model_dir), dev, labels, 32)
    logged = next(e for e in rows(tmp_path, "eval") if e["step"] == 3)
    scores = DevEvaluator(ids, ys, labels, 4, 0, torch.device("cpu"))(clf.eval())
    assert scores["accuracy"] == pytest.approx(logged["accuracy"])
    assert scores["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_labelled_batches_resume_and_do_not_depend_on_world_size():
    ids = [[i + 1] * (1 + i % 5) for i in range(20)]
    ys = [i % 3 for i in range(20)]
    one = LabelledBatches(ids, ys, 4, seed=3)
    stream = [one.next_batch() for _ in range(12)]  # crosses two epoch boundaries (5 batches per epoch)
    assert one.state_dict()["epoch"] == 2
    for k in (0, 4, 7):
        again = LabelledBatches(ids, ys, 4, seed=3)
        for _ in range(k):
            again.next_batch()
        state = again.state_dict()
        fresh = LabelledBatches(ids, ys, 4, seed=3)
        fresh.load_state_dict(state)
        assert torch.equal(fresh.next_batch()["labels"], stream[k]["labels"])
    ranks = [LabelledBatches(ids, ys, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for b in stream[:6]:
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p["labels"] for p in parts]), b["labels"])
    with pytest.raises(UserError, match="cannot resume"):
        LabelledBatches(ids, ys, 4, seed=4).load_state_dict(one.state_dict())


def test_errors_name_the_problem(model_dir, sft_file, tsv_files, tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        finetune(sft_cfg(tmp_path / "nope", sft_file, tmp_path / "r0"))
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len=64"):
        finetune(sft_cfg(model_dir, sft_file, tmp_path / "r1", data={"seq_len": 128}))
    with pytest.raises(UserError, match=r"labels \['0'\] outside classify.labels"):
        finetune(cls_cfg(model_dir, tsv_files, tmp_path / "r2", classify={"labels": ["1", "2"]}))
    with pytest.raises(UserError, match="fewer than one global batch"):
        finetune(sft_cfg(model_dir, sft_file, tmp_path / "r3", train={"global_batch": 64, "micro_batch": 8}))
    clf = finetune(cls_cfg(model_dir, tsv_files, tmp_path / "r4", train={"max_steps": 1},
                           eval={"batches": 0, "keep_best": False}))
    with pytest.raises(UserError, match="is a classifier"):
        finetune(sft_cfg(clf.model_dir, sft_file, tmp_path / "r5"))


def test_lora_sft_from_an_hf_imported_llama(tmp_path, capsys):
    """A model dir from `lmforge import` (a tiny random Llama whose HF chat template writes
    EOS itself) fine-tunes with LoRA, and the merged RUN/model generates through the CLI."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.cli import main

    src = tmp_path / "hf"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
                          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    fast.save_pretrained(src)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)).save_pretrained(src)
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "lm")]) == 0, capsys.readouterr().err
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SFT), encoding="utf-8")

    # the imported template writes EOS itself: each example is trained on its reply and that one EOS
    from lmforge.data.sft import encode_examples, load_sft_examples
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(tmp_path / "lm")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    examples = load_sft_examples(data)[:6]
    ds = encode_examples(tok, examples, 63)
    assert ds.stats["truncated"] == 0 and len(ds) == len(examples)
    for ex, ids, labels in zip(examples, ds.input_ids, ds.labels):
        assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1, tok.decode(ids, skip_special_tokens=False)
        target = [t for t in labels if t != -100]
        assert target[-1] == tok.eos_id
        assert tok.decode(target, skip_special_tokens=False) == ex.messages[-1]["content"] + "</s>"

    res = finetune(sft_cfg(tmp_path / "lm", data, tmp_path / "run", finetune={"mode": "lora"},
                           lora={"rank": 2, "alpha": 4, "targets": ["attention"]}, train={"max_steps": 4},
                           eval={"interval": 2}))
    evals = rows(tmp_path / "run", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    adapters = 2 * (2 * (32 + 32) + 2 * (32 + 16) * 2 + 2 * (32 + 32))  # 2 layers: wq, wo (32→32), wk, wv (32→16)
    assert res.trainable_params == adapters and 0 < res.trainable_fraction < 0.2
    # RUN/model is the merged model: the attention weights moved from the imported base, nothing else did
    base, merged = load_weights(tmp_path / "lm"), load_weights(res.model_dir)
    assert set(merged) == set(base)
    for k, v in base.items():
        assert (not torch.equal(v, merged[k])) == k.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight")), k
    # ... and computes what the base + the unmerged RUN/adapter compute
    unmerged, meta = load_adapter(res.adapter_dir)
    assert meta["base_model"] == str((tmp_path / "lm").resolve())
    x = torch.tensor([ds.input_ids[0][:20]])
    with torch.no_grad():
        torch.testing.assert_close(load_model_dir(res.model_dir).eval()(x), unmerged(x), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--model", res.model_dir, "--chat", "--prompt", "Say hello.", "--max-new-tokens", "4",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1


def test_default_seq_len_fits_the_model(model_dir, sft_file, tmp_path):
    """Without data.seq_len a run on a model with a short context (64 here) just works."""
    cfg = sft_cfg(model_dir, sft_file, tmp_path, train={"max_steps": 2}, eval={"interval": 0})
    data = config_dict(cfg)
    data["data"]["seq_len"] = None
    cfg = config_from_dict(data)
    assert cfg.data.seq_len == 64
    res = finetune(cfg)
    assert res.train.step == 2
