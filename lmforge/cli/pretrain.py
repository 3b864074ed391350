"""`lmforge pretrain --config FILE [section.key=value ...]`."""

from __future__ import annotations

from lmforge.train.rank_output import emit_once, errors_name_rank

HELP = "pretrain a causal LM on token shards (resumes from RUN/checkpoints/LATEST by default)"


def add_arguments(p) -> None:
    p.add_argument("--config", required=True,
                   help="YAML file or packaged recipe, e.g. configs/pretrain/tiny.yaml or pretrain/tiny")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.max_steps=100 optim.lr=1e-3 run.dir=runs/try")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    p.add_argument("--check", action="store_true",
                   help="validate the config (and its input files' tokenizer) and exit: 0 and 'config ok' (with "
                        "--json the resolved config), or the one-line error and 2; nothing is trained or written")


def _checked(args, cfg) -> int:
    from lmforge.config import to_dict

    emit_once(args, f"config ok: lmforge pretrain would write {cfg.run.dir}", {"ok": True, "config": to_dict(cfg)})
    return 0


def run(args) -> int:
    with errors_name_rank():  # under torchrun: "error: rank N: …"
        from lmforge.train.config import load_config

        cfg = load_config(args.config, args.overrides)  # ConfigError before anything is imported or built
        from lmforge.data.shards import check_shards_tokenizer
        from lmforge.outputs import run_dir_claim

        for shard_dir in cfg.data.shard_dirs():  # every run, with or without a val split; each mixture source
            check_shards_tokenizer(shard_dir, cfg.data.tokenizer)
        if args.check:
            return _checked(args, cfg)
        with run_dir_claim(cfg.run.dir, "lmforge pretrain", overwrite=cfg.run.overwrite,
                           inputs=[*cfg.data.shard_dirs(), cfg.data.tokenizer,
                                   cfg.model.get("init_embeddings_from")]):
            from lmforge.tasks.run import run as train
            from lmforge.tasks.run import summary

            result = train(cfg)
    line, payload = summary(result)
    emit_once(args, line, payload)  # rank 0 only
    return result.train.exit_code  # non-zero when stopped early (signal: 128+N, time limit: 124) and RUN/model not written
