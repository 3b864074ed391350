"""Sharded initialization and sharded loading (issue 10, items 2-3) on gloo ranks.

The model is built on the meta device, parallelized (FSDP2 / TP / both), and only then each rank
allocates and fills its own shards: from the seeded init (bitwise the 1-process `build_model` init) or
from a model dir's safetensors, reading only its slices. A 7B-width model shows the memory effect.
"""

from __future__ import annotations

import json
import multiprocessing as mp

import _dist_harness as h
import _sharded_worker as w
import pytest
import torch

pytestmark = pytest.mark.distributed

TINY = dict(h.TINY)  # tied embeddings, GQA
TINY_GPT = dict(h.TINY_GPT)  # biases, LayerNorm, learned positions
LAYOUTS_2 = {"fsdp": {"dp_shard": 2}, "tp": {"tp": 2}, "ddp": {"dp_replicate": 2, "dp_shard": 1}}
LAYOUTS_4 = {"fsdp_tp": {"dp_shard": 2, "tp": 2},  # FSDP2 over TP: _StridedShard on the colwise weights
             "hsdp": {"dp_replicate": 2, "dp_shard": 2}}  # (Replicate, Shard(0)) on a 2-D mesh


def _reference(spec: dict, seed: int):
    from lmforge.models.transformer import build_model

    model = build_model(w.model_config(spec), seed=seed)
    with torch.no_grad():
        logits = model(w.probe_tokens(spec["vocab_size"])).float()
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, logits


def _check_equal(out_dir, name: str, ref_state, ref_logits, meta_expected: bool) -> None:
    from safetensors.torch import load_file

    got = load_file(str(out_dir / f"{name}.safetensors"))
    assert json.loads((out_dir / f"{name}.json").read_text())["built_on_meta"] is meta_expected
    logits = got.pop("__logits__")
    assert set(got) == set(ref_state)
    for k, v in ref_state.items():
        assert torch.equal(got[k], v), f"{name}: {k} differs from the 1-process tensor"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec_name", ["tiny", "tiny_gpt"])
def test_sharded_init_equals_one_process_init(tmp_path, spec_name):
    spec = {"tiny": TINY, "tiny_gpt": TINY_GPT}[spec_name]
    _, ref_state, ref_logits = _reference(spec, seed=0)
    h.spawn(2, "_sharded_worker:layouts", out_dir=str(tmp_path), spec=spec, layouts=LAYOUTS_2)
    for name in LAYOUTS_2:
        _check_equal(tmp_path, name, ref_state, ref_logits, meta_expected=name != "ddp")


def test_sharded_load_equals_one_process_load(tmp_path):
    from lmforge.artifacts.model_dir import save_model_dir

    model, ref_state, ref_logits = _reference(TINY_GPT, seed=1)
    model_dir = tmp_path / "model"
    save_model_dir(model, model_dir, max_shard_bytes=40_000)  # several files + an index
    assert (model_dir / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    out.mkdir()
    h.spawn(2, "_sharded_worker:layouts", out_dir=str(out), spec=TINY_GPT, layouts=LAYOUTS_2,
            model_dir=str(model_dir))
    for name in LAYOUTS_2:
        _check_equal(out, name, ref_state, ref_logits, meta_expected=name != "ddp")


def test_sharded_init_and_load_fsdp_over_tp_and_hsdp_4_ranks(tmp_path):
    from lmforge.artifacts.model_dir import save_model_dir

    _, ref_state, ref_logits = _reference(TINY, seed=0)
    h.spawn(4, "_sharded_worker:layouts", out_dir=str(tmp_path), spec=TINY, layouts=LAYOUTS_4)
    for name in LAYOUTS_4:
        _check_equal(tmp_path, name, ref_state, ref_logits, meta_expected=True)

    model, ref_state, ref_logits = _reference(TINY, seed=3)
    save_model_dir(model, tmp_path / "model")
    out = tmp_path / "load"
    out.mkdir()
    h.spawn(4, "_sharded_worker:layouts", out_dir=str(out), spec=TINY, layouts=LAYOUTS_4,
            model_dir=str(tmp_path / "model"))
    for name in LAYOUTS_4:
        _check_equal(out, name, ref_state, ref_logits, meta_expected=True)


def test_sharded_load_refuses_a_mismatched_model_dir(tmp_path):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.config import UserError
    from lmforge.distributed.materialize import ShardedLoad, attach_weights, materialize
    from lmforge.models.transformer import Transformer

    model, _, _ = _reference(TINY_GPT, seed=0)
    save_model_dir(model, tmp_path / "m")
    wider = w.model_config({**TINY_GPT, "ffn_hidden": 256})
    with torch.device("meta"):
        target = Transformer(wider)
    attach_weights(target, ShardedLoad(tmp_path / "m"))
    with pytest.raises(UserError, match=r"feed_forward.w1.bias. in .* has shape \[128\], the model expects \[256\]"):
        materialize(target, "cpu")
    with torch.device("meta"):
        target = Transformer(w.model_config({**TINY_GPT, "n_layers": 3}))
    attach_weights(target, ShardedLoad(tmp_path / "m"))
    with pytest.raises(UserError, match=r"missing \['layers.2"):
        materialize(target, "cpu")


# ---- Llama-2-7B width, 2 layers: memory per rank -------------------------------------------------
WIDE = {"vocab_size": 32000, "dim": 4096, "n_layers": 2, "n_heads": 32, "n_kv_heads": 32, "ffn_hidden": 11008,
        "max_seq_len": 64, "tie_embeddings": False}


def _run_reference(out_dir, save_dir=None, load_dir=None) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=w.wide_reference, args=(str(out_dir), WIDE, save_dir, load_dir))
    p.start()
    p.join(timeout=900)
    assert p.exitcode == 0, f"reference process exited with {p.exitcode}"


