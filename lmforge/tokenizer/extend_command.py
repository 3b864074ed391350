"""`lmforge tokenizer extend`: argument parsing and checks (the work is ``lmforge.artifacts.vocab``)."""

from __future__ import annotations

from lmforge.artifacts.identity import check_model_dir_tokenizer
from lmforge.artifacts.vocab import extend_model_dir
from lmforge.console import emit
from lmforge.outputs import guard_output_dir

HELP = "add N new tokens learned on a corpus (e.g. Chinese) to a model dir's BPE tokenizer and grow its embeddings"


def add_arguments(p) -> None:
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


def run(args) -> int:
    guard_output_dir(args.out, inputs=[args.base, *args.input], overwrite=args.overwrite)
    check_model_dir_tokenizer(args.base)
    r = extend_model_dir(args.base, args.input, args.add, args.out, text_field=args.text_field,
                         txt_mode=args.txt_mode, max_bytes=int(args.max_bytes) if args.max_bytes else None)
    emit(args, f"added {r['added']:,} tokens (vocab {r['old_vocab_size']:,} -> {r['new_vocab_size']:,}); "
               f"chars/token on the corpus {r['chars_per_token_before']:.3f} -> {r['chars_per_token_after']:.3f} "
               f"-> {r['out']}", r)
    return 0

