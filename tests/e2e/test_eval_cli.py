"""`lmforge eval` end to end on a tiny model dir: every task, --json, results file, errors, real data."""

import json

import pytest
import torch

from lmforge.cli import main

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "Question: what is two plus two? Answer: four. Passage: the cat sat on the mat.",
    "今天天气很好，我们去公园散步吧。你好，世界！机器学习很有趣。",
    "it 's a charming and often affecting journey . a bleak and desperate film .",
] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tokenizer):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    d = tmp_path_factory.mktemp("evalcli")
    make_tokenizer(d, CORPUS, name="tok")
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=128,
                      tie_embeddings=True)
    return save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))


def forced_model_dir(tok_dir, out, answer: str):
    """A model dir whose greedy continuation of ANY prompt is ``answer`` then EOS, by construction.

    Attention and FFN outputs are zero, so the last hidden state is RMSNorm(embedding of the last token).
    Ordinary tokens share a direction u; the answer's tokens a1..an get their own basis vectors e1..en.
    The LM head maps u -> a1, e_i -> a_(i+1), e_n -> EOS, every other row is zero — so greedy decoding
    walks the chain whatever the prompt was.
    """
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.chat_template import encode_text
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(tok_dir)
    chain = encode_text(tok, answer)
    assert tok.decode(chain) == answer and len(set(chain)) == len(chain) and tok.eos_id not in chain
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=1, n_heads=4, ffn_hidden=128, max_seq_len=128,
                      tie_embeddings=False, norm="rmsnorm")
    model = build_model(cfg, seed=0)
    dim, n = cfg.dim, len(chain)
    basis = torch.eye(dim)  # u = basis[0], e_i = basis[i]
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        noise = torch.randn(cfg.vocab_size, dim, generator=torch.Generator().manual_seed(0)) * 0.3
        noise[:, : n + 1] = 0  # orthogonal to u and every e_i
        model.tok_embeddings.weight.copy_(3 * basis[0] + noise)
        for i, t in enumerate(chain):
            model.tok_embeddings.weight[t] = basis[i + 1]
        model.output.weight.zero_()
        model.output.weight[chain[0]] = 10 * basis[0]
        for i in range(1, n):
            model.output.weight[chain[i]] = 10 * basis[i]
        model.output.weight[tok.eos_id] = 10 * basis[n]
    return save_model_dir(model, out, tokenizer_dir=str(tok_dir))


@pytest.fixture(scope="module")
def forced(model_dir, tmp_path_factory):
    """answer text -> a model dir that answers every prompt with it."""
    d = tmp_path_factory.mktemp("forced")
    made = {}

    def make(answer: str):
        if answer not in made:
            made[answer] = forced_model_dir(model_dir, d / f"m{len(made)}", answer)
        return made[answer]

    return make


