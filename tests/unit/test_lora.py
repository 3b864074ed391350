import pytest
import torch

from lmforge.config import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.lora import LoraConfig, LoRALinear, apply_lora, lora_state_dict, merge_lora
from lmforge.models.transformer import build_model


def tiny():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32)
    return build_model(cfg, seed=0)


def test_fresh_adapters_leave_outputs_unchanged_and_only_adapters_train():
    model = tiny()
    x = torch.randint(0, 64, (2, 10))
    before = model(x)
    info = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["wq", "wv"]))
    assert info["adapted_modules"] == 4
    torch.testing.assert_close(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert info["trainable"] == 4 * 4 * (32 + 32)
    assert 0 < info["trainable"] / info["total"] < 0.1


def test_merge_equals_unmerged_after_training():
    model = tiny()
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=["all-linear"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 64, (4, 12))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    # training moved every adapter (lora_B starts at zero), so the adapted model is no longer the base
    adapters = lora_state_dict(model)
    assert len(adapters) == 2 * 2 * 7
    for k, v in adapters.items():
        if k.endswith("lora_B"):
            assert v.abs().max() > 1e-4, f"{k} did not move in training"
    base = tiny().eval()
    base_out = base(x)
    unmerged = model(x)
    assert (unmerged - base_out).abs().max() > 1e-3
    assert merge_lora(model) == 2 * 7
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())  # plain checkpoint keys again
    # the merge changed exactly the adapted weights: every linear but the output head and the norms/embedding
    merged, plain = model.state_dict(), base.state_dict()
    for k in plain:
        changed = not torch.equal(merged[k], plain[k])
        assert changed == (".attention.w" in k or ".feed_forward.w" in k), k


def test_state_dict_keeps_base_keys():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=4))  # default targets: wq, wv
    state = model.state_dict()
    # the base tensors keep their keys and values, so a base checkpoint loads unchanged ...
    assert base.keys() <= state.keys()
    for k, v in base.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    # ... and the only new keys are one (A, B) pair for each adapted linear, with the adapter shapes
    adapted = [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")]
    expected = {f"{m}.lora_{ab}" for m in adapted for ab in "AB"}
    assert state.keys() - base.keys() == expected
    for m in adapted:
        assert state[f"{m}.lora_A"].shape == (4, 32)
        assert state[f"{m}.lora_B"].shape == (32, 4)
    assert set(lora_state_dict(model)) == expected
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert set(missing) == expected and not unexpected


def test_bad_targets():
    with pytest.raises(ConfigError, match="lora.targets"):
        apply_lora(tiny(), LoraConfig(targets=["qkv"]))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
