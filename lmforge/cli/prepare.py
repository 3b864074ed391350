"""`lmforge prepare`: text -> cleaned, deduplicated token shards + index.json."""

from __future__ import annotations

import math
import os

from lmforge.console import emit

HELP = "tokenize text into token shards (dedup, PII scrub, val split, parallel workers)"


def add_arguments(p) -> None:
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="files, dirs, globs, fsspec URLs (s3://, gs://, memory://), hf:NAME[:SPLIT] or a "
                        "saved `datasets` dir; txt / jsonl / json / parquet / warc / wet / html, .gz/.zst/.bz2/.xz; "
                        "repeatable")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir (tokenizer.json or tokenizer.model)")
    p.add_argument("--out", required=True, help="output token-shard dir (written atomically)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out for val")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (with --ray-address: Ray tasks at once, default all its CPUs)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="where the work runs: processes on this machine, or Ray tasks (same shards)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local one")
    p.add_argument("--dedup", default="exact", choices=["exact", "near", "none"])
    p.add_argument("--seed", type=int, default=0, help="decides the val split")
    p.add_argument("--text-field", default="text", help="jsonl/json/parquet field; 'a,b' = first present")
    p.add_argument("--txt-mode", default="file", choices=["file", "blank", "line"],
                   help="text files: one document per file (default), per blank-line block or per line")
    p.add_argument("--include", default=None, help="file-name patterns read inside input dirs, e.g. '*.py,*.txt'")
    p.add_argument("--min-chars", type=int, default=16, help="drop shorter documents")
    p.add_argument("--max-doc-bytes", type=int, default=8 << 20, metavar="N",
                   help="skip (and count) documents longer than N decompressed bytes, never loading them whole "
                        "(default 8 MiB; 0: no cap)")
    p.add_argument("--max-file-bytes", type=int, default=64 << 20, metavar="N",
                   help="skip (and count) .json files longer than N bytes; they are parsed whole "
                        "(default 64 MiB; 0: no cap)")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip truncated or corrupt input files (named in the report) instead of stopping")
    p.add_argument("--pii", action="store_true", help="replace e-mail addresses and phone numbers")
    p.add_argument("--add-bos", action="store_true", help="start every document with BOS")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    # web filters (lmforge.data.doc_filters): language routing, quality rules, decontamination
    p.add_argument("--lang", default=None, metavar="CODES",
                   help="keep only documents in these languages (ISO 639-1, e.g. en,zh; packaged langid model)")
    p.add_argument("--lang-min-score", type=float, default=0.65,
                   help="with --lang: minimum language probability to keep a document")
    p.add_argument("--quality", default=None, metavar="FILTERS",
                   help="quality filters: gopher (= gopher_quality,gopher_repetition), c4, fineweb, all")
    p.add_argument("--quality-config", default=None, metavar="JSON",
                   help="threshold overrides: a JSON file or inline JSON, e.g. '{\"c4\": {\"min_sentences\": 2}}'")
    p.add_argument("--decontaminate", nargs="+", action="extend", default=None, metavar="PATH",
                   help="evaluation sets (jsonl/json/txt): documents sharing an n-gram with one are dropped")
    p.add_argument("--decontaminate-mode", default="drop", choices=["drop", "report"],
                   help="drop contaminated documents, or only count them in the report")
    p.add_argument("--decontaminate-ngram", type=int, default=13,
                   help="n-gram length in words (a CJK character counts as one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    p.add_argument("--mixture", default=None, metavar="RECIPE.yaml",
                   help="after a successful prepare, add (or update, by name) --out as a source of this "
                        "pretraining recipe's data.sources (created, minimal and valid, when missing; other keys "
                        "kept); run it with `lmforge pretrain --config RECIPE.yaml`")
    p.add_argument("--source-name", default=None, metavar="NAME",
                   help="with --mixture: the source's name (default: the --out dir's basename)")
    p.add_argument("--weight", type=float, default=None,
                   help="with --mixture: the source's weight (default: the number of train tokens prepared, so an "
                        "unedited recipe mixes by size)")
    p.add_argument("--on-exhaust", default=None, choices=["repeat", "stop"],
                   help="with --mixture: what the source does after its last window (default repeat; an "
                        "updated source keeps its own)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from lmforge.data.doc_filters import make_spec
    from lmforge.data.prepare import prepare
    from lmforge.data.remote import is_remote
    from lmforge.outputs import guard_output_dir
    from lmforge.sources import refuse_symlink_loop

    filters = make_spec(lang=args.lang, lang_min_score=args.lang_min_score, quality_filters=args.quality,
                        quality_config=args.quality_config, decontaminate=args.decontaminate,
                        decontaminate_mode=args.decontaminate_mode, decontaminate_ngram=args.decontaminate_ngram)

    for flag, paths in (("--input", args.input), ("--tokenizer", [args.tokenizer]), ("--out", [args.out])):
        for path in paths:  # before the output guard, which resolves them
            refuse_symlink_loop(path, flag)
    if not is_remote(args.out):  # an s3:// / gs:// --out is checked by prepare itself (data/remote.py)
        guard_output_dir(args.out, inputs=[*args.input, args.tokenizer], overwrite=args.overwrite)
    mixture = _mixture_preflight(args)
    r = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                dedup=args.dedup, seed=args.seed, text_field=args.text_field, min_chars=args.min_chars,
                txt_mode=args.txt_mode, pii=args.pii, shard_tokens=args.shard_tokens, add_bos=args.add_bos,
                overwrite=args.overwrite, progress=not args.no_progress, include=args.include, filters=filters,
                engine=args.engine, ray_address=args.ray_address, max_doc_bytes=args.max_doc_bytes,
                max_file_bytes=args.max_file_bytes, skip_bad_files=args.skip_bad_files)
    removed = r["removed_exact_duplicates"] + r["removed_near_duplicates"]
    summary = (f"{r['tokens']:,} tokens ({r['train_tokens']:,} train / {r['val_tokens']:,} val) from "
               f"{r['documents_kept']:,} of {r['documents_read']:,} documents "
               f"({removed:,} duplicates, {r['removed_short'] + r['removed_empty']:,} empty/short removed"
               + (f", {r['filters']['documents_in'] - r['filters']['documents_out']:,} filtered" if "filters" in r
                  else "")
               + (f", {r['skipped_too_large']:,} too large skipped" if r["skipped_too_large"] else "")
               + (f", {len(r['bad_files'])} bad file(s) skipped" if r["bad_files"] else "")
               + f") in {r['seconds']:.1f}s, {r['mb_per_s']:.2f} MB/s -> {args.out}")
    payload = {"out": args.out, **r}
    if mixture is not None:
        m = _add_to_mixture(args, mixture, r)
        payload["mixture"] = m
        recipe = m["recipe"]
        w = m["weight"]
        weight = f"{int(w):,}" if float(w).is_integer() else f"{w:g}"
        summary += (f"\n{'updated' if m['updated'] else 'added'} source '{m['source']}' (weight {weight}) "
                    f"in {recipe} ({len(m['sources'])} source(s): {', '.join(m['sources'])}); see its tokens per "
                    f"source with `lmforge plan --model {recipe}`, train with `lmforge pretrain --config {recipe}`")
    emit(args, summary, payload)
    return 0


