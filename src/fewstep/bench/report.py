"""The benchmark report: one table per data set with every model, its NFE, metrics next to their
floors, training wall time, peak memory and the command that made it (Markdown + HTML)."""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path

from fewstep.bench.runner import Job

COLUMNS = ["fd", "fid", "mmd", "precision", "recall", "coverage", "diversity", "modes_covered",
           "hq_rate", "mode_mass_tv", "class_modes_covered", "class_mode_tv", "samples_per_sec"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def describe(tags: dict) -> str:
    w = f", w={tags['guidance']:g}" if tags.get("guidance", 1) != 1 else ""
    if tags.get("role") == "teacher":
        return f"teacher, {tags.get('sampler', 'heun')}{w}"
    extras = "".join(f" + {k}={v:g}" for k, v in (tags.get("extras") or {}).items())
    extra_tag = f" [{tags['tag']}]" if tags.get("tag") else ""
    return f"{tags['method']}{extras}{extra_tag}{w}"


def eval_rows(jobs: list[Job], records: dict, root: Path) -> dict[str, list[dict]]:
    """Evaluation results grouped by data set, joined with the training job's record."""
    by_data: dict[str, list[dict]] = {}
    for j in jobs:
        path = root / j.name / "eval.json"
        if j.kind != "eval" or not path.exists():
            continue
        m = json.loads(path.read_text())
        train = records.get(j.deps[0], {})
        key = f"{j.tags['data']}{' (class-conditional)' if j.tags.get('conditional') else ''}"
        by_data.setdefault(key, []).append({"job": j, "metrics": m, "train": train})
    return by_data


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in COLUMNS if any(c in r["metrics"] for r in rows)]
    head = ["model", "seed", "NFE"] + cols + ["train wall s", "peak MB", "command"]
    body = []
    for r in rows:
        m, t = r["metrics"], r["train"]
        cells = [describe(r["job"].tags), _fmt(r["job"].tags.get("seed", "")), _fmt(m.get("nfe"))]
        for c in cols:
            cell = _fmt(m.get(c))
            if f"{c}_floor" in m:  # the data floor, and for latent models the VAE's after it
                vae = f", vae {_fmt(m[c + '_vae_floor'])}" if f"{c}_vae_floor" in m else ""
                cell += f" ({_fmt(m[c + '_floor'])}{vae})"
            cells.append(cell)
        cmd = t.get("command", "") if r["job"].tags.get("role") == "student" else \
            f"{t.get('command', '')}; fewstep eval ... --sampler {m.get('sampler', '')}"
        cells += [_fmt(t.get("wall_s")), _fmt(t.get("peak_rss_mb")), cmd]
        body.append(cells)
    return head, body


def write_bench_report(suite: str, jobs: list[Job], records: list[dict], root: Path):
    recs = {r["name"]: r for r in records}
    groups = eval_rows(jobs, recs, root)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# fewstep bench — suite `{suite}`", "", f"Made by `fewstep bench --suite {suite} --out {root}` "
          f"on {stamp}; {len(records)}/{len(jobs)} jobs finished. Metrics show their real-vs-real "
          "floor in parentheses. Wall time and peak memory are of the training job.", ""]
    page = [f"<h1>fewstep bench — suite {html.escape(suite)}</h1><p>{html.escape(md[2])}</p>"]
    for data, rows in groups.items():
        head, body = _table(rows)
        md += [f"## {data}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body] + [""]
        page.append(f"<h2>{html.escape(data)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                    for h in head) + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>"
                    for c in r) + "</tr>" for r in body) + "</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}")
    md_path, html_path = root / f"bench-{suite}.md", root / f"bench-{suite}.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><style>{style}"
                                     f"</style></head><body>{''.join(page)}</body></html>\n")
    return md_path, html_path
