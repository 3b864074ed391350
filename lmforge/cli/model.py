"""`lmforge model list | info PRESET`: shapes and counts from the config alone (no model built)."""

from __future__ import annotations

from lmforge.console import emit

HELP = "list model presets or describe one (parameters, FLOPs per token)"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="{list,info}", required=True)
    ls = sub.add_parser("list", help="list presets")
    ls.add_argument("--json", action="store_true")
    info = sub.add_parser("info", help="describe a preset")
    info.add_argument("preset")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for the FLOP count")
    info.add_argument("--json", action="store_true")


def run(args) -> int:
    from lmforge.models.presets import describe, preset_names

    if args.model_command == "list":
        rows = [describe(n) for n in preset_names()]
        if args.json:
            emit(args, "", {"presets": rows})
        else:
            print(f"{'preset':<18}{'params':>16}{'layers':>8}{'dim':>7}{'heads':>7}{'kv':>5}  pos / ffn")
            for r in rows:
                print(f"{r['name']:<18}{r['params']:>16,}{r['layers']:>8}{r['dim']:>7}{r['heads']:>7}"
                      f"{r['kv_heads']:>5}  {r['pos_encoding']} / {r['activation']}"
                      + ("" if r["causal"] else " (encoder)"))
        return 0
    d = describe(args.preset, args.seq_len)
    emit(args, f"{d['name']}: {d['params']:,} parameters, {d['layers']} layers, dim {d['dim']}, "
               f"{d['flops_per_token'] / 1e9:.2f} GFLOPs/token (train, seq {d['seq_len']})", d)
    return 0
