"""The loss-spike rollback demonstration in docs/guide/pretraining.md ("Loss spikes"): one poisoned batch at
step SPIKE in a shard dir (`_spike_data.write_poisoned_token_dir`), trained three ways through
`lmforge.tasks.run` on one CPU process:

  clean     the stream never holds the poisoned step's samples nor those read since the last checkpoint
  none      train.spike off: the poisoned batch is trained on
  rollback  train.spike.action=rollback: back to the checkpoint, the samples read since skipped

    PYTHONPATH=. python tests/distributed/_spike_demo.py OUT_DIR [PNG]

prints the figures (JSON) and writes the rollback run's report (RUN/report.png, the spike marked; copied to
PNG when given).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _dist_harness, _spike_data

import _dist_harness as h
import pytest
import yaml
from _spike_data import patch_loader, write_poisoned_token_dir

STEPS, SPIKE, INTERVAL, B = 80, 55, 10, h.BATCH_T


def config(out: Path, name: str, data: Path, action: str) -> str:
    cfg = h.trainer_config_dict(out / name, data, STEPS, {}, checkpoint={"interval": INTERVAL, "keep_last": 3},
                                train={"threads": 1, "spike": {"action": action, "metric": "loss", "window": 50,
                                                               "min_history": 10, "k": 6.0}},
                                optim={"lr": 1e-2}, eval={"batches": 0, "interval": 0, "at_start": False},
                                model={"dropout": 0.0, "dim": 64, "ffn_hidden": 128}, log={"interval": 1})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def main(out: Path, png: Path | None) -> dict:
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config
    from lmforge.train.report import write_report

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "data"
    write_poisoned_token_dir(data, (SPIKE - 1) * B, B, n_tokens=40000)
    ckpt = (SPIKE - 1) // INTERVAL * INTERVAL
    results = {}
    for name, action, skip in (("clean", "none", (ckpt * B, SPIKE * B)), ("none", "none", None),
                               ("rollback", "rollback", None)):
        with pytest.MonkeyPatch.context() as mp:
            patch_loader(mp, skip=skip)
            results[name] = run(load_config(config(out, name, data, action))).train
    losses = {name: h.train_losses(out / name) for name in results}
    rows = [json.loads(x) for x in (out / "rollback" / "metrics.jsonl").read_text().splitlines()]
    event = next(r for r in rows if r.get("event") == "spike")
    after = range(ckpt + 1, STEPS + 1)
    figures = {
        "spike_step": event["spike_step"], "rolled_back_to": event["step"], "skipped_samples": event["skipped_samples"],
        "spike_loss": event["loss"], "spike_grad_norm": event["grad_norm"], "metric": event["metric"],
        "threshold": event["threshold"], "median": event["median"],
        "loss_before": losses["rollback"][SPIKE - 1], "loss_after_rollback": losses["rollback"][ckpt + 1],
        "final_loss": {k: v[STEPS] for k, v in losses.items()},
        "none_loss_at_spike": losses["none"][SPIKE],
        "none_loss_next_steps": [losses["none"][s] for s in range(SPIKE + 1, SPIKE + 4)],
        "max_abs_diff_rollback_vs_clean": max(abs(losses["rollback"][s] - losses["clean"][s]) for s in after),
        "rollbacks": results["rollback"].rollbacks,
    }
    _, report_png, _ = write_report(out / "rollback")
    if png is not None:
        shutil.copyfile(report_png, png)
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
