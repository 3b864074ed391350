"""The masked-LM head and BERT's masking recipe."""

import pytest
import torch

from lmforge.config import UserError
from lmforge.models import build_model, get_preset
from lmforge.models.heads import (
    IGNORE_INDEX,
    MLMHead,
    Pooler,
    load_heads,
    mask_tokens,
    mlm_logits,
    save_heads,
)
from lmforge.train.losses import masked_lm_loss

MASK, SPECIAL = 4, (0, 1, 2)


def test_mask_tokens_follows_15_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (64, 512), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(tokens, MASK, 1000, SPECIAL, generator=g)
    selected = labels != IGNORE_INDEX
    assert not selected[:, 0].any() and not selected[:, -1].any()  # specials never chosen
    assert torch.equal(labels[selected], tokens[selected])
    frac = selected.float().mean().item() * 512 / 510
    assert abs(frac - 0.15) < 0.005
    n = selected.sum().item()
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01  # (a random draw equal to the original is rare)
    assert torch.equal(inputs[~selected], tokens[~selected])
    assert tokens[0, 0] == 1  # the input tensor is not modified


def test_mask_tokens_is_seeded_and_validates():
    t = torch.randint(5, 50, (4, 32))
    a = mask_tokens(t, MASK, 50, SPECIAL, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(t, MASK, 50, SPECIAL, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="0.15"):
        mask_tokens(t, MASK, 50, prob=1.5)


def _tiny_bert():
    cfg = get_preset("bert-base", vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32,
                     dropout=0.0)
    return build_model(cfg, seed=0)


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mlm_training_from_scratch_learns_to_fill_masks(one_thread):
    torch.manual_seed(0)
    model = _tiny_bert()
    head = MLMHead(model.cfg)
    head.init_weights()
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    # Each row repeats one random token: its marginal is uniform over 59 ids (best context-free loss
    # ln 59 = 4.08), but a model that reads the unmasked neighbours can fill every mask.
    losses = []
    for step in range(80):
        tokens = torch.randint(5, 64, (16, 1), generator=g).expand(16, 16)
        inputs, labels = mask_tokens(tokens, MASK, 64, SPECIAL, generator=g)
        loss_sum, n = masked_lm_loss(mlm_logits(model, head, inputs), labels)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and sum(losses[-10:]) / 10 < 3.3, (losses[0], losses[-10:])


def test_heads_save_and_load(tmp_path):
    import json

    model = _tiny_bert()
    heads = {"mlm": MLMHead(model.cfg), "pooler": Pooler(model.cfg)}
    heads["mlm"].init_weights(torch.Generator().manual_seed(1))
    save_heads(heads, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"heads": ["mlm", "pooler"]}))
    back = load_heads(tmp_path, model.cfg)
    for name, head in heads.items():
        for k, v in head.state_dict().items():
            assert torch.equal(back[name].state_dict()[k], v)
    (tmp_path / "config.json").write_text(json.dumps({"heads": ["nsp"]}))
    with pytest.raises(UserError, match="unknown head 'nsp'"):
        load_heads(tmp_path, model.cfg)


def test_resize_keeps_old_bias():
    head = MLMHead(_tiny_bert().cfg)
    with torch.no_grad():
        head.bias.copy_(torch.arange(64.0))
    head.resize(70)
    assert torch.equal(head.bias[:64], torch.arange(64.0)) and torch.equal(head.bias[64:], torch.zeros(6))
