"""A weighted data.train list for fine-tuning (SFT / DPO / classify): `{path, weight}` entries up- or
down-sample a file's examples per epoch, after the dev split (the same dev examples as unweighted)."""

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.epochs import weight_examples
from lmforge.data.sft import load_sft_examples
from lmforge.tasks.config import TrainFile, config_from_dict
from lmforge.tasks.finetuning import read_train_dev
from tests.unit.test_finetune import keep_torch_threads, model_dir, sft_cfg, sft_file  # noqa: F401 (fixtures)


def cfg(train, **data):
    return config_from_dict({"model": {"from": "runs/x/model"}, "data": {"train": train, **data},
                             "train": {"max_steps": 10}, "eval": {"keep_best": False}})


def test_entries_may_be_paths_or_weighted_files():
    c = cfg(["a.jsonl", {"path": "b.jsonl", "weight": 2.5}])
    assert c.data.train_files() == [("a.jsonl", 1.0), ("b.jsonl", 2.5)] and c.data.weighted
    assert isinstance(c.data.train[1], TrainFile) and c.data.train_paths() == ["a.jsonl", "b.jsonl"]
    assert not cfg(["a.jsonl", {"path": "b.jsonl"}]).data.weighted


@pytest.mark.parametrize("train,match", [
    ([{"path": "a.jsonl", "weight": -1}], "data.train\\[0\\].weight=-1.0 must be a finite number >= 0"),
    ([{"path": "a.jsonl", "weight": 0}], "every weight is 0"),
    ([{"weight": 2}], "data.train\\[0\\] has no path"),
    ([{"path": "a.jsonl", "wieght": 2}], "data.train\\[0\\]"),
])
def test_errors(train, match):
    with pytest.raises(ConfigError, match=match):
        cfg(train)


def test_weight_examples_copies_and_seeded_subsets():
    a, b, c = list(range(10)), list(range(100, 110)), list(range(200, 204))
    out = weight_examples([a, b, c], [2.0, 0.5, 1.25], seed=3)
    assert out[:20] == a + a  # twice each
    half = out[20:25]
    assert len(half) == 5 and len(set(half)) == 5 and set(half) <= set(b)  # a seeded half, no repeats
    assert out[25:29] == c and len(out) == 30 and out[29] in c  # 1.25 × 4 = 5: all + one more
    assert weight_examples([a, b, c], [2.0, 0.5, 1.25], seed=3) == out  # deterministic
    assert weight_examples([a, b, c], [2.0, 0.5, 1.25], seed=4)[20:25] != half  # seeded


def test_read_train_dev_holds_out_the_unweighted_dev_then_weights(tmp_path):
    files = []
    for name, n in (("a", 30), ("b", 10)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"instruction": f"{name}{i}", "input": "", "output": "ok"}) + "\n"
                             for i in range(n)))
        files.append(str(p))

    def read(paths, cap):
        return load_sft_examples(paths, "alpaca", {}, cap)

    plain = cfg(files, dev_fraction=0.1).data
    weighted = cfg([files[0], {"path": files[1], "weight": 3}], dev_fraction=0.1).data
    train0, dev0 = read_train_dev(read, plain, seed=1)
    train, dev = read_train_dev(read, weighted, seed=1)
    key = json.dumps
    assert [key(e, sort_keys=True, default=str) for e in dev] == [key(e, sort_keys=True, default=str) for e in dev0]
    b_kept = sum(1 for e in train0 if "b" in json.dumps(e, default=str))
    assert len(train) == len(train0) + 2 * b_kept  # b's kept examples three times
    capped = cfg([files[0], {"path": files[1], "weight": 2}], max_train_examples=35, dev_fraction=0.0).data
    train, _ = read_train_dev(read, capped, seed=1)
    assert len(train) == 30 + 2 * 5  # the cap reads the first 35 examples of the files, then b's 5 twice



def test_a_weighted_sft_run_trains_and_its_resume_checks_the_weights(model_dir, sft_file, tmp_path):  # noqa: F811
    from lmforge.tasks.run import run as finetune
    from lmforge.train.checkpoint import latest_checkpoint, read_meta

    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"instruction": f"Say yes {i}.", "input": "", "output": "Yes."}) + "\n"
                             for i in range(8)))
    run_dir = tmp_path / "run"
    train = [str(sft_file), {"path": str(extra), "weight": 2.0}]
    res = finetune(sft_cfg(model_dir, sft_file, run_dir, data={"train": train}))
    assert res.train.step == 6 and res.train.stop_reason == "max_steps"
    meta = read_meta(latest_checkpoint(run_dir / "checkpoints"))
    assert meta["math"]["data.train_weights"] == [1.0, 2.0]
    other = [str(sft_file), {"path": str(extra), "weight": 3.0}]
    with pytest.raises(ConfigError, match="data.train_weights"):
        finetune(sft_cfg(model_dir, sft_file, run_dir, data={"train": other}, train={"max_steps": 8}))


def test_weighted_preference_pairs(tmp_path):
    from lmforge.data.preference_pairs import load_pairs

    files = []
    for name, n in (("a", 12), ("b", 6)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"{name} {i}?", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(n)))
        files.append(str(p))
    d = cfg([{"path": files[0], "weight": 0.5}, {"path": files[1], "weight": 2}], dev_fraction=0.0,
            format="auto").data
    train, dev = read_train_dev(load_pairs, d, seed=0)
    where = [p.where for p in train]
    assert not dev and len(train) == 6 + 12
    a_rows = [w for w in where if w.startswith(files[0])]
    assert len(a_rows) == 6 and len(set(a_rows)) == 6  # a seeded half of a's pairs
    assert sum(w.startswith(files[1]) for w in where) == 12  # b's pairs twice
