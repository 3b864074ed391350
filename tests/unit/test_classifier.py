import torch

from lmforge.artifacts.classifier_dir import load_classifier_dir, save_classifier_dir
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model


def backbone(**kw):
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32, **kw)
    return build_model(cfg, seed=0)


def test_last_token_pooling_ignores_right_padding():
    clf = SequenceClassifier(backbone(), 3, "last").eval()
    x = torch.randint(1, 50, (1, 7))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(clf(padded, torch.tensor([7])), clf(x), atol=1e-5, rtol=1e-5)


def test_mean_pooling_encoder_masks_padding():
    clf = SequenceClassifier(backbone(causal=False, pos_encoding="learned"), 2, "mean").eval()
    x = torch.randint(1, 50, (1, 6))
    padded = torch.cat([x, torch.full((1, 3), 7)], 1)
    torch.testing.assert_close(clf(padded, torch.tensor([6])), clf(x), atol=1e-5, rtol=1e-5)


def test_classifier_dir_round_trip(tmp_path):
    clf = SequenceClassifier(backbone(tie_embeddings=True), 2, "last").eval()
    x = torch.randint(0, 50, (3, 9))
    save_classifier_dir(clf, tmp_path / "clf", ["neg", "pos"])
    loaded, labels = load_classifier_dir(tmp_path / "clf")
    assert labels == ["neg", "pos"]
    torch.testing.assert_close(loaded.eval()(x), clf(x))
