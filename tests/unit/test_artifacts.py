"""lmforge.artifacts: one metadata schema for every kind of dir, old formats still load, the bounded
reader, and the one consolidation path."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lmforge.artifacts import FORMAT_VERSION, kind, read_metadata
from lmforge.artifacts.adapter_dir import load_adapter, model_fingerprint, save_adapter_dir
from lmforge.artifacts.classifier_dir import load_classifier_dir, read_task, save_classifier_dir
from lmforge.artifacts.consolidate import consolidate, drop_shared, model_class
from lmforge.artifacts.heads_dir import HEADS_NAME, head_names, load_heads, save_model_dir_with_heads
from lmforge.artifacts.metadata import read_config_json
from lmforge.artifacts.model_dir import (
    load_model_dir,
    read_config,
    save_model_dir,
    save_weights,
    unique_state_dict,
)
from lmforge.artifacts.reward_dir import is_reward_dir, load_reward_dir, save_reward_dir
from lmforge.config import UserError, to_dict
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.config import ModelConfig
from lmforge.models.heads import attach_mlm_head
from lmforge.models.lora import LoraConfig, apply_lora, lora_state_dict
from lmforge.models.reward import RewardModel
from lmforge.models.transformer import Transformer, build_model

CFG = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}
TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _lm(tie=True, seed=0, **kw):
    return build_model(ModelConfig(**CFG, tie_embeddings=tie, **kw), seed=seed)


def _config_json(d):
    return json.loads((d / "config.json").read_text())


def _perturb(module, seed=3, only=("",)):
    """Move parameters (those whose name contains one of ``only``) off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(o in name for o in only):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---- the schema, written by every save function and read back --------------------------------------
def test_lm_dir_round_trip(tmp_path):
    model = _lm(tie=False)
    save_model_dir(model, tmp_path / "lm", extra={"tokenizer_hash": "sha256:abc", "trained_with": "test"})
    data = _config_json(tmp_path / "lm")
    assert data["lmforge"]["format_version"] == FORMAT_VERSION == 1
    assert data["lmforge"]["task"] == "lm" and data["lmforge"]["tokenizer_hash"] == "sha256:abc"
    assert "task" not in data and "tokenizer_hash" not in data  # schema fields live in the block only
    info = read_metadata(tmp_path / "lm")
    assert (info.kind, info.task, info.format_version) == ("model", "lm", 1)
    assert info.tokenizer_hash == "sha256:abc" and info.extra == {"trained_with": "test"}
    assert info.model == to_dict(model.cfg) and info.max_seq_len == 16
    assert kind(tmp_path / "lm") == "lm" and read_task(tmp_path / "lm") == {"task": "lm"}
    back = load_model_dir(tmp_path / "lm")
    assert torch.equal(back(TOKENS), model(TOKENS))


def test_classifier_dir_round_trip(tmp_path):
    clf = SequenceClassifier(_lm(), 3, "mean")
    _perturb(clf.score)
    save_classifier_dir(clf, tmp_path / "clf", ["a", "b", "c"], extra={"max_tokens": 12, "finetune": {"step": 4}})
    info = read_metadata(tmp_path / "clf")
    assert (info.task, info.labels, info.pooling, info.max_tokens) == ("classify", ["a", "b", "c"], "mean", 12)
    assert info.extra == {"finetune": {"step": 4}} and kind(tmp_path / "clf") == "classify"
    assert read_task(tmp_path / "clf") == {"task": "classify", "labels": ["a", "b", "c"], "pooling": "mean",
                                          "max_tokens": 12}
    back, labels = load_classifier_dir(tmp_path / "clf")
    assert labels == ["a", "b", "c"] and back.pooling == "mean"
    assert torch.equal(back(TOKENS), clf(TOKENS))


def test_reward_dir_round_trip(tmp_path):
    rm = RewardModel(_lm())
    _perturb(rm.score)
    save_reward_dir(rm, tmp_path / "rm", extra={"tokenizer_hash": "sha256:t"})
    info = read_metadata(tmp_path / "rm")
    assert (info.task, info.pooling, info.tokenizer_hash) == ("reward", "last", "sha256:t")
    assert is_reward_dir(tmp_path / "rm") and not is_reward_dir(tmp_path / "nothing")
    assert torch.equal(load_reward_dir(tmp_path / "rm")(TOKENS), rm(TOKENS))
    with pytest.raises(UserError, match="not a classifier model dir"):
        load_classifier_dir(tmp_path / "rm")


def test_heads_dir_round_trip(tmp_path):
    enc = _lm(tie=False, causal=False, lm_head=False)
    head = attach_mlm_head(enc, seed=0)
    _perturb(head)
    save_model_dir_with_heads(enc, tmp_path / "enc")
    assert enc.mlm is head  # the caller's model keeps its head
    info = read_metadata(tmp_path / "enc")
    assert info.heads == ["mlm"] and head_names(tmp_path / "enc") == ["mlm"]
    back = load_heads(tmp_path / "enc", enc.cfg)["mlm"]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in head.state_dict().items())
    backbone = load_model_dir(tmp_path / "enc")  # the backbone alone, strictly (no mlm.* keys in it)
    assert torch.equal(backbone.hidden_states(TOKENS), enc.hidden_states(TOKENS))