def _validate_recipe(doc) -> None:
    from lmforge.train.config import load_config

    load_config(None, base=doc)


def _mixture_preflight(args) -> str | None:
    """The source name for --mixture, after checking the recipe (before the long prepare); None without it."""
    from lmforge.config import ConfigError

    if args.mixture is None:
        for flag in ("source_name", "weight", "on_exhaust"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} needs --mixture RECIPE.yaml; add it or drop the flag")
        return None
    from lmforge.data.mixture_recipe import preflight
    from lmforge.tokenizer.core import load_tokenizer

    name = args.source_name or os.path.basename(str(args.out).rstrip("/"))
    if args.weight is not None and not (math.isfinite(args.weight) and args.weight >= 0):
        raise ConfigError(f"--weight {args.weight} must be a finite number >= 0")
    preflight(args.mixture, name=name, dir=args.out, on_exhaust=args.on_exhaust,
              tokenizer_hash=load_tokenizer(args.tokenizer).hash, validate=_validate_recipe)
    return name


def _add_to_mixture(args, name: str, r: dict) -> dict:
    from lmforge.data.mixture_recipe import add_source
    from lmforge.data.shards import read_index

    weight = args.weight if args.weight is not None else float(r["train_tokens"])
    return add_source(args.mixture, name=name, dir=args.out, weight=weight, on_exhaust=args.on_exhaust,
                      tokenizer_hash=read_index(args.out).get("tokenizer_hash"), validate=_validate_recipe)
