"""Metrics against hand-computed values and the figures sacrebleu publishes."""

import math

import pytest

from lmforge.eval.classification import classification_scores, confusion_matrix
from lmforge.eval.qa import exact_match, normalize_answer, qa_scores, token_f1
from lmforge.eval.rouge import lcs_length, rouge, rouge_scores, rouge_tokens
from lmforge.eval.text import cjk_fraction, mixed_tokens
from lmforge.eval.translation import bleu_tokenizer_for, translation_scores


# ---- QA -----------------------------------------------------------------------------------------
def test_squad_normalization():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("《北京》。") == "北京"
    # non-ASCII punctuation that the official SQuAD script keeps stays (en dash)
    assert normalize_answer("24–10") == "24–10"


def test_exact_match_and_f1_english():
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # pred 3 tokens, gold 2, 2 shared: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens are clipped: pred "broncos broncos" vs "broncos": P = 1/2, R = 1 -> 2/3
    assert token_f1("Broncos Broncos", "Broncos") == pytest.approx(2 / 3)
    assert token_f1("Carolina", "Denver Broncos") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "Denver") == 0.0  # "a" normalizes to nothing


def test_exact_match_and_f1_chinese_per_character():
    assert mixed_tokens("用 PyTorch训练") == ["用", "PyTorch", "训", "练"]
    assert exact_match("北京。", "北京") == 1.0
    assert exact_match("北京 ", " 北 京") == 1.0  # spacing between characters does not matter
    # 4 characters vs 2, 2 shared: P = 1/2, R = 1, F1 = 2/3
    assert token_f1("北京大学", "北京") == pytest.approx(2 / 3)
    assert token_f1("上海", "北京") == 0.0


def test_qa_corpus_scores_take_best_gold():
    preds = ["Denver Broncos", "Santa Clara, California", "1972"]
    golds = [["Denver Broncos", "The Broncos"], ["Levi's Stadium", "Santa Clara"], ["December 1972"]]
    s = qa_scores(preds, golds)
    # EM: 1, 0, 0.  F1: 1, max(0, 2*(2/3)*1/(2/3+1)=0.8), 2*1*(1/2)/(3/2)=2/3
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3) / 3)
    assert s["n"] == 3
    with pytest.raises(ValueError):
        qa_scores(["x"], [])


# ---- ROUGE --------------------------------------------------------------------------------------
def test_rouge_tokenizer():
    assert rouge_tokens("The cat's 2 hats!") == ["the", "cat", "s", "2", "hats"]
    assert rouge_tokens("猫在 mat上") == ["猫", "在", "mat", "上"]


def test_lcs_textbook_case():
    # CLRS 15.4: LCS(ABCBDAB, BDCABA) has length 4 (e.g. BCBA)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("abc")) == 0


def test_rouge_english_hand_computed():
    s = rouge("the cat was found under the bed", "the cat was under the bed")
    # unigrams: 6 of 7 predicted match, all 6 reference ones are recalled -> F1 = 12/13
    assert s["rouge1"]["precision"] == pytest.approx(6 / 7)
    assert s["rouge1"]["recall"] == pytest.approx(1.0)
    assert s["rouge1"]["f1"] == pytest.approx(12 / 13)
    # bigrams: 4 shared of 6 predicted / 5 reference -> F1 = 8/11
    assert s["rouge2"]["precision"] == pytest.approx(4 / 6)
    assert s["rouge2"]["recall"] == pytest.approx(4 / 5)
    assert s["rouge2"]["f1"] == pytest.approx(8 / 11)
    # LCS = "the cat was under the bed" = 6 tokens
    assert s["rougeL"]["f1"] == pytest.approx(12 / 13)


def test_rouge_l_differs_from_rouge1_on_reordering():
    s = rouge("bed the under was cat the", "the cat was under the bed")
    assert s["rouge1"]["f1"] == pytest.approx(1.0)
    assert s["rougeL"]["f1"] == pytest.approx(3 / 6)  # LCS e.g. "the under the" has length 3
    assert s["rouge2"]["f1"] == 0.0


