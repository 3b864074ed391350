"""prepare: formats, cleaning counts, dedup, split, determinism across workers, bad input, loader round trip."""

import bz2
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import UserError
from lmforge.data.loader import ShardLoader
from lmforge.data.prepare import prepare
from lmforge.data.shards import read_index, verify_shards
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer
from tests.conftest import TEST_DATA

SHAKESPEARE = TEST_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(SHAKESPEARE), str(TEST_DATA / "chinese_poetry" / "classics" / "lunyu.json")], 1024,
                    out, text_field="paragraphs", progress=False)
    return out


@pytest.fixture(scope="module")
def passages():
    """Real, distinct passages of Shakespeare (blank-line-separated speeches of some length)."""
    blocks = [b for b in SHAKESPEARE.read_text().split("\n\n") if len(b) > 300]
    return blocks[:60]


def read_stream(out, split="train"):
    index = read_index(out)
    arrays = [np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def docs_of(out, tok, split="train"):
    stream = read_stream(out, split).tolist()
    docs, cur = [], []
    for t in stream:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur  # every document ends with EOS
    return docs


def test_text_per_file_round_trip(tmp_path, tok_dir, passages):
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(passages[:5]):
        (src / f"doc{i}.txt").write_text(p)
    (src / "notes.bin").write_bytes(b"\x00\x01")  # not a text extension: skipped in a dir
    tok = load_tokenizer(tok_dir)
    report = prepare([str(src)], tok_dir, tmp_path / "out", progress=False)
    assert report["files"] == 5 and report["skipped_files"] == 1 and report["documents_kept"] == 5
    assert docs_of(tmp_path / "out", tok) == passages[:5]
    index = verify_shards(tmp_path / "out")
    assert index["tokenizer_hash"] == tok.hash and index["dtype"] == "uint16" and index["eos_id"] == tok.eos_id
    assert index["splits"]["train"]["tokens"] == sum(len(tok.encode(p)) + 1 for p in passages[:5])
    assert index["cleaning"]["documents_kept"] == 5
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)
    # include patterns pick files inside dirs (e.g. source code only, not its JSON test data)
    (src / "pkg").mkdir()
    (src / "pkg" / "mod.py").write_text("def main():\n    return 42  # the answer\n")
    (src / "pkg" / "data.json").write_text('{"no_text_field": 1}')
    r = prepare([str(src)], tok_dir, tmp_path / "py", include="*.py", progress=False)
    assert r["files"] == 1 and r["skipped_files"] == 7
    assert docs_of(tmp_path / "py", tok) == ["def main():\n    return 42  # the answer\n"]


def test_cleaning_counts_dedup_short_pii_utf8(tmp_path, tok_dir, passages):
    a, b, c = passages[:3]
    rows = [a, a.upper().replace("\n", "  \n "), b, "short", "   ", c + "\nwrite to jane.roe@example.org or 555-867-5309"]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait, " + passages[3].encode() + b" \xff\xfe end")
    tok = load_tokenizer(tok_dir)
    r = prepare([str(f), str(bad)], tok_dir, tmp_path / "out", pii=True, progress=False)
    assert r["documents_read"] == 7 and r["removed_exact_duplicates"] == 1 and r["removed_short"] == 1
    assert r["removed_empty"] == 1 and r["pii_emails"] == 1 and r["pii_phones"] == 1
    assert r["invalid_utf8_documents"] == 1 and r["replaced_chars"] == 3 and r["documents_kept"] == 4
    docs = docs_of(tmp_path / "out", tok)
    assert docs[-2].endswith("write to [EMAIL] or [PHONE]")
    assert docs[-1].startswith("caf\ufffd au lait") and "\ufffd\ufffd end" in docs[-1]
    # no dedup keeps the case variant
    r2 = prepare([str(f)], tok_dir, tmp_path / "out2", dedup="none", progress=False)
    assert r2["documents_kept"] == 4 and r2["removed_exact_duplicates"] == 0


