"""`lmforge finetune --config FILE [section.key=value ...]`: sft | lora | classify | dpo | reward | grpo from a
model dir."""

from __future__ import annotations

from lmforge.train.rank_output import emit_once, errors_name_rank

HELP = ("fine-tune a model dir: instruction SFT, LoRA, a classifier, DPO, a reward model or GRPO (online RL) "
        "(resumes from RUN/checkpoints/LATEST)")


def add_arguments(p) -> None:
    p.add_argument("--config", required=True,
                   help="YAML file or packaged recipe, e.g. configs/finetune/sft.yaml or finetune/sft")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.from=runs/tiny/model finetune.mode=lora lora.rank=16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    p.add_argument("--check", action="store_true",
                   help="validate the config (and its input files' tokenizer) and exit: 0 and 'config ok' (with "
                        "--json the resolved config), or the one-line error and 2; nothing is trained or written")


def _checked(args, cfg) -> int:
    from lmforge.config import to_dict

    emit_once(args, f"config ok: lmforge finetune would write {cfg.run.dir}", {"ok": True, "config": to_dict(cfg)})
    return 0


def run(args) -> int:
    with errors_name_rank():  # under torchrun: "error: rank N: …"
        from lmforge.tasks.config import load_config

        cfg = load_config(args.config, args.overrides)  # ConfigError before anything heavy is imported
        from lmforge.artifacts.identity import check_model_dir_tokenizer
        from lmforge.outputs import run_dir_claim

        check_model_dir_tokenizer(cfg.model.path)
        if args.check:
            return _checked(args, cfg)
        # model.from inside run.dir (e.g. its own RUN/model) is refused: the run would replace its own base.
        with run_dir_claim(cfg.run.dir, "lmforge finetune", overwrite=cfg.run.overwrite,
                           inputs=[cfg.model.path, *cfg.data.train_paths(), *cfg.data.dev]):
            from lmforge.tasks.run import run as train
            from lmforge.tasks.run import summary

            result = train(cfg, args.config)
    line, payload = summary(result)
    emit_once(args, line, payload)  # rank 0 only
    return result.train.exit_code  # non-zero when stopped early (signal: 128+N, time limit: 124) and RUN/model not written