def test_rouge_chinese_per_character():
    s = rouge("我喜欢吃苹果", "我爱吃苹果")
    # characters 6 vs 5, shared 我 吃 苹 果: P = 4/6, R = 4/5 -> F1 = 8/11
    assert s["rouge1"]["f1"] == pytest.approx(8 / 11)
    # bigrams 5 vs 4, shared 吃苹 苹果: P = 2/5, R = 2/4 -> F1 = 4/9
    assert s["rouge2"]["f1"] == pytest.approx(4 / 9)
    assert s["rougeL"]["f1"] == pytest.approx(8 / 11)


def test_rouge_corpus_best_reference_and_mean():
    s = rouge_scores(["the cat was found under the bed", "完全不同"],
                     [["a dog", "the cat was under the bed"], "我爱吃苹果"])
    assert s["rouge1"] == pytest.approx(100 * (12 / 13 + 0) / 2)
    assert s["rouge2"] == pytest.approx(100 * (8 / 11) / 2)
    assert s["rougeL"] == pytest.approx(100 * (12 / 13) / 2)


# ---- translation --------------------------------------------------------------------------------
def test_bleu_chrf_match_sacrebleu_published_example():
    # The example in sacrebleu's README: BLEU 48.53, chrF2 59.73, two reference streams.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs_streams = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
                    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    per_example = [list(r) for r in zip(*refs_streams)]
    s = translation_scores(hyps, per_example)
    assert s["bleu_tokenize"] == "13a"
    assert round(s["bleu"], 2) == 48.53 and round(s["chrf"], 2) == 59.73  # at the published precision


def test_bleu_hand_computed():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, no brevity penalty: BLEU = 100 * (1/5) ** (1/4)
    s = translation_scores(["a b c d e"], [["a b c d f"]])
    assert s["bleu"] == pytest.approx(100 * 0.2 ** 0.25)
    assert translation_scores(["same words here ok"], ["same words here ok"])["bleu"] == pytest.approx(100.0)


def test_chinese_targets_use_zh_tokenizer_and_variable_references():
    import sacrebleu

    # zh: every CJK character (and full-width punctuation) is a token. Hand counts:
    #   我喜欢吃苹果。 vs 我爱吃苹果。: 1..4-gram matches 5/7, 3/6, 2/5, 1/4; 7 > 6 tokens so no brevity penalty
    s = translation_scores(["我喜欢吃苹果。"], [["我爱吃苹果。"]])
    assert s["bleu_tokenize"] == "zh"
    assert s["bleu"] == pytest.approx(100 * (5 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # a second reference counts where it matches: 我去了学校。 is the second reference word for word
    assert translation_scores(["我去了学校。"], [["他去学校了。", "我去了学校。"]])["bleu"] == pytest.approx(100.0)
    # corpus level, one example with one reference and one with two: matches 11/13, 8/11, 6/9, 4/7, BP = 1
    hyps = ["我喜欢吃苹果。", "我去了学校。"]
    refs = [["我爱吃苹果。"], ["他去学校了。", "我去了学校。"]]
    assert bleu_tokenizer_for(refs) == "zh"
    s = translation_scores(hyps, refs)
    assert s["bleu"] == pytest.approx(100 * (11 / 13 * 8 / 11 * 6 / 9 * 4 / 7) ** 0.25)
    # character tokenization matters: with 13a the unsegmented Chinese sentences barely match
    assert s["bleu"] > sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]], tokenize="13a").score
    assert cjk_fraction(["abc"]) == 0.0 and cjk_fraction(["中文"]) == 1.0


# ---- classification -----------------------------------------------------------------------------
def test_classification_hand_computed():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    s = classification_scores(golds, preds, labels=["a", "b", "c"])
    assert s["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert s["accuracy"] == pytest.approx(400 / 6)
    # per-class F1: a 0.8, b 0.5, c 2/3
    assert s["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert s["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert s["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)
    assert s["majority_baseline"] == pytest.approx(50.0)


def test_classification_class_never_predicted_counts_zero():
    s = classification_scores([0, 0, 1, 1], [0, 0, 0, 0], labels=[0, 1])
    assert s["accuracy"] == 50.0
    # class 0: P = 1/2, R = 1 -> 2/3; class 1: 0
    assert s["macro_f1"] == pytest.approx(100 * (2 / 3) / 2)
    with pytest.raises(ValueError, match="not one of"):
        confusion_matrix([0], [2], [0, 1])
    assert math.isclose(classification_scores([1], [1])["macro_f1"], 100.0)
