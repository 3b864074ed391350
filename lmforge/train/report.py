"""A run's report: loss / val-loss / lr curves as RUN/report.png and a markdown summary RUN/report.md
(`lmforge report RUN_DIR`, lmforge.cli.report; the quickstart writes one at its end)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.config import UserError, load_yaml
from lmforge.models.presets import model_config_from_dict


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no metrics.jsonl; pass a run dir written by `lmforge pretrain`")
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by a kill (or not JSON at all)
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def format_duration(seconds: float) -> str:
    """``2h03m``, ``4m05s`` or ``7s`` (``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Figures of a run from its metrics.jsonl (and config.yaml / model dir when present)."""
    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    train = [r for r in rows if r.get("kind") == "train" and _num(r.get("loss")) is not None]
    evals = [r for r in rows if r.get("kind") == "eval" and _num(r.get("val_loss")) is not None]
    events = [r for r in rows if r.get("kind") == "event"]
    if not train and not evals:
        raise UserError(f"'{run_dir}/metrics.jsonl' holds no training rows yet; run some steps first")
    out: dict[str, Any] = {"run_dir": str(run_dir), "name": run_dir.name}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        cfg = load_yaml(cfg_path)  # safe loader, no aliases: a hostile config.yaml is a one-line error
        cfg = {k: v for k, v in cfg.items() if isinstance(v, dict)}  # a hand-edited section that is not a mapping
        out["name"] = (cfg.get("run") or {}).get("name") or out["name"]
        model = cfg.get("model") or {}
        out["preset"] = model.get("preset")
        try:
            mcfg = model_config_from_dict(model)
            out["params"] = mcfg.num_params()
            out["model"] = f"{mcfg.n_layers} layers, dim {mcfg.dim}, {mcfg.n_heads} heads, vocab {mcfg.vocab_size:,}"
        except (ValueError, TypeError):  # a hand-edited config (ConfigError is a ValueError): skip the figures
            out["model"] = None
        data, tr = cfg.get("data") or {}, cfg.get("train") or {}
        out["seq_len"], out["global_batch"] = data.get("seq_len"), tr.get("global_batch")
        optim = cfg.get("optim") or {}
        out["lr"] = optim.get("lr")
        if optim.get("name") == "muon":  # Muon for the block matrices (lmforge.train.muon), AdamW for the rest
            muon_lr = optim.get("muon_lr") if optim.get("muon_lr") is not None else optim.get("lr")
            out["optimizer"] = f"Muon (lr {_fmt(muon_lr)}) + AdamW"
        out["schedule"] = (cfg.get("schedule") or {}).get("name")
    last = (train or evals)[-1]
    out["steps"] = max(r.get("step", 0) for r in train + evals)
    out["tokens"] = last.get("tokens")
    ends = [e for e in events if e.get("event") == "end"]
    total_steps = [e.get("total_steps") for e in events if e.get("total_steps")]
    out["total_steps"] = total_steps[-1] if total_steps else None
    out["segments"] = sum(1 for e in events if e.get("event") in ("start", "resume")) or 1
    out["stop_reason"] = ends[-1].get("reason") if ends and ends[-1].get("step") == out["steps"] else "running or killed"
    out["train_seconds"] = sum(_num(e.get("elapsed_s")) or 0.0 for e in ends) or None
    if train:
        out["first_loss"], out["final_loss"] = train[0]["loss"], train[-1]["loss"]
        tps = [v for r in train if (v := _num(r.get("tok_per_s")))]
        mfu = [v for r in train if (v := _num(r.get("mfu")))]
        mem = [v for r in train if (v := _num(r.get("peak_mem_gb")))]
        out["median_tok_per_s"] = statistics.median(tps) if tps else None
        out["median_mfu"] = statistics.median(mfu) if mfu else None
        out["peak_mem_gb"] = max(mem) if mem else None
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        out["first_val_loss"] = evals[0]["val_loss"]
        out["final_val_loss"] = evals[-1]["val_loss"]
        out["final_val_ppl"] = evals[-1].get("val_ppl")
        out["final_val_bpb"] = evals[-1].get("val_bpb")
        out["best_val_loss"], out["best_val_step"] = best["val_loss"], best["step"]
        sources = _source_names(evals)
        if sources:  # a data.sources mixture: each source's last loss and bits/byte
            last = evals[-1]
            out["sources"] = {n: {"val_loss": last.get(f"val_loss/{n}"), "val_bpb": last.get(f"val_bpb/{n}")}
                              for n in sources}
    out["nonfinite_steps"] = sum(1 for e in events if e.get("event") == "nonfinite")
    out["has_model"] = (run_dir / "model" / "config.json").is_file()
    return out


def _source_names(evals: list[dict[str, Any]]) -> list[str]:
    """The sources of a data mixture's evaluation rows (keys ``val_loss/<name>``), in first-seen order."""
    names: dict[str, None] = {}
    for r in evals:
        for k in r:
            if k.startswith("val_loss/"):
                names[k.split("/", 1)[1]] = None
    return list(names)


def plot(run_dir: str | Path, path: str | Path | None = None, title: str | None = None) -> Path:
    """Two panels: train + validation loss against step (tokens on the top axis), and the learning rate; a
    data mixture adds a third: each source's validation bits per byte (or loss) and their weighted total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    train = [r for r in rows if r.get("kind") == "train" and _num(r.get("loss")) is not None]
    evals = [r for r in rows if r.get("kind") == "eval" and _num(r.get("val_loss")) is not None]
    sources = _source_names(evals)
    if sources:
        fig, (ax_loss, ax_src, ax_lr) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True,
                                                     gridspec_kw={"height_ratios": [3, 2.4, 1.2]})
        metric = "val_bpb" if all(f"val_bpb/{n}" in evals[-1] for n in sources) else "val_loss"
        for n in sources:
            pts = [(r["step"], r[f"{metric}/{n}"]) for r in evals if _num(r.get(f"{metric}/{n}")) is not None]
            ax_src.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.2, label=n)
        pts = [(r["step"], r[metric]) for r in evals if _num(r.get(metric)) is not None]
        ax_src.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1.2, label="weighted total")
        ax_src.set_ylabel("val bits / byte" if metric == "val_bpb" else "val loss (nats / token)")
        ax_src.grid(alpha=0.3)
        ax_src.legend(fontsize=8)
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1.2]})
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
        ax_lr.plot([r["step"] for r in train], [r.get("lr", 0.0) for r in train], color="tab:green", lw=1.2)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, lw=1.2,
                     color="tab:orange", label="val loss")
    if train or evals:
        ylim = ax_loss.get_ylim()
        mark_events(ax_loss, rows, top=ylim[1])
        ax_loss.set_ylim(*ylim)  # a spike's marker does not rescale the curve (off-scale ones sit at the top)
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(f"{title or run_dir.name}: pretraining")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    out = Path(path) if path else run_dir / "report.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


SPIKE_STYLE = {"rollback": ("v", "tab:red"), "skip": ("x", "tab:purple"), "stop": ("X", "black")}


def mark_events(ax, rows: list[dict[str, Any]], top: float) -> list[dict[str, Any]]:
    """Mark the loss spikes (``train.spike`` events) on the loss axis ``ax``: at the spiked step and its loss
    (at ``top`` when the loss is off the scale or not finite, the value then in the label), labelled with what the
    run did; a rollback also shades the steps it undid. Returns the marks."""
    marks = []
    for r in rows:
        if r.get("kind") != "event" or r.get("event") != "spike":
            continue
        action = str(r.get("action", "skip"))
        x = r.get("spike_step", r.get("step"))
        loss = _num(r.get("loss"))
        label = f"rollback to {r.get('step')}" if action == "rollback" else action
        if loss is None or loss > top:  # off the scale: the marker sits at the top, the label says the value
            label += f" (loss {loss:.3g})" if loss is not None else f" (loss {r.get('loss')})"
        marks.append({"x": x, "y": min(loss, top) if loss is not None else top, "label": label, "action": action})
        if action == "rollback" and isinstance(r.get("step"), (int, float)):  # the steps that were undone
            ax.axvspan(r["step"], x, color=SPIKE_STYLE["rollback"][1], alpha=0.08, lw=0)
    for action, (marker, color) in SPIKE_STYLE.items():
        mine = [m for m in marks if m["action"] == action]
        if mine:
            ax.scatter([m["x"] for m in mine], [m["y"] for m in mine], marker=marker, color=color, s=60, zorder=5,
                       clip_on=False, label=f"loss spike: {action}")
    for m in marks:
        ax.annotate(m["label"], (m["x"], m["y"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    return [{k: m[k] for k in ("x", "y", "label")} for m in marks]


def _fmt(v, spec: str = "", none: str = "—") -> str:
    if v is None:
        return none
    return format(v, spec) if spec else str(v)


def markdown(s: dict[str, Any], image: str | None = "report.png", extra: dict[str, str] | None = None) -> str:
    lines = [f"# Run `{s['name']}`", ""]
    if image:
        lines += [f"![loss and learning rate]({image})", ""]
    rows = [
        ("model", f"{s.get('preset') or 'custom'}" + (f" — {s['params']:,} parameters" if s.get("params") else "")
         + (f" ({s['model']})" if s.get("model") else "")),
        ("batch", f"{_fmt(s.get('global_batch'))} sequences × {_fmt(s.get('seq_len'))} tokens"),
        ("optimizer", (f"{s.get('optimizer') or 'AdamW'}, peak lr {_fmt(s.get('lr'))}, "
                       f"{_fmt(s.get('schedule'))} schedule")),
        ("steps", f"{s['steps']:,}" + (f" of {s['total_steps']:,}" if s.get("total_steps") else "")
         + f" ({s['stop_reason'].replace('_', ' ')}; {s['segments']} segment{'s' if s['segments'] != 1 else ''})"),
        ("tokens", _fmt(s.get("tokens"), ",")),
        ("training time", format_duration(s["train_seconds"]) if s.get("train_seconds") else "—"),
        ("train loss", f"{_fmt(s.get('first_loss'), '.4f')} → {_fmt(s.get('final_loss'), '.4f')}"),
        ("val loss", (f"{_fmt(s.get('first_val_loss'), '.4f')} → {_fmt(s.get('final_val_loss'), '.4f')} "
                     f"(best {_fmt(s.get('best_val_loss'), '.4f')} at step {_fmt(s.get('best_val_step'))})")),
        ("val perplexity", _fmt(s.get("final_val_ppl"), ".2f")),
        ("val bits per byte", _fmt(s.get("final_val_bpb"), ".3f")),
        *((f"val {name}", f"loss {_fmt(v.get('val_loss'), '.4f')}, bits/byte {_fmt(v.get('val_bpb'), '.3f')}")
          for name, v in (s.get("sources") or {}).items()),
        ("throughput (median)", f"{_fmt(s.get('median_tok_per_s'), ',.0f')} tokens/s"
         + (f", MFU {s['median_mfu']:.1%}" if s.get("median_mfu") else "")),
        ("peak memory", f"{_fmt(s.get('peak_mem_gb'), '.2f')} GB"),
        ("non-finite steps skipped", str(s.get("nonfinite_steps", 0))),
        ("model dir", "`model/` (use `lmforge generate --model RUN/model --prompt ...`)" if s.get("has_model")
         else "not written yet"),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, extra: dict[str, str] | None = None) -> tuple[dict[str, Any], Path, Path]:
    """PNG + markdown into the run dir; returns (summary, png path, markdown path)."""
    run_dir = Path(run_dir)
    s = summarize(run_dir)
    png = plot(run_dir, title=s.get("name"))
    md = run_dir / "report.md"
    atomic_write_text(md, markdown(s, png.name, extra))
    return s, png, md

