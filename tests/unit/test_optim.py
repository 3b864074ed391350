import torch

from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train.config import OptimConfig
from lmforge.train.optim import build_optimizer, param_groups


def _model(**kw):
    return build_model(get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, **kw), seed=0)


def test_no_decay_on_norms_biases_and_embeddings_by_default():
    model = _model(bias=True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in no_decay["names"]
    assert "layers.0.attention_norm.weight" in no_decay["names"]
    assert "layers.0.attention.wq.bias" in no_decay["names"]
    assert "layers.0.attention.wq.weight" in decay["names"]
    assert "layers.1.feed_forward.w2.weight" in decay["names"]
    # every trainable parameter exactly once; the tied head is the embedding
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert "output.weight" not in decay["names"] + no_decay["names"]


def test_decay_flags_move_groups():
    model = _model(tie_embeddings=False)
    groups = param_groups(model, 0.1, decay_norms_and_biases=True, decay_embeddings=True)
    assert len(groups) == 1 and "tok_embeddings.weight" in groups[0]["names"]
    assert "norm.weight" in groups[0]["names"] and "output.weight" in groups[0]["names"]


def test_frozen_parameters_are_left_out():
    model = _model(tie_embeddings=False)
    frozen = {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.ffn_norm.weight"}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters())) - 3
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in trainable.values()}
    assert sorted(n for g in groups for n in g["names"]) == sorted(trainable)
    for name in ("adamw", "muon"):
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=0.5))
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)  # a gradient everywhere: only the optimizer's groups decide what moves
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == (n in frozen), f"{name}: {n}"


def test_weight_decay_really_skips_embeddings():
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    emb = model.tok_embeddings.weight.detach().clone()
    wq = model.layers[0].attention.wq.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay can move a parameter
    assert torch.equal(model.tok_embeddings.weight, emb)
    assert torch.allclose(model.layers[0].attention.wq.weight, wq * (1 - 0.1 * 0.5))