def test_adapter_dir_round_trip(tmp_path):
    base = _lm()
    save_model_dir(base, tmp_path / "base")
    clf = SequenceClassifier(load_model_dir(tmp_path / "base"), 2, "last")
    apply_lora(clf, LoraConfig(rank=2, alpha=4.0, targets=["wq", "wv"]), trainable=("score.",))
    _perturb(clf, only=("lora_", "score."))  # LoRA B starts at zero: move it so the adapters matter
    sd = {**lora_state_dict(clf), **{k: v for k, v in clf.state_dict().items() if k.startswith("score.")}}
    save_adapter_dir(tmp_path / "ad", sd, str(tmp_path / "base"), model_fingerprint(tmp_path / "base"), 2, 4.0,
                     ["wq", "wv"], task="classify", labels=["no", "yes"], pooling="last")
    data = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert data["lmforge"]["kind"] == "adapter" and data["lmforge"]["format_version"] == 1
    info = read_metadata(tmp_path / "ad")
    assert (info.kind, info.task, info.labels) == ("adapter", "classify", ["no", "yes"])
    assert info.adapter["rank"] == 2 and info.adapter["base_model"] == str((tmp_path / "base").resolve())
    assert kind(tmp_path / "ad") == "adapter"
    model, meta = load_adapter(tmp_path / "ad")
    assert meta["labels"] == ["no", "yes"] and meta["task"] == "classify"
    assert torch.allclose(model(TOKENS), clf.eval()(TOKENS), atol=1e-6)
    with pytest.raises(UserError, match="adapter dir"):
        info.model_config()


# ---- dirs written before the schema (format 0) ------------------------------------------------------
def _old_dir(d, config, sd):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_weights(sd, d)
    return d


def test_old_lm_dirs_load(tmp_path):
    model = _lm()
    sd = unique_state_dict(model)
    old = _old_dir(tmp_path / "old", {"model": to_dict(model.cfg), "lmforge_version": "0.3.0",
                                      "tokenizer_hash": "sha256:old", "trained_with": "lmforge pretrain"}, sd)
    info = read_metadata(old)
    assert (info.format_version, info.task, info.tokenizer_hash, info.lmforge_version) == (0, "lm", "sha256:old",
                                                                                          "0.3.0")
    assert info.extra == {"trained_with": "lmforge pretrain"}
    assert torch.equal(load_model_dir(old)(TOKENS), model(TOKENS))
    new = read_config_json(old)  # converted to the current shape for tools that rewrite a dir
    assert new["lmforge"]["format_version"] == 1 and new["lmforge"]["tokenizer_hash"] == "sha256:old"
    assert "tokenizer_hash" not in new and new["trained_with"] == "lmforge pretrain"
    bare = _old_dir(tmp_path / "bare", to_dict(model.cfg), sd)  # the oldest shape: the bare ModelConfig
    assert read_config(bare) == model.cfg and read_metadata(bare).task == "lm"
    assert torch.equal(load_model_dir(bare)(TOKENS), model(TOKENS))


def test_old_classifier_reward_and_heads_dirs_load(tmp_path):
    clf = SequenceClassifier(_lm(), 2, "first")
    _perturb(clf.score)
    sd = {**unique_state_dict(clf.backbone), **{f"score.{k}": v for k, v in clf.score.state_dict().items()}}
    old = _old_dir(tmp_path / "clf", {"model": to_dict(clf.cfg), "task": "classify", "labels": ["x", "y"],
                                      "pooling": "first", "max_tokens": 9, "tokenizer_hash": "sha256:c"}, sd)
    back, labels = load_classifier_dir(old)
    assert labels == ["x", "y"] and torch.equal(back(TOKENS), clf(TOKENS))
    assert read_metadata(old).max_tokens == 9 and kind(old) == "classify"

    rm = RewardModel(_lm())
    _perturb(rm.score)
    sd = {**unique_state_dict(rm.backbone), "score.weight": rm.score.weight.detach()}
    old = _old_dir(tmp_path / "rm", {"model": to_dict(rm.cfg), "task": "reward", "pooling": "last"}, sd)
    assert is_reward_dir(old) and torch.equal(load_reward_dir(old)(TOKENS), rm(TOKENS))

    enc = _lm(tie=False, causal=False, lm_head=False)
    head = attach_mlm_head(enc, seed=0)
    old = _old_dir(tmp_path / "enc", {"model": to_dict(enc.cfg), "heads": ["mlm"]},
                   {k: v for k, v in unique_state_dict(enc).items() if not k.startswith("mlm.")})
    save_file({f"mlm.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(old / HEADS_NAME))
    assert head_names(old) == ["mlm"]
    back = load_heads(old, enc.cfg)["mlm"]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in head.state_dict().items())
    load_model_dir(old)


def test_old_adapter_dir_loads(tmp_path):
    save_model_dir(_lm(), tmp_path / "base")
    model = load_model_dir(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets=["wq"]))
    _perturb(model, only=("lora_",))
    d = tmp_path / "ad"
    d.mkdir()
    save_weights(lora_state_dict(model), d, weights_name="adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({
        "base_model": str((tmp_path / "base").resolve()), "base_fingerprint": model_fingerprint(tmp_path / "base"),
        "rank": 2, "alpha": 2.0, "targets": ["wq"], "task": "lm", "lmforge_version": "0.3.0"}))
    info = read_metadata(d)
    assert (info.kind, info.task, info.format_version) == ("adapter", "lm", 0)
    loaded, meta = load_adapter(d)
    assert meta["rank"] == 2 and meta["task"] == "lm"
    base = load_model_dir(tmp_path / "base")
    out = loaded(TOKENS)
    assert not torch.allclose(out, base(TOKENS))  # the adapters changed the model
    sd = lora_state_dict(loaded)
    assert all(torch.equal(sd[k], v) for k, v in lora_state_dict(model).items())