def run_json(capsys, *argv):
    rc = main(["eval", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # --json: one object on stdout, progress and table on stderr
    return json.loads(lines[0]), err


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_ppl(model_dir, tmp_path, capsys):
    data = write(tmp_path / "t.jsonl", '{"text": "The quick brown fox."}\n{"text": "你好，世界！"}\n')
    res, err = run_json(capsys, "--model", model_dir, "--task", "ppl", "--data", data, "--out", tmp_path / "r.json")
    m = res["metrics"]
    assert m["documents"] == 2 and m["bytes"] == len(b"The quick brown fox.") + len("你好，世界！".encode())
    # a random model is about as unsure as its vocabulary is large
    assert 100 < m["perplexity"] < 2000 and m["bits_per_byte"] > 1
    assert "perplexity" in err and "bits_per_byte" in err  # the table
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == m


def test_generation_tasks_and_determinism(model_dir, tmp_path, capsys):
    qa = write(tmp_path / "qa.jsonl", '{"question": "what is two plus two?", "answer": ["four", "4"]}\n'
                                     '{"question": "who?", "context": "the cat sat", "answers": "cat"}\n')
    summ = write(tmp_path / "s.jsonl", json.dumps({"source": ["The cat sat.", "It was happy."],
                                                   "target": ["A cat sat."]}) + "\n")
    tr = write(tmp_path / "t.tsv", "Hello.\t你好。\tCC\nHello.\t您好。\tCC\nThe dog.\t狗。\tCC\n")
    for task, data, keys in [("qa", qa, ("exact_match", "f1")), ("summarize", summ, ("rouge1", "rouge2", "rougeL")),
                             ("translate", tr, ("bleu", "chrf"))]:
        out = tmp_path / f"{task}.json"
        res, _ = run_json(capsys, "--model", model_dir, "--task", task, "--data", data, "--max-new-tokens", 5,
                          "--batch-size", 2, "--out", out)
        assert set(keys) <= set(res["metrics"])
        full = json.loads(out.read_text())
        assert len(full["predictions"]) == res["metrics"]["n"]
        run_json(capsys, "--model", model_dir, "--task", task, "--data", data, "--max-new-tokens", 5,
                            "--batch-size", 1, "--out", tmp_path / "again.json")
        assert [p["raw"] for p in json.loads((tmp_path / "again.json").read_text())["predictions"]] == \
            [p["raw"] for p in full["predictions"]]
    assert full["settings"]["tgt_lang"] == "zh" and full["metrics"]["bleu_tokenize"] == "zh"
    assert full["predictions"][0]["references"] == ["你好。", "您好。"]


def test_generation_metrics_are_exact_when_the_answer_is_known(forced, tmp_path, capsys):
    """Models whose greedy answer is fixed, scored through the CLI against hand-computed values."""
    qa = write(tmp_path / "qa.jsonl", '{"question": "what sat?", "answer": ["cat"]}\n'
                                     '{"question": "what ran?", "answer": ["a black dog"]}\n'
                                     '{"question": "who?", "context": "the cat sat", "answers": "cat sat"}\n')
    res, _ = run_json(capsys, "--model", forced("the cat"), "--task", "qa", "--data", qa, "--out", tmp_path / "q.json")
    assert [p["prediction"] for p in json.loads((tmp_path / "q.json").read_text())["predictions"]] == ["the cat"] * 3
    m = res["metrics"]
    # "the cat" normalizes to [cat]: EM 1, 0, 0; F1 1, 0, 2·(1·½)/(1+½) = ⅔
    assert m["exact_match"] == pytest.approx(100 / 3) and m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["n"] == 3 and m["empty_predictions"] == 0

    summ = write(tmp_path / "s.jsonl", json.dumps({"source": ["The cat sat on the mat."],
                                                   "target": ["The cat sat on the mat."]}) + "\n")
    res, _ = run_json(capsys, "--model", forced("the cat sat"), "--task", "summarize", "--data", summ)
    m = res["metrics"]
    # 3 predicted tokens, 6 reference tokens: ROUGE-1 and -L P=1, R=½ -> F=⅔; ROUGE-2 2/2 of 5 bigrams -> F=4/7
    assert m["rouge1"] == pytest.approx(200 / 3) and m["rougeL"] == pytest.approx(200 / 3)
    assert m["rouge2"] == pytest.approx(400 / 7)
    tsv = write(tmp_path / "s.tsv", "document\tsummary\nThe cat sat on the mat.\tThe cat sat on the mat.\n")
    res, _ = run_json(capsys, "--model", forced("the cat sat"), "--task", "summarize", "--data", tsv)
    assert res["metrics"]["rouge1"] == pytest.approx(200 / 3)  # the same example from a TSV

    tr = write(tmp_path / "t.tsv", "Hello, world!\t你好，世界！\tCC\nThe dog.\t狗。\tCC\n")
    res, _ = run_json(capsys, "--model", forced("你好，世界！"), "--task", "translate", "--data", tr)
    m = res["metrics"]
    # zh tokens: 6 + 6 predicted, 6 + 2 reference; n-gram matches 6/12, 5/10, 4/8, 3/6 -> all ½; BP = 1
    assert m["bleu_tokenize"] == "zh" and m["bleu"] == pytest.approx(50.0)


def test_classify_zero_shot_and_head(model_dir, tmp_path, capsys):
    from lmforge.artifacts.classifier_dir import save_classifier_dir
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.data.labelled import encode_labelled, load_labelled
    from lmforge.models.classifier import SequenceClassifier
    from lmforge.tokenizer.core import load_tokenizer

    data = write(tmp_path / "d.tsv", "sentence\tlabel\na charming journey .\t1\nbleak and desperate\t0\n"
                                     "how are you\t1\nthe lazy dog\t0\nhello there\t1\n")
    res, err = run_json(capsys, "--model", model_dir, "--task", "classify", "--data", data,
                        "--label-words", "bad,good", "--out", tmp_path / "z.json")
    m = res["metrics"]
    assert res["mode"] == "zero-shot" and m["labels"] == ["0", "1"] and m["n"] == 5
    assert sum(map(sum, m["confusion_matrix"])) == 5
    assert "confusion (rows = gold" in err

    torch.manual_seed(0)
    clf = SequenceClassifier(load_model_dir(model_dir), 2, "last").eval()
    clf_dir = save_classifier_dir(clf, tmp_path / "clf", ["0", "1"], tokenizer_dir=str(model_dir))
    res, _ = run_json(capsys, "--model", clf_dir, "--task", "classify", "--data", data, "--batch-size", 2)
    assert res["mode"] == "head"
    tok = load_tokenizer(clf_dir)
    ids, golds = encode_labelled(tok, load_labelled(data), ["0", "1"], 128)
    with torch.no_grad():
        preds = [int(clf(torch.tensor([x])).argmax(-1)) for x in ids]
    want = 100 * sum(p == g for p, g in zip(preds, golds)) / len(golds)
    assert res["metrics"]["accuracy"] == pytest.approx(want)
    assert (clf_dir / "eval" / "classify-d.json").is_file()  # default results path: MODEL/eval/TASK-DATA.json


@pytest.mark.parametrize("argv, message", [
    (["--task", "ppl", "--data", "MISSING"], "data file 'MISSING' does not exist"),
    (["--task", "qa", "--data", "BAD"], r"bad\.jsonl:2: a QA record needs"),
    (["--task", "classify", "--data", "TSV", "--label-words", "a,b,c"], "--label-words has 3 words for 2 labels"),
    (["--task", "qa", "--data", "BAD", "--batch-size", "0"], "--batch-size=0 must be positive"),
    (["--task", "translate", "--data", "TSV", "--max-new-tokens", "125"], "leaves no room for a prompt"),
    (["--task", "qa", "--data", "GOOD", "--prompt", "{nope}"], r"prompt template uses \{nope\}"),
])
def test_errors_are_one_line(model_dir, tmp_path, capsys, argv, message):
    files = {"BAD": write(tmp_path / "bad.jsonl", '{"question": "q", "answer": "a"}\n{"x": 1}\n'),
             "GOOD": write(tmp_path / "good.jsonl", '{"question": "q", "answer": "a"}\n'),
             "TSV": write(tmp_path / "d.tsv", "text\tlabel\na\t0\nb\t1\n")}
    argv = [str(files.get(a, a)) for a in argv]
    rc = main(["eval", "--model", str(model_dir), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ")
    assert __import__("re").search(message, err[-1]), err[-1]


def test_missing_model_dir(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", "ppl", "--data", __file__]) == 2
    assert "model dir" in capsys.readouterr().err


def test_real_data_end_to_end(model_dir, forced, real_data, tmp_path, capsys):
    """Tatoeba en->zh, SciTLDR, SQuAD, NQ-Open and sentence polarity through the CLI: the readers, prompts,
    generation and metrics run on the real files, scored exactly with a model whose answer is known."""
    answer = forced("the cat")
    cases = [
        ("translate", real_data / "translation_en_zh_tatoeba" / "cmn.txt", "bleu"),
        ("summarize", real_data / "summarization_en_scitldr" / "test.jsonl", "rougeL"),
        ("qa", real_data / "qa_en_squad_v1.1_dev" / "squad_v1.1_dev_reconstructed.json", "f1"),
        ("qa", real_data / "qa_en_nq_open" / "NQ-open.dev.jsonl", "exact_match"),
    ]
    for task, data, key in cases:
        out = tmp_path / f"{task}-{data.stem}.json"
        res, _ = run_json(capsys, "--model", answer, "--task", task, "--data", data, "--max-examples", 3,
                          "--subset", "spread", "--max-new-tokens", 4, "--out", out)
        preds = json.loads(out.read_text())["predictions"]
        assert res["metrics"]["n"] == 3 and [p["prediction"] for p in preds] == ["the cat"] * 3
        if task == "qa":  # no gold answer of these questions is "cat"
            assert all("cat" not in " ".join(p["references"]).lower().split() for p in preds)
            assert res["metrics"]["exact_match"] == 0.0
    res, _ = run_json(capsys, "--model", model_dir, "--task", "classify", "--data",
                      real_data / "sentiment_en_rt_polarity" / "rt_polarity.tsv", "--max-examples", 8,
                      "--label-words", "negative,positive", "--out", tmp_path / "c.json")
    assert res["metrics"]["n"] == 8 and sum(map(sum, res["metrics"]["confusion_matrix"])) == 8


def test_lora_adapter_dir_scores_like_the_merged_model(model_dir, tmp_path, capsys):
    """RUN/adapter (base + unmerged LoRA) and RUN/model (merged) of one `lmforge finetune` run agree."""
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"instruction": "Say hello.", "input": "", "output": "Hello there."},
        {"instruction": "What is two plus two?", "input": "", "output": "Four."},
        {"instruction": "Greet in Chinese.", "input": "", "output": "你好，世界！"},
        {"instruction": "Name a fox.", "input": "", "output": "The quick brown fox."}]))
    cfg = write(tmp_path / "lora.yaml", f"""
run: {{dir: {tmp_path / 'run'}}}
model: {{from: {model_dir}}}
finetune: {{mode: lora}}
lora: {{rank: 4, alpha: 8, targets: [wq, wv]}}
data: {{train: [{train}], dev_fraction: 0.0, seq_len: 64, batching: shuffle}}
train: {{global_batch: 2, micro_batch: 2, max_steps: 3, device: cpu}}
optim: {{lr: 0.05}}
eval: {{interval: 0, batches: 0}}
checkpoint: {{interval: 0}}
""")
    assert main(["finetune", "--config", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ppl = {}
    for name, path in (("model", tmp_path / "run" / "model"), ("adapter", tmp_path / "run" / "adapter"),
                       ("base", model_dir)):
        res, _ = run_json(capsys, "--model", path, "--task", "ppl", "--data", train,
                          "--text-field", "output", "--out", tmp_path / f"{name}.json")
        ppl[name] = res["metrics"]["perplexity"]
    assert ppl["adapter"] == pytest.approx(ppl["model"], rel=1e-4)
    assert ppl["adapter"] != pytest.approx(ppl["base"], rel=1e-3)  # the adapters did change the model
    res, _ = run_json(capsys, "--model", tmp_path / "run" / "adapter", "--task", "qa", "--data",
                      write(tmp_path / "qa.jsonl", '{"question": "Say hello.", "answer": "Hello there."}\n'),
                      "--max-new-tokens", 4, "--out", tmp_path / "qa.json")
    assert res["metrics"]["n"] == 1
