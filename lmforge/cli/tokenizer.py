"""`lmforge tokenizer train|eval|extend`: subcommands registered in SUBCOMMANDS (add one by adding an entry)."""

from __future__ import annotations

from lmforge.console import emit, info

HELP = "train a byte-level BPE tokenizer (English + Chinese friendly) or measure one's compression"


def _train_args(p) -> None:
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="files, dirs, globs or URLs (txt, jsonl, json, parquet; .gz/.zst ok); repeatable")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output dir (tokenizer.json + HF config files)")
    p.add_argument("--text-field", default="text", help="jsonl/json/parquet field; 'a,b' = first present")
    p.add_argument("--txt-mode", default="file", choices=["file", "blank", "line"],
                   help="text files: one document per file, per blank-line block or per line")
    p.add_argument("--include", default=None, help="file-name patterns read inside input dirs, e.g. '*.py,*.txt'")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-bytes", type=float, default=None, help="stop reading after this many bytes (e.g. 1e9)")
    p.add_argument("--max-token-length", type=int, default=None, help="cap on a token's length in characters")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out dir")
    p.add_argument("--json", action="store_true")


def _train(args) -> int:
    from lmforge.outputs import exclusive_output, guard_output_dir
    from lmforge.tokenizer.train import train_tokenizer

    guard_output_dir(args.out, inputs=args.input, overwrite=args.overwrite)
    with exclusive_output(args.out, "lmforge tokenizer train", overwrite=args.overwrite):  # one writer of --out
        tok = train_tokenizer(args.input, args.vocab_size, args.out, text_field=args.text_field,
                              txt_mode=args.txt_mode, min_frequency=args.min_frequency,
                              max_bytes=int(args.max_bytes) if args.max_bytes else None,
                              max_token_length=args.max_token_length, include=args.include)
    st = tok.train_stats
    summary = (f"trained {tok.vocab_size:,}-token BPE on {st['documents']:,} documents "
               f"({st['bytes'] / 1e6:.1f} MB) in {st['seconds']:.1f}s -> {args.out} ({tok.hash})")
    emit(args, summary, {"out": args.out, "vocab_size": tok.vocab_size, "hash": tok.hash,
                         "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                         "special_tokens": tok.special_tokens, **st})
    return 0


def _eval_args(p) -> None:
    p.add_argument("--tokenizer", required=True, help="dir with tokenizer.json or tokenizer.model")
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH")
    p.add_argument("--text-field", default="text")
    p.add_argument("--txt-mode", default="file", choices=["file", "blank", "line"])
    p.add_argument("--include", default=None, help="file-name patterns read inside input dirs, e.g. '*.py,*.txt'")
    p.add_argument("--max-bytes-per-file", type=float, default=None)
    p.add_argument("--json", action="store_true")


def _eval(args) -> int:
    from lmforge.tokenizer.evaluate import evaluate_tokenizer, short_name

    res = evaluate_tokenizer(args.tokenizer, args.input, text_field=args.text_field, txt_mode=args.txt_mode,
                             max_bytes_per_file=int(args.max_bytes_per_file) if args.max_bytes_per_file else None,
                             include=args.include)
    t = res["total"]
    if not args.json and len(res["files"]) > 1:
        for f in res["files"]:
            info(f"{short_name(f['file']):<48} {f['bytes_per_token']:6.3f} bytes/tok {f['chars_per_token']:6.3f} "
                 f"chars/tok  round-trip {f['round_trip_exact']:.2%}")
    summary = (f"{t['tokens']:,} tokens for {t['bytes']:,} bytes in {len(res['files'])} file(s): "
               f"{t['bytes_per_token']:.3f} bytes/token, {t['chars_per_token']:.3f} chars/token, "
               f"round trip exact {t['round_trip_exact']:.2%}")
    emit(args, summary, res)
    return 0


EXTEND_HELP = "add N new tokens learned on a corpus (e.g. Chinese) to a model dir's BPE tokenizer and grow its embeddings"


def _extend_args(p) -> None:
    p.add_argument("--base", required=True, metavar="MODEL_DIR", help="model dir whose tokenizer.json is BPE")
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="corpus files/dirs/globs (txt, jsonl, json, parquet; .gz/.zst ok)")
    p.add_argument("--add", type=int, required=True, metavar="N", help="number of new tokens")
    p.add_argument("--out", required=True, metavar="MODEL_DIR2", help="the extended model dir to write")
    p.add_argument("--text-field", default="text")
    p.add_argument("--txt-mode", default="line", choices=["file", "blank", "line"],
                   help="text files: one document per line (default), blank-line block or file")
    p.add_argument("--max-bytes", type=float, default=None, help="read at most this much of the corpus")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out dir")
    p.add_argument("--json", action="store_true")


def _extend(args) -> int:
    from lmforge.artifacts.identity import check_model_dir_tokenizer
    from lmforge.artifacts.vocab import extend_model_dir
    from lmforge.outputs import exclusive_output, guard_output_dir

    guard_output_dir(args.out, inputs=[args.base, *args.input], overwrite=args.overwrite)
    check_model_dir_tokenizer(args.base)
    with exclusive_output(args.out, "lmforge tokenizer extend", overwrite=args.overwrite):  # one writer of --out
        r = extend_model_dir(args.base, args.input, args.add, args.out, text_field=args.text_field,
                             txt_mode=args.txt_mode, max_bytes=int(args.max_bytes) if args.max_bytes else None)
    emit(args, f"added {r['added']:,} tokens (vocab {r['old_vocab_size']:,} -> {r['new_vocab_size']:,}); "
               f"chars/token on the corpus {r['chars_per_token_before']:.3f} -> {r['chars_per_token_after']:.3f} "
               f"-> {r['out']}", r)
    return 0


# name -> (help, add_arguments, run): add a subcommand by adding an entry.
SUBCOMMANDS: dict[str, tuple[str, object, object]] = {
    "train": ("train a byte-level BPE tokenizer from text", _train_args, _train),
    "eval": ("bytes/token, chars/token and round-trip exactness per input file", _eval_args, _eval),
    "extend": (EXTEND_HELP, _extend_args, _extend),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    for name, (help_text, add, run_fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_tokenizer_run=run_fn)


def run(args) -> int:
    return args._tokenizer_run(args)
