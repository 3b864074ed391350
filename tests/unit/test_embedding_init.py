"""Token embeddings initialized from word2vec / GloVe / fastText text vectors."""

import gzip

import pytest
import torch

from lmforge.config import UserError
from lmforge.models.embedding_init import init_embeddings_from, iter_word_vectors, token_surfaces
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model

CORPUS = ("the king and the queen walked to the old castle. The King spoke; the queen listened. "
          "an apple a day keeps the doctor away. new york is a big city. ") * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text(CORPUS)
    return train_tokenizer([str(d / "c.txt")], 330, None, progress=False)


def _model(tok, dim=32, tied=True):
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, dim=dim, n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    return build_model(cfg, seed=0)


def _write(path, rows, header=False):
    lines = [f"{len(rows)} {len(next(iter(rows.values())))}"] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in rows.items()]
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_same_dim_rows_are_the_centred_vectors_rescaled(tok, tmp_path):
    g = torch.Generator().manual_seed(0)
    surf = token_surfaces(tok)
    words = sorted({s for s in surf if s and s.isalpha() and s.islower()})[:12]
    assert len(words) >= 8
    vecs = {w: torch.randn(32, generator=g) for w in words}
    vecs["zzz-not-a-token"] = torch.randn(32, generator=g)
    path = _write(tmp_path / "glove.txt", vecs)
    model = _model(tok)
    before = model.tok_embeddings.weight.detach().clone()
    rep = init_embeddings_from(model, tok, path)
    emb = model.tok_embeddings.weight.detach()
    changed = (emb != before).any(1)
    assert int(changed.sum()) == rep["matched"] and rep["projection"] == "none" and rep["vector_dim"] == 32
    assert rep["coverage"] == round(rep["matched"] / tok.vocab_size, 4)
    # each changed row is its word's vector (matched by exact or lower-cased spelling), centred over the
    # matched rows and scaled by one common factor to the embedding's std
    ids = changed.nonzero().flatten().tolist()
    src = torch.stack([torch.tensor([float(f"{x:.6f}") for x in vecs[surf[i].lower()]]) for i in ids]).double()
    centred = src - src.mean(0)
    rows = emb[ids].double()
    c = (rows * centred).sum() / (centred * centred).sum()
    torch.testing.assert_close(rows, c * centred, atol=1e-6, rtol=1e-5)
    assert abs(emb[ids].std().item() - before.std().item()) < 1e-3
    assert torch.equal(emb[~changed], before[~changed])  # unmatched rows keep their init
    assert model.output.weight is model.tok_embeddings.weight  # tied head shares the new rows


def test_exact_match_beats_lowercase_and_counts(tok, tmp_path):
    surf = token_surfaces(tok)
    assert "The" in surf and "the" in surf
    path = _write(tmp_path / "v.txt", {"the": [1.0] * 4 + [0.0] * 4, "The": [0.0] * 4 + [1.0] * 4,
                                       "KING": [0.5] * 8})
    model = _model(tok)
    rep = init_embeddings_from(model, tok, path)
    emb = model.tok_embeddings.weight.detach()
    the, The = surf.index("the"), surf.index("The")
    # different vectors → different rows; "King"/"king" reach KING only through lower-casing
    assert not torch.allclose(emb[the], emb[The])
    assert rep["exact"] >= 2 and rep["lowercase"] >= 1
    assert rep["projection"] == "random"  # 8 < 32: an isometry into the model's width


def test_pca_projection_keeps_geometry_when_vectors_are_wider(tok, tmp_path):
    surf = [s for s in token_surfaces(tok) if s]
    g = torch.Generator().manual_seed(1)
    words = list(dict.fromkeys(s.strip() for s in surf))[:120]
    low = torch.randn(len(words), 16, generator=g) @ torch.randn(16, 64, generator=g)  # rank-16 in 64 dims
    path = _write(tmp_path / "wide.vec", {w: low[i] for i, w in enumerate(words)}, header=True)
    model = _model(tok)
    rep = init_embeddings_from(model, tok, path)
    assert rep["projection"] == "pca" and rep["vector_dim"] == 64 and rep["matched"] >= 32
    emb = model.tok_embeddings.weight.detach().double()
    ids = [surf_i for surf_i, s in enumerate(token_surfaces(tok)) if s in words and s == s.strip()][:20]
    src = torch.stack([low[words.index(token_surfaces(tok)[i])] for i in ids]).double()
    rows = emb[ids]
    # a rank-16 cloud survives PCA to 32 dims exactly: distances scale by one common factor
    d_src = torch.cdist(src, src)
    d_rows = torch.cdist(rows, rows)
    ratio = d_rows[d_src > 0] / d_src[d_src > 0]
    assert (ratio.max() - ratio.min()) / ratio.mean() < 1e-3


def test_header_gzip_and_errors(tok, tmp_path):
    path = _write(tmp_path / "w2v.txt.gz", {"king": [0.1, 0.2, 0.3], "new york": [0.3, 0.2, 0.1]}, header=True)
    words = dict(iter_word_vectors(path))
    assert set(words) == {"king", "new york"} and len(words["king"]) == 3
    with pytest.raises(UserError, match="does not exist"):
        init_embeddings_from(_model(tok), tok, tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("king 0.1 0.2 0.3\nqueen 0.5\n")
    with pytest.raises(UserError, match="bad.txt:2: expected a word and 3 numbers"):
        init_embeddings_from(_model(tok), tok, tmp_path / "bad.txt")