@pytest.mark.slow
def test_7b_width_sharded_init_and_load_peak_rss(tmp_path):
    """Each of 2 ranks peaks well below one process holding the whole model; logits equal after loading.

    Peaks are read once the weights are in place (before the probe forward, whose FSDP2 all-gathers
    are training-time memory); `figures` also prints the peak after the forward.
    """
    model_dir = tmp_path / "model"
    _run_reference(tmp_path, save_dir=str(model_dir))  # full init, its peak, then the model dir
    _run_reference(tmp_path, load_dir=str(model_dir))  # full load, its peak
    h.spawn(2, "_sharded_worker:wide", out_dir=str(tmp_path), spec=WIDE, tag="sharded_init", timeout_s=900)
    h.spawn(2, "_sharded_worker:wide", out_dir=str(tmp_path), spec=WIDE, tag="sharded_load",
            model_dir=str(model_dir), timeout_s=900)

    ref_init = json.loads((tmp_path / "ref_init.json").read_text())
    ref_load = json.loads((tmp_path / "ref_load.json").read_text())
    model_mb = ref_init["numel"] * 4 / 2**20
    dim, ffn = WIDE["dim"], WIDE["ffn_hidden"]
    layer_mb = (4 * dim * dim + 3 * dim * ffn) * 4 / 2**20  # one block's fp32 weights (809 MiB)
    figures = {"model_fp32_mb": round(model_mb), "unsharded_init_mb": round(ref_init["peak_rss_mb"]),
               "unsharded_load_mb": round(ref_load["peak_rss_mb"])}
    for tag, ref in (("sharded_init", ref_init), ("sharded_load", ref_load)):
        ranks = [json.loads((tmp_path / f"{tag}_rank{r}.json").read_text()) for r in range(2)]
        figures[tag + "_mb"] = [round(r["peak_rss_mb"]) for r in ranks]
        figures[tag + "_after_forward_mb"] = [round(r["peak_rss_after_forward_mb"]) for r in ranks]
        for r in ranks:
            assert r["built_on_meta"]
            assert r["local_numel"] <= ref_init["numel"] // 2 + 4096  # only its half is allocated
            # Well below the 1-process peak, and about half the model plus one layer (512 MiB for
            # the interpreter, torch and gloo).
            assert r["peak_rss_mb"] < 0.5 * ref["peak_rss_mb"], figures
            assert r["peak_rss_mb"] < model_mb / 2 + layer_mb + 512, figures
        ref_logits = torch.load(tmp_path / f"{'ref_init' if tag == 'sharded_init' else 'ref_load'}_logits.pt",
                                weights_only=True)
        torch.testing.assert_close(torch.load(tmp_path / f"{tag}_logits.pt", weights_only=True), ref_logits,
                                   rtol=0, atol=1e-5)
    # The sharded init has the 1-process init's distribution, tensor by tensor (it is in fact bitwise equal).
    stats = json.loads((tmp_path / "sharded_init_rank0.json").read_text())["stats"]
    for name, (mean, std) in ref_init["stats"].items():
        got_mean, got_std = stats[name]
        if std > 0:
            assert abs(got_std - std) <= 0.01 * std, name
            assert abs(got_mean - mean) <= 0.01 * std, name
        else:
            assert got_std == 0 and got_mean == mean, name
    print("peak RSS (MiB):", json.dumps(figures))


def test_sharded_load_of_an_imported_hf_checkpoint_matches_transformers(tmp_path):
    """`lmforge import` output (a Llama with GQA) read slice by slice on 2 ranks: transformers' logits."""
    transformers = pytest.importorskip("transformers")
    from lmforge.artifacts.hf.convert import import_hf
    from lmforge.artifacts.model_dir import load_model_dir, read_config
    from lmforge.config import to_dict

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    spec = to_dict(read_config(tmp_path / "lm"))
    ref = load_model_dir(tmp_path / "lm")
    ref_state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        hf_logits = hf(w.probe_tokens(spec["vocab_size"])).logits.float()
    out = tmp_path / "out"
    out.mkdir()
    h.spawn(2, "_sharded_worker:layouts", out_dir=str(out), spec=spec, layouts={"fsdp": {"dp_shard": 2},
                                                                                "tp": {"tp": 2}},
            model_dir=str(tmp_path / "lm"))
    for name in ("fsdp", "tp"):
        _check_equal(out, name, ref_state, hf_logits, meta_expected=True)