def test_near_dedup(tmp_path, tok_dir, passages):
    base = "\n\n".join(passages[10:16])
    edited = base.replace(" the ", " thy ", 3).replace("you", "thou", 2)
    other = "\n\n".join(passages[20:26])
    f = tmp_path / "n.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in (base, edited, other)))
    exact = prepare([str(f)], tok_dir, tmp_path / "e", dedup="exact", progress=False)
    near = prepare([str(f)], tok_dir, tmp_path / "n", dedup="near", progress=False)
    assert exact["documents_kept"] == 3 and exact["removed_near_duplicates"] == 0
    assert near["documents_kept"] == 2 and near["removed_near_duplicates"] == 1


def test_val_split_by_document_is_seeded(tmp_path, tok_dir, passages):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    tok = load_tokenizer(tok_dir)
    r = prepare([str(f)], tok_dir, tmp_path / "a", val_fraction=0.3, seed=1, progress=False)
    train, val = docs_of(tmp_path / "a", tok), docs_of(tmp_path / "a", tok, "val")
    assert r["val_documents"] == len(val) > 5 and r["train_documents"] == len(train) > 25
    assert sorted(train + val) == sorted(passages) and not set(train) & set(val)
    prepare([str(f)], tok_dir, tmp_path / "b", val_fraction=0.3, seed=1, progress=False)
    assert docs_of(tmp_path / "b", tok, "val") == val
    prepare([str(f)], tok_dir, tmp_path / "c", val_fraction=0.3, seed=2, progress=False)
    assert docs_of(tmp_path / "c", tok, "val") != val


@pytest.mark.slow
def test_workers_give_byte_identical_shards(tmp_path, tok_dir):
    inputs = [str(TEST_DATA / "english_corpus" / "nltk_inaugural"),
              str(TEST_DATA / "english_corpus" / "llamafactory_pretrain_demo" / "c4_demo.jsonl")]
    kw = dict(val_fraction=0.1, dedup="near", progress=False, shard_tokens=10_000)
    r1 = prepare(inputs, tok_dir, tmp_path / "w1", workers=1, **kw)
    r2 = prepare(inputs, tok_dir, tmp_path / "w2", workers=2, **kw)
    i1, i2 = read_index(tmp_path / "w1"), read_index(tmp_path / "w2")
    assert i1["splits"] == i2["splits"] and len(i1["splits"]["train"]["shards"]) > 3
    for s in i1["splits"]["train"]["shards"] + i1["splits"]["val"]["shards"]:
        assert (tmp_path / "w1" / s["file"]).read_bytes() == (tmp_path / "w2" / s["file"]).read_bytes()
    assert r1["documents_kept"] == r2["documents_kept"] == r1["documents_read"] - r1["removed_exact_duplicates"] \
        - r1["removed_near_duplicates"] - r1["removed_short"] - r1["removed_empty"]