def test_unreadable_metadata_is_a_one_line_error(tmp_path):
    model = _lm()
    save_model_dir(model, tmp_path / "m")
    data = _config_json(tmp_path / "m")
    data["lmforge"]["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="newer lmforge") as e:
        load_model_dir(tmp_path / "m")
    assert "\n" not in str(e.value)
    data["lmforge"].update(format_version=1, task="segment")
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="unknown task 'segment'"):
        read_metadata(tmp_path / "m")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserError, match="Hugging Face model dir.*lmforge import"):
        read_metadata(hf)
    with pytest.raises(UserError, match="config.json is missing"):
        read_metadata(tmp_path / "nope")


def test_bounded_reader_refuses_huge_and_deep_configs(tmp_path):
    huge = tmp_path / "huge"
    huge.mkdir()
    with open(huge / "config.json", "wb") as f:  # sparse: no disk used, but 300 MB by its size
        f.truncate(300 << 20)
    with pytest.raises(UserError, match="over the .*-byte limit") as e:
        read_metadata(huge)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="over the"):
        load_model_dir(huge)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text('{"model": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(UserError, match="nested") as e:
        read_config(deep)
    assert "\n" not in str(e.value)
    (deep / "config.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match="nested"):
        read_metadata(deep)


# ---- consolidation ---------------------------------------------------------------------------------
def test_drop_shared_and_model_class():
    model = _lm(tie=True)
    sd = model.state_dict()
    assert "output.weight" in sd and "output.weight" not in drop_shared(sd)
    assert set(drop_shared(sd)) == set(sd) - {"output.weight"}

    class Wrapped(type(model)):  # what fully_shard does: a class made on the fly
        pass
    Wrapped.__module__ = "torch.distributed.fsdp.fake"
    model.__class__ = Wrapped
    assert model_class(model) is type(model).__mro__[1]


def _consolidate_worker(rank, world, init, out, with_head):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _lm(tie=True, seed=0)
        if with_head:
            attach_mlm_head(model, seed=1)
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        plain = _lm(tie=True, seed=0).eval()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        assert any(hasattr(p, "placements") for p in model.parameters())  # DTensor shards
        shell = consolidate(model, rank == 0, template=model)
        if rank == 0:
            sd = shell.state_dict()
            extra = shell.extra_state_dict
            got = {**sd, **extra}
            same = sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
            shell.eval()
            result = {"same": same, "forward": torch.equal(shell(TOKENS), plain(TOKENS)), "class": type(shell).__name__, "tied": shell.output.weight is
                      shell.tok_embeddings.weight, "extra": sorted(extra),
                      "meta": any(t.is_meta for t in sd.values())}
            with open(out, "w") as f:
                json.dump(result, f)
        else:
            assert shell is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_head", [False, True])
def test_consolidate_a_sharded_model_equals_the_plain_state_dict(tmp_path, with_head):
    import torch.multiprocessing as mp

    out = tmp_path / "result.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_consolidate_worker, args=(2, init, str(out), with_head), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["same"] and result["tied"] and not result["meta"] and result["forward"]
    assert result["class"] == "Transformer"  # the model's own class, not FSDP's on-the-fly subclass
    if with_head:
        assert result["extra"] and all(k.startswith("mlm.") for k in result["extra"])
    else:
        assert result["extra"] == []


def test_consolidate_into_a_given_structure_is_strict(tmp_path):
    clf = SequenceClassifier(_lm(), 2)
    _perturb(clf.score)
    shell = consolidate(clf, True, build_shell=lambda: SequenceClassifier(Transformer(clf.cfg), 2), keep_extra=False)
    assert torch.equal(shell(TOKENS), clf(TOKENS))
    assert shell.backbone.output.weight is shell.backbone.tok_embeddings.weight
    assert consolidate(clf, False, build_shell=lambda: SequenceClassifier(Transformer(clf.cfg), 2)) is None
    with pytest.raises(RuntimeError, match="missing"):  # a structure the weights do not fill
        consolidate(_lm(), True, build_shell=lambda: SequenceClassifier(Transformer(clf.cfg), 2))
    with pytest.raises(RuntimeError, match="unexpected"):
        consolidate(clf, True, build_shell=lambda: Transformer(clf.cfg), keep_extra=False)
