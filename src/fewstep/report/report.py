"""``fewstep report RUN...``: one Markdown and one HTML page comparing runs side by side.

Per run: what made it (config.yaml), its latest evaluation with each metric next to its floor,
a picture of its samples (grid for images, scatter over the true modes for 2-D data); across
runs: curves of each metric against iteration and against wall time.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import yaml

from fewstep.errors import FewstepError
from fewstep.train.runlog import read_metrics

METRICS = ["fd", "fid", "kid", "mmd", "precision", "recall", "density", "coverage", "diversity",
           "modes_covered", "hq_rate", "mode_mass_tv"]
CURVES = ["fd", "mmd", "hq_rate", "modes_covered", "recall", "coverage", "diversity"]


def run_summary(run: Path) -> dict:
    """Config, role and the latest evaluation record of one run directory."""
    if not (run / "model.json").exists() and not (run / "metrics.jsonl").exists():
        raise FewstepError(f"{run} is not a fewstep run directory (no model.json or metrics.jsonl)")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    meta = json.loads((run / "model.json").read_text()).get("meta", {}) if (run / "model.json").exists() \
        else {}
    evals = [r for r in read_metrics(run) if any(k in r for k in ("fd", "mmd"))]
    final = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else \
        (evals[-1] if evals else {})
    return {"path": run, "name": run.name, "config": cfg, "meta": meta, "final": final, "evals": evals}


def describe(s: dict) -> str:
    cfg, meta = s["config"], s["meta"]
    if meta.get("role") == "student" or "method" in cfg:
        extras = " + ".join(f"{k}={v}" for k, v in (cfg.get("extras") or {}).items())
        steps = (cfg.get("student") or {}).get("steps", meta.get("steps", 1))
        return f"student: {cfg.get('method', meta.get('method'))}{' + ' + extras if extras else ''}, " \
               f"{steps} step(s)"
    data = (cfg.get("data") or {}).get("name", meta.get("data", {}).get("name", "?"))
    return f"teacher on {data}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


# a metric's floors: real vs real, and for latent models real vs VAE-reconstructed (docs/metrics.md)
FLOORS = (("floor", "_floor"), ("vae floor", "_vae_floor"))


def metrics_rows(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in METRICS if any(k in s["final"] for s in summaries)]
    head = ["run", "what", "NFE", "iterations", "wall s"] + keys
    rows = []
    for s in summaries:
        f = s["final"]
        nfe = f.get("nfe") or s["meta"].get("steps") or s["meta"].get("nfe", "")
        row = [s["name"], describe(s), _fmt(nfe),
               _fmt(f.get("iteration", s["meta"].get("iterations", ""))), _fmt(f.get("wall_s", ""))]
        for k in keys:
            cell = _fmt(f[k]) if k in f else ""
            floors = [f"{name} {_fmt(f[k + suffix])}" for name, suffix in FLOORS if k + suffix in f]
            row.append(cell + (f" ({', '.join(floors)})" if floors else ""))
        rows.append(row)
    return head, rows


def _data_of(s: dict) -> str:
    return (s["config"].get("data") or {}).get("name") or s["meta"].get("data", {}).get("name", "?")


def _curve_panel(ax, students, teachers, key, axis, label):
    for s in students:
        pts = [(r[axis], r[key]) for r in s["evals"] if key in r and axis in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=s["name"])
    for t in teachers:  # a teacher is a reference level, not a curve
        if key in t["final"]:
            ax.axhline(t["final"][key], color="C3", ls=":", lw=1,
                       label=f"{t['name']} ({t['final'].get('nfe') or t['meta'].get('nfe', '')} NFE)")
    floor = next((s["final"].get(f"{key}_floor") for s in students + teachers
                  if f"{key}_floor" in s["final"]), None)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=0.8, label="real-vs-real floor")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel(label, fontsize=8)


def plot_curves(summaries: list[dict], out: Path) -> list[str]:
    """Per data set and x-axis (iteration, wall time): one panel per metric, students as curves,
    teachers and the floor as horizontal lines. Returns the file names."""
    from fewstep.report.pictures import _plt

    plt, names = _plt(), []
    for data in sorted({_data_of(s) for s in summaries}):
        group = [s for s in summaries if _data_of(s) == data]
        students = [s for s in group if describe(s).startswith("student") and len(s["evals"]) > 1]
        teachers = [s for s in group if not describe(s).startswith("student")]
        keys = [k for k in CURVES if any(k in r for s in students for r in s["evals"])]
        if not students or not keys:
            continue
        for axis, label in (("iteration", "iteration"), ("wall_s", "wall time (s)")):
            fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.9), dpi=110, squeeze=False)
            for ax, k in zip(axes[0], keys):
                _curve_panel(ax, students, teachers, k, axis, label)
            axes[0][0].legend(fontsize=6)
            fig.suptitle(data, fontsize=10)
            fig.tight_layout()
            name = f"curves_{data}_{axis}.png"
            fig.savefig(out / name)
            plt.close(fig)
            names.append(name)
    return names


def sample_picture(s: dict, out: Path, n_images: int = 64, n_points: int = 2000) -> str | None:
    """Draw samples of a finished run into the report directory; returns the file name."""
    from fewstep.report.pictures import save_samples
    from fewstep.train.generate import load_generator

    if not (s["path"] / "model.json").exists():
        return None
    gen = load_generator(s["path"])
    n = n_images if len(gen.shape) == 3 else n_points
    x, y = gen.sample(n, seed=0)
    name = f"samples_{s['name']}.png"
    save_samples(out / name, x, y, gen)
    return name


def write_report(runs: list[Path], out: Path, title: str = "fewstep report") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summaries = [run_summary(Path(r)) for r in runs]
    head, rows = metrics_rows(summaries)
    pictures = {s["name"]: sample_picture(s, out) for s in summaries}
    curves = plot_curves(summaries, out)
    md, page = _markdown(title, head, rows, summaries, pictures, curves), \
        _html(title, head, rows, summaries, pictures, curves)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page)
    return out / "report.md", out / "report.html"


def _markdown(title, head, rows, summaries, pictures, curves) -> str:
    lines = [f"# {title}", "", "Each metric is shown with its real-vs-real floor at the same sample size "
             "(the best any generator can score; see docs/metrics.md); latent models also show the VAE's "
             "floor (real vs decode(encode(real))).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Samples", ""]
    lines += [f"**{n}**: ![{n}]({p})" for n, p in pictures.items() if p]
    lines += ["", "## Curves", ""] + [f"![{c}]({c})" for c in curves]
    lines += ["", "## Commands (resolved configs)", ""]
    for s in summaries:
        lines += [f"### {s['name']}", "```yaml", yaml.safe_dump(s["config"], sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def _html(title, head, rows, summaries, pictures, curves) -> str:
    esc = html.escape
    table = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    figs = "".join(f'<figure><img src="{esc(p)}" width="320"><figcaption>{esc(n)}</figcaption></figure>'
                   for n, p in pictures.items() if p)
    curve_imgs = "".join(f'<img src="{esc(c)}" style="max-width:100%">' for c in curves)
    configs = "".join(f"<details><summary>{esc(s['name'])}</summary><pre>"
                      f"{esc(yaml.safe_dump(s['config'], sort_keys=False))}</pre></details>"
                      for s in summaries)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px}figure{display:inline-block;"
             "margin:8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body><h1>{esc(title)}</h1><p>Each metric is shown with its "
            f"real-vs-real floor at the same sample size.</p><table>{table}</table><h2>Samples</h2>{figs}"
            f"<h2>Curves</h2>{curve_imgs}<h2>Configs</h2>{configs}</body></html>\n")