def test_formats_memory_fs_gz_zst_bz2_parquet_json_txt_modes(tmp_path, tok_dir, passages):
    import fsspec
    import zstandard

    tok = load_tokenizer(tok_dir)
    p = passages
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(f"{p[0]}\n\n{p[1]}\n".encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"body": p[2]}) + "\n").encode()))
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(f"{p[3]}".encode()))
    (tmp_path / "poems.json").write_text(json.dumps(
        [{"title": "t", "paragraphs": ["秦川雄帝宅，函谷壯皇居。", "綺殿千尋起，離宮百雉餘。"]},
         {"content": [{"title": "x", "content": ["关关雎鸠，在河之洲。窈窕淑女，君子好逑。"]}]}],
        ensure_ascii=False))
    with fsspec.open("memory://bucket/m.jsonl", "w") as f:
        f.write(json.dumps({"body": p[4]}) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": [p[5], p[6]]}), tmp_path / "d.parquet")
    r = prepare([str(tmp_path / "a.txt.gz"), str(tmp_path / "b.jsonl.zst"), str(tmp_path / "c.txt.bz2"),
                 "memory://bucket/m.jsonl", str(tmp_path / "d.parquet")], tok_dir, tmp_path / "o1",
                text_field="body", txt_mode="blank", progress=False)
    assert r["documents_kept"] == 7
    assert docs_of(tmp_path / "o1", tok) == p[:7]  # inputs in the given order, each file's documents in order
    r = prepare([str(tmp_path / "poems.json")], tok_dir, tmp_path / "o2", text_field="paragraphs,content",
                min_chars=1, progress=False)
    assert docs_of(tmp_path / "o2", tok) == ["秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。",
                                              "关关雎鸠，在河之洲。窈窕淑女，君子好逑。"]
    (tmp_path / "lines.txt").write_text("first line here\nsecond line here\n\nthird line here\n")
    prepare([str(tmp_path / "lines.txt")], tok_dir, tmp_path / "o3", txt_mode="line", min_chars=1, progress=False)
    assert docs_of(tmp_path / "o3", tok) == ["first line here", "second line here", "third line here"]


def test_bad_input_errors_leave_no_output(tmp_path, tok_dir):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": "a fine first document here"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"x\.jsonl:2 has no field 'text' \(fields: txt\)"):
        prepare([str(f)], tok_dir, out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
    with pytest.raises(UserError, match=r"x\.jsonl:2 has no field"):
        prepare([str(f)], tok_dir, out, workers=2, progress=False)
    assert not out.exists()
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(UserError, match=r"y\.jsonl:2 is not valid JSON"):
        prepare([str(tmp_path / "y.jsonl")], tok_dir, out, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], tok_dir, out, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare(["memory://no-such-bucket/data.jsonl"], tok_dir, out, progress=False)
    with pytest.raises(UserError, match="matches no file"):
        prepare([str(tmp_path / "*.parquet")], tok_dir, out, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text left"):
        prepare([str(tmp_path / "empty.txt")], tok_dir, out, progress=False)
    with pytest.raises(UserError, match="no input"):
        prepare([], tok_dir, out, progress=False)
    with pytest.raises(UserError, match="--dedup"):
        prepare([str(f)], tok_dir, out, dedup="fuzzy", progress=False)
    with pytest.raises(UserError, match="tokenizer"):
        prepare([str(f)], tmp_path / "no-tok", out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "gz.txt.gz").write_bytes(gzip.compress(b"some text " * 100)[:-20])
    with pytest.raises(UserError, match=r"gz\.txt\.gz' cannot be read"):
        prepare([str(tmp_path / "gz.txt.gz")], tok_dir, out, progress=False)


def test_existing_output_needs_overwrite(tmp_path, tok_dir, passages):
    f = tmp_path / "a.txt"
    f.write_text(passages[0])
    prepare([str(f)], tok_dir, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        prepare([str(f)], tok_dir, tmp_path / "out", progress=False)
    f.write_text(passages[1])
    prepare([str(f)], tok_dir, tmp_path / "out", overwrite=True, progress=False)
    assert docs_of(tmp_path / "out", load_tokenizer(tok_dir)) == [passages[1]]


def test_datasets_inputs_need_the_package(tmp_path, tok_dir):
    try:
        import datasets
    except ImportError:
        with pytest.raises(UserError, match="needs the `datasets` package"):
            prepare(["hf:some/dataset"], tok_dir, tmp_path / "o", progress=False)
        return
    ds = datasets.Dataset.from_dict({"text": ["a first document of text", "and another document"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    r = prepare([str(tmp_path / "ds")], tok_dir, tmp_path / "o", min_chars=1, progress=False)
    assert r["documents_kept"] == 2


def test_uint32_shards_for_large_vocab(tmp_path, tok_dir):
    from lmforge.tokenizer.core import HFTokenizer

    tok = load_tokenizer(tok_dir)
    backend = tok.backend
    backend.add_tokens([f"<x{i}>" for i in range(66_000)])
    big = HFTokenizer(backend, tok.bos_token, tok.eos_token, tok.pad_token)
    big.save(tmp_path / "big")
    assert big.vocab_size > 65_536
    (tmp_path / "t.txt").write_text("hello <x65999> world and more text")
    prepare([str(tmp_path / "t.txt")], tmp_path / "big", tmp_path / "o", progress=False)
    index = read_index(tmp_path / "o")
    assert index["dtype"] == "uint32"
    stream = read_stream(tmp_path / "o")
    assert big.token_to_id("<x65999>") in stream.tolist() and stream.max() > 65_535


def test_loader_reads_prepared_shards(tmp_path, tok_dir, passages):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    prepare([str(f)], tok_dir, tmp_path / "o", val_fraction=0.2, progress=False)
    tok = load_tokenizer(tok_dir)
    loader = ShardLoader(tmp_path / "o", seq_len=32, global_batch=4, check_vocab=tok.vocab_size,
                         tokenizer_hash=tok.hash, verify=True)
    batch = loader.next_batch()
    assert batch.shape == (4, 33) and int(batch.max()) < tok.vocab_size
    text = tok.decode(batch[0].tolist(), skip_special_tokens=False)
    assert any(text.split("<|eos|>")[0][-20:] in p for p in passages)
    with pytest.raises(UserError, match="prepared with tokenizer"):
        ShardLoader(tmp_path / "o", seq_len=32, tokenizer_hash="sha256:0000")
    assert next(iter(ShardLoader(tmp_path / "o", split="val", seq_len=32, global_batch=2).eval_batches(1, 2))).shape \
        == (2, 33)


def test_single_document_holds_out_val_tokens(tmp_path, tok_dir):
    """One document (Tiny Shakespeare as one file) and --val-fraction: the tail tokens become val."""
    tok = load_tokenizer(tok_dir)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    r = prepare([str(tmp_path / "one.txt")], tok_dir, tmp_path / "out", val_fraction=0.1, progress=False)
    ids = tok.encode(text)
    total = len(ids) + 1  # + EOS
    assert r["documents_kept"] == 1 and r["tokens"] == total
    assert r["val_tokens"] == r["val_held_out_tokens"] == round(0.1 * total) and "warning" not in r
    index = verify_shards(tmp_path / "out")  # sizes and sha256 of the rewritten shards check out
    train = np.fromfile(tmp_path / "out" / index["splits"]["train"]["shards"][0]["file"], dtype=index["dtype"])
    val = np.fromfile(tmp_path / "out" / index["splits"]["val"]["shards"][0]["file"], dtype=index["dtype"])
    assert train.tolist() + val.tolist() == ids + [tok.eos_id]  # the stream, cut once, nothing lost
    ShardLoader(tmp_path / "out", seq_len=32, global_batch=2, split="val").next_batch()
    for seed in range(4):  # whichever split the one document hashes to, the cut is the same
        r = prepare([str(tmp_path / "one.txt")], tok_dir, tmp_path / f"s{seed}", val_fraction=0.5, seed=seed,
                    progress=False)
        assert (r["train_tokens"], r["val_tokens"]) == (total - round(0.5 * total), round(0.5 * total))


def test_directories_skip_metadata_and_say_which(tmp_path, tok_dir, passages, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(passages[:3]):
        (src / f"doc{i}.txt").write_text(p)
    (src / "MANIFEST.json").write_text('{"files": ["doc0.txt"], "sha256": "abc"}')  # metadata, not records
    r = prepare([str(src)], tok_dir, tmp_path / "out", progress=False)
    assert r["files"] == 3 and r["skipped_files"] == 1 and r["documents_kept"] == 3
    assert [Path(p).name for p in r["skipped"]] == ["MANIFEST.json"]
    assert "skipped 1 file(s) in input directories" in capsys.readouterr().err
