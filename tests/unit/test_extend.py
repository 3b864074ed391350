"""`lmforge tokenizer extend`: new Chinese tokens on an English BPE model, ids and English behaviour kept."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.artifacts.model_dir import load_model_dir, load_weights, save_model_dir
from lmforge.config import UserError
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model

DATA = Path(__file__).resolve().parents[1] / "data"  # vendored slices (tests/data/SOURCE.md)
ZH = DATA / "chinese_poetry" / "derived" / "lines.txt"  # classical Chinese, one poem line per line
EN = DATA / "tinyshakespeare" / "input.txt"
ADD = 300
HELD_OUT = 300  # the last lines of ZH: never read by the extension


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train ~10× faster on one thread when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(model, ids, steps, seed=0, lr=3e-3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        ix = torch.randint(0, len(ids) - 65, (16,), generator=g)
        x = torch.stack([ids[i:i + 65] for i in ix.tolist()])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _nll(model, ids):
    """Mean next-token loss over a long id list, in 128-token windows."""
    model.eval()
    x = torch.tensor(ids)
    total, n = 0.0, 0
    for i in range(0, len(x) - 1, 128):
        c = x[i:i + 129]
        total += F.cross_entropy(model(c[None, :-1])[0], c[1:], reduction="sum").item()
        n += len(c) - 1
    return total / n


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_thread):
    """An English base model (BPE tokenizer + a briefly trained tiny model) and its Chinese extension."""
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("extend")
    en = EN.read_text(encoding="utf-8")[:300_000]
    (root / "en.txt").write_text(en, encoding="utf-8")
    tok = train_tokenizer([str(root / "en.txt")], 512, root / "tok", progress=False)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                     ffn_hidden=128, max_seq_len=128)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    _train(model, torch.tensor(tok.encode(en)), 120)
    save_model_dir(model, root / "base", tokenizer_dir=str(root / "tok"))
    zh_train = root / "zh.txt"
    zh_train.write_text("\n".join(ZH.read_text(encoding="utf-8").splitlines()[:-HELD_OUT]), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "extend", "--base", str(root / "base"),
                        "--input", str(zh_train), "--add", str(ADD), "--max-bytes", "300000", "--out",
                        str(root / "ext"), "--json"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr
    return root / "base", root / "ext", json.loads(r.stdout)


def _held_out_zh(n=HELD_OUT):
    return ZH.read_text(encoding="utf-8").splitlines()[-n:]  # the extension above never read these


def test_existing_ids_kept_and_english_tokenized_identically(dirs):
    from lmforge.tokenizer.core import load_tokenizer

    base, ext, report = dirs
    a, b = load_tokenizer(base), load_tokenizer(ext)
    assert report["added"] == ADD and b.vocab_size == a.vocab_size + ADD
    va = a.backend.get_vocab(with_added_tokens=True)
    vb = b.backend.get_vocab(with_added_tokens=True)
    assert all(vb[t] == i for t, i in va.items())  # no existing id moved
    assert sorted(set(vb.values()) - set(va.values())) == list(range(a.vocab_size, b.vocab_size))
    english = EN.read_text(encoding="utf-8")[-50_000:] + " naïve café — “quoted” € ½ ü 1999"
    assert a.encode(english) == b.encode(english)
    assert b.special_tokens == a.special_tokens and b.eos_id == a.eos_id


def test_chinese_compresses_and_round_trips(dirs):
    from lmforge.tokenizer.core import load_tokenizer

    base, ext, report = dirs
    a, b = load_tokenizer(base), load_tokenizer(ext)
    lines = _held_out_zh()
    assert all(b.decode(b.encode(s)) == s for s in lines)
    chars = sum(map(len, lines))
    before = chars / sum(len(a.encode(s)) for s in lines)
    after = chars / sum(len(b.encode(s)) for s in lines)
    assert before < 0.45 and after > 1.6 * before, (before, after)  # 3 UTF-8 bytes per character before
    assert report["chars_per_token_after"] > 1.6 * report["chars_per_token_before"]
    words = [b.decode([i]) for i in range(a.vocab_size, b.vocab_size)]
    assert "不" in words and any(len(w) > 1 and "\ufffd" not in w for w in words)  # characters and words


def test_new_rows_are_the_mean_of_their_old_pieces(dirs):
    from lmforge.tokenizer.core import load_tokenizer

    base, ext, _ = dirs
    a, b = load_tokenizer(base), load_tokenizer(ext)
    old, new = load_weights(base)["tok_embeddings.weight"], load_weights(ext)["tok_embeddings.weight"]
    assert new.shape[0] == b.vocab_size and torch.equal(new[: old.shape[0]], old)
    checked = 0
    for i in range(a.vocab_size, b.vocab_size):
        text = b.decode([i])
        if "\ufffd" in text:  # a partial UTF-8 piece: its old pieces are bytes, not text
            continue
        pieces = a.encode(text)
        torch.testing.assert_close(new[i], old[pieces].mean(0), atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= ADD // 3  # the rest are partial UTF-8 pieces (the steps toward whole characters)
    cfg = json.loads((ext / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == b.vocab_size and cfg["tokenizer_extension"]["added"] == ADD


def test_english_loss_unchanged_at_step_0_and_chinese_training_starts_sensibly(dirs, one_thread):
    from lmforge.tokenizer.core import load_tokenizer

    base, ext, _ = dirs
    ta, tb = load_tokenizer(base), load_tokenizer(ext)
    ma, mb = load_model_dir(base), load_model_dir(ext)
    english = EN.read_text(encoding="utf-8")[-20_000:]
    ids = ta.encode(english)
    assert ids == tb.encode(english)
    la, lb = _nll(ma, ids), _nll(mb, ids)
    assert abs(lb - la) < 0.02 and abs(lb - la) / la < 0.005, (la, lb)
    # Chinese: in bits per character (token counts differ), the extended model starts below the base
    zh = "\n".join(_held_out_zh(200))
    za, zb = ta.encode(zh)[:2048], tb.encode(zh)[:2048]
    bpc = [_nll(m, z) * len(z) / len(t.decode(z)) / math.log(2) for m, z, t in ((ma, za, ta), (mb, zb, tb))]
    assert bpc[1] < bpc[0], bpc
    # and continued pretraining on Chinese brings the per-token loss down fast from there
    train_zh = torch.tensor(tb.encode("\n".join(ZH.read_text(encoding="utf-8").splitlines()[:3000])))
    start = _nll(mb, zb)
    mb.train()
    _train(mb, train_zh, 40, lr=3e-3)
    assert _nll(mb, zb) < start - 2.0


def test_untied_head_grows_too(tmp_path):
    from lmforge.artifacts.vocab import extend_model_dir
    from lmforge.tokenizer.core import load_tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "en.txt").write_text(EN.read_text(encoding="utf-8")[:50_000])
    tok = train_tokenizer([str(tmp_path / "en.txt")], 400, tmp_path / "tok", progress=False)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size + 8, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                     ffn_hidden=64, tie_embeddings=False)  # 8 padded rows beyond the tokenizer
    save_model_dir(build_model(cfg, seed=1), tmp_path / "base", tokenizer_dir=str(tmp_path / "tok"))
    r = extend_model_dir(tmp_path / "base", [str(ZH)], 40, tmp_path / "ext", max_bytes=60_000)
    b = load_tokenizer(tmp_path / "ext")
    m = load_model_dir(tmp_path / "ext")
    assert r["first_new_id"] == tok.vocab_size and m.cfg.vocab_size == tok.vocab_size + 40
    old = load_weights(tmp_path / "base")["output.weight"]
    i = next(i for i in range(tok.vocab_size, b.vocab_size) if "\ufffd" not in b.decode([i]))
    torch.testing.assert_close(m.output.weight[i].detach(), old[tok.encode(b.decode([i]))].mean(0))


def test_wordpiece_base_and_bad_arguments_are_clear_errors(tmp_path):
    from tokenizers import BertWordPieceTokenizer

    from lmforge.artifacts.vocab import extend_model_dir

    wp = BertWordPieceTokenizer()
    wp.train_from_iterator(["some english words here"] * 5, vocab_size=60)
    cfg = get_preset("tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64)
    save_model_dir(build_model(cfg, seed=0), tmp_path / "wp")
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    with pytest.raises(UserError, match="needs a BPE tokenizer; this one is WordPiece"):
        extend_model_dir(tmp_path / "wp", [str(ZH)], 10, tmp_path / "out", max_bytes=10_000)
    r = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "extend", "--base", str(tmp_path / "wp"),
                        "--input", str(ZH), "--add", "0", "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --add 0 must be positive"]
