"""Tables stage: the tidy table of every run, the paper-layout tables next to the paper's numbers, the
candidate-count ablation and the per-job benchmark records; each as CSV, Markdown, LaTeX (booktabs) and HTML.

- ``tables metrics``: one row per (model, setting, steps, n_samples): all samples and each first-N subset of
  the metrics file; model, setting and steps come from the metrics file's path
  (``…/metrics/<model>/<setting>/steps<N>.json``), sizes and timings from the quantize stage;
  ``delta_fid_fp`` is FID minus our own FP run's FID (same model, steps, sample count, protocol).
- ``tables paper``: the paper's layout for one model (rows = method x bits, column groups = sampling
  steps, metrics FID sFID IS Precision, plus size and calibration time), every cell as ours / paper /
  Δ (ours - paper), ours at the paper's sample count (``--paper-count``) with "ours (all)" beside it, on all
  samples. Paper numbers come from ``config/paper_results.csv`` matched on (setting,
  resolution, steps); sizes do not depend on resolution or steps and match on setting alone.
- ``tables ablation``: the same layout for the candidate-count ablation (rows = n).
- ``tables benchmarks``: Snakemake's benchmark records of every job (time, memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

METRICS_PATH = re.compile(r"metrics/(?P<model>[^/]+)/(?P<setting>[^/]+)/steps(?P<steps>\d+)\.json$")
INFO_PATH = re.compile(r"quantized/(?P<model>[^/]+)/(?P<setting>[^/]+)\.json$")
COLUMNS = [
    "model", "setting", "method", "bits_per_weight", "n_candidates", "size_mb", "steps", "cfg_scale", "n_samples",
    "fid", "sfid", "is", "precision", "recall", "delta_fid_fp", "block_mse", "file_mb", "quantize_seconds",
    "calibration_seconds", "optimizer_steps",
]
#: display names of the metric columns (arrows: which way is better)
DISPLAY = {"fid": "FID↓", "sfid": "sFID↓", "is": "IS↑", "precision": "Prec.↑", "recall": "Rec.↑"}
#: metrics of the paper's tables, in its column order
PAPER_METRICS = ["fid", "sfid", "is", "precision"]
PAPER_COLUMNS = ["method", "setting", "resolution", "steps", "bits", "size_mb", *PAPER_METRICS, "verified", "source"]
#: look of the HTML tables (the report shows them in a frame)
BODY_STYLE = "font-family: sans-serif; font-size: 12px"
HTML_STYLE = [
    {"selector": "th, td", "props": "padding: 2px 6px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap"},
    {"selector": "caption", "props": "font-weight: bold; font-size: 14px; text-align: left; padding: 4px 0"},
]
#: columns of Snakemake's benchmark records kept in the benchmark table
BENCHMARK_COLUMNS = ["s", "h:m:s", "max_rss", "max_uss", "cpu_time", "mean_load"]


def parse(path: str, pattern: re.Pattern) -> dict:
    """Wildcards encoded in a result path."""
    match = pattern.search(Path(path).as_posix())
    if not match:
        raise ValueError(f"{path}: path does not match {pattern.pattern}")
    return match.groupdict()


def read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from err


def info_row(path: str) -> dict:
    """Size accounting and timings of one quantized model."""
    info, keys = read_json(path), parse(path, INFO_PATH)
    size, setting = info["size"], info["setting"]
    return {
        **keys,
        "method": setting["method"],
        "n_candidates": n_candidates(setting),
        "bits_per_weight": size["bits_per_weight"],
        "size_mb": size["total_mb"],
        "file_mb": info["file_mb"],
        "quantize_seconds": info["quantize_seconds"],
        "block_mse": info["block_mse"],  # null where calibration key block_mse is off
        "calibration_seconds": info.get("calibration_seconds"),
        "optimizer_steps": info.get("optimizer_steps"),  # whole-model calibration steps (the authors' unit)
    }


def n_candidates(setting: dict) -> int | None:
    """Candidate codewords per sub-vector (as ``quantize.quantize_vq`` uses it); None for scalar methods."""
    if setting["method"] == "vq4dit":
        return int(setting.get("n_candidates", 2))
    return 1 if setting["method"].startswith("vq-") else None


def metrics_rows(path: str) -> list[dict]:
    """One row for all samples and one per first-N subset (``subsets`` of the metrics file)."""
    keys, metrics = parse(path, METRICS_PATH), read_json(path)
    subsets = metrics.pop("subsets", [])
    return [{**keys, "steps": int(keys["steps"]), **metrics, **subset} for subset in [{}, *subsets]]


def build_table(metric_paths: list[str], info_paths: list[str], cfg_scale: float) -> pd.DataFrame:
    """Join metrics with quantization info; stable row order (model, sample count, steps, settings as given)."""
    infos = pd.DataFrame([info_row(p) for p in info_paths])
    metrics = pd.DataFrame([row for p in metric_paths for row in metrics_rows(p)])
    table = metrics.merge(infos, on=["model", "setting"], how="left", validate="many_to_one")
    missing = table.loc[table["method"].isna(), "setting"].unique().tolist()
    if missing:
        raise ValueError(f"no quantize info for settings {missing}")
    table["cfg_scale"] = cfg_scale
    run = ["model", "steps", "n_samples"]
    fp_fid = table[table["method"] == "fp"].set_index(run)["fid"]
    table["delta_fid_fp"] = table["fid"] - [fp_fid.get(key, float("nan")) for key in zip(*(table[c] for c in run))]
    order = table["setting"].map({s: i for i, s in enumerate(dict.fromkeys(infos["setting"]))})
    table = table.assign(order=order).sort_values(["model", "n_samples", "steps", "order"], kind="stable").drop(columns="order")
    extra = [c for c in table.columns if c not in COLUMNS]
    return table[COLUMNS + extra].reset_index(drop=True)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-facing columns of the tidy table, rounded, with metric arrows."""
    shown = table[["model", "setting", "method", "bits_per_weight", "size_mb", "file_mb", "steps", "n_samples", *DISPLAY,
                   "delta_fid_fp", "block_mse", "calibration_seconds", "optimizer_steps"]]
    names = {**DISPLAY, "bits_per_weight": "bits/w", "size_mb": "MB", "file_mb": "file MiB", "n_samples": "N",
             "delta_fid_fp": "ΔFID(FP)",
             "block_mse": "block MSE", "calibration_seconds": "calib. s", "optimizer_steps": "calib. steps"}
    return shown.rename(columns=names).round(
        {"bits/w": 2, "MB": 2, "file MiB": 2, "FID↓": 2, "sFID↓": 2, "IS↑": 2, "Prec.↑": 3, "Rec.↑": 3, "ΔFID(FP)": 2, "calib. s": 1}
    )


def read_paper(path: str) -> pd.DataFrame:
    """``config/paper_results.csv``; a missing column or a row without a source is an error naming the file."""
    paper = pd.read_csv(path, dtype={"setting": str, "method": str, "source": str})
    missing = [c for c in PAPER_COLUMNS if c not in paper.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {PAPER_COLUMNS}")
    unsourced = paper.index[paper["source"].isna()].tolist()
    if unsourced:
        raise ValueError(f"{path}: row(s) {[i + 2 for i in unsourced]} have no source")
    return paper


def _paper_lookup(paper: pd.DataFrame, resolution: int | None) -> tuple[dict, dict]:
    """Paper metrics by (setting, steps) at ``resolution`` and paper sizes by setting."""
    rows = paper[paper["setting"].notna()]
    sizes = rows.dropna(subset=["size_mb"]).groupby("setting")["size_mb"].first().to_dict()
    if resolution is None:
        return {}, sizes
    at = rows[(rows["resolution"] == resolution) & rows["steps"].notna()]
    metrics = {(r["setting"], int(r["steps"])): r for r in at.to_dict("records")}
    return metrics, sizes


def at_sample_count(table: pd.DataFrame, count: int | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The rows at sample count ``count`` and, when that is not every sample, the all-samples rows (else None).

    ``count`` None: the all-samples rows only. A run without metrics at ``count`` is an error.
    """
    full = table[table["n_samples"] == table.groupby(["setting", "steps"])["n_samples"].transform("max")]
    if count is None or (full["n_samples"] == count).all():
        return full, None
    at = table[table["n_samples"] == count]
    if len(at) != len(full):
        raise ValueError(f"{len(full) - len(at)} run(s) have no metrics at the paper's sample count {count} "
                         f"(found counts {sorted(table['n_samples'].unique())}); add it to metrics.sample_counts")
    return at, full


def comparison_table(table: pd.DataFrame, paper: pd.DataFrame, resolution: int | None,
                     row_label: str = "setting", paper_count: int | None = None) -> pd.DataFrame:
    """Paper layout of one model's rows: index (row label, method, bits/w), columns (group, quantity, source).

    Column groups: one per sampling step count (FID, sFID, IS, Prec. and ΔFID(FP), each ours / paper / Δ
    where the paper has the metric), then "size" (MB by the paper's convention ours / paper / Δ, and the packed
    file's size on disk) and "calibration" (seconds). "ours" is at ``paper_count`` samples (the first ones)
    when given; then "ours (all)" beside it is on every sample.
    """
    metrics, sizes = _paper_lookup(paper, resolution)
    table, full = at_sample_count(table, paper_count)
    all_samples = None if full is None else full.set_index(["setting", "steps"])
    rows = {}
    for (label, method, bits, setting), group in table.groupby([row_label, "method", "bits_per_weight", "setting"],
                                                                sort=False):
        cells: dict[tuple[str, str, str], float] = {}
        for r in group.to_dict("records"):
            ref, steps = metrics.get((setting, r["steps"]), {}), f"{r['steps']} steps"
            for metric in PAPER_METRICS:
                ours, theirs = r[metric], ref.get(metric, float("nan"))
                cells.update({(steps, DISPLAY[metric], "ours"): ours, (steps, DISPLAY[metric], "paper"): theirs,
                              (steps, DISPLAY[metric], "Δ"): ours - theirs})
                if all_samples is not None:
                    cells[(steps, DISPLAY[metric], "ours (all)")] = all_samples.loc[(setting, r["steps"]), metric]
            cells[(steps, "ΔFID(FP)", "ours")] = r["delta_fid_fp"]
        ours_mb, theirs_mb = group["size_mb"].iloc[0], sizes.get(setting, float("nan"))
        cells.update({("size", "MB", "ours"): ours_mb, ("size", "MB", "paper"): theirs_mb,
                      ("size", "MB", "Δ"): ours_mb - theirs_mb, ("size", "file MiB", "ours"): group["file_mb"].iloc[0],
                      ("calibration", "s", "ours"): group["calibration_seconds"].iloc[0]})
        rows[(label, method, bits)] = cells
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = out.index.set_names([row_label, "method", "bits/w"])
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["group", "quantity", "source"])
    return out


def unmatched_paper_rows(paper: pd.DataFrame, resolution: int | None, settings: list[str]) -> pd.DataFrame:
    """Paper metric rows for this model that no cell can show: no setting, steps or resolution stated.

    Rows at ``resolution`` or with no resolution; rows with a setting only if it is one of ``settings``.
    """
    if resolution is None:
        return paper.iloc[0:0]
    has_metric = paper[PAPER_METRICS].notna().any(axis=1)
    unplaced = paper["setting"].isna() | paper["steps"].isna() | paper["resolution"].isna()
    here = paper["resolution"].isna() | (paper["resolution"] == resolution)
    ours = paper["setting"].isna() | paper["setting"].isin(settings)
    return paper[has_metric & unplaced & here & ours]


def latex_text(text: str) -> str:
    """Header text for LaTeX: the arrows and Δ as math."""
    return str(text).replace("Δ", r"$\Delta$").replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$")


def markdown(table: pd.DataFrame, floatfmt: str) -> str:
    """Markdown of a table, missing values shown as "–" (tabulate only recognises None as missing)."""
    shown = table.astype(object)
    return shown.where(table.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="–")


def html_page(body: str) -> str:
    return f"<html><meta charset='utf-8'><body style='{BODY_STYLE}'>{body}</body></html>\n"


def write_comparison(table: pd.DataFrame, notes: pd.DataFrame, title: str, out: dict[str, str]) -> None:
    """CSV (long form: one row per cell), Markdown, LaTeX (booktabs) and HTML of a comparison table."""
    long = table.stack(["group", "quantity", "source"], future_stack=True).rename("value").reset_index()
    Path(out["csv"]).parent.mkdir(parents=True, exist_ok=True)
    long.to_csv(out["csv"], index=False)
    flat = table.copy()
    flat.columns = [" ".join(c) for c in flat.columns]
    note_lines = [f"- not placed (step count, resolution or setting not stated): paper {r.method}, {r.bits:g} bits, "
                  f"FID {r.fid:g}; source: {r.source}" for r in notes.itertuples(index=False)]
    note_lines.append("- paper cells come from config/paper_results.csv; rows with verified = no there are "
                      "secondary-source numbers not yet checked against the paper's tables")
    note_lines.append("- size (MB), the paper's convention: block linears only; codes, fp32 biases, every fp16 scale and "
                      "zero point (per output row, or per group for GPTQ groups and Q-DiT), a grouped layer's group size "
                      "and act-order column order, and every codebook (GPTVQ's and VQ4DiT's: fp16 in our files, "
                      "fp32 in the paper's count)")
    md = f"### {title}\n\n" + markdown(flat.reset_index(), ".3g")
    Path(out["md"]).write_text(md + "\n\n" + "\n".join(note_lines) + "\n")

    def styled():  # Styler methods modify the Styler in place: one per output
        return table.style.format(precision=2, na_rep="--").format_index(lambda v: f"{v:g}", level=2, axis=0)

    latex = styled().format_index(latex_text, axis=1)
    Path(out["tex"]).write_text(latex.to_latex(hrules=True, multicol_align="c", caption=title))
    html = styled().set_caption(title).set_table_styles(HTML_STYLE).to_html()
    notes_html = "".join(f"<li>{line[2:]}</li>" for line in note_lines)
    Path(out["html"]).write_text(html_page(f"{html}<ul>{notes_html}</ul>"))


def benchmark_table(root: str) -> pd.DataFrame:
    """One row per Snakemake benchmark record (``*.tsv`` below ``root``): job, wall time, memory, CPU time.

    Reads the folder rather than a file list: records are written by Snakemake after each job, so the
    rule running this waits for the other final outputs instead of naming their records.
    """
    paths = sorted(Path(root).rglob("*.tsv"))
    if not paths:
        raise ValueError(f"{root}: no Snakemake benchmark records (*.tsv)")
    records = []
    for path in paths:
        record = pd.read_csv(path, sep="\t")
        missing = [c for c in BENCHMARK_COLUMNS if c not in record.columns]
        if missing:
            raise ValueError(f"{path}: not a Snakemake benchmark record (missing {missing})")
        job = Path(path).relative_to(root).with_suffix("").as_posix()
        records.append(record[BENCHMARK_COLUMNS].iloc[[-1]].assign(job=job))
    table = pd.concat(records, ignore_index=True)[["job", *BENCHMARK_COLUMNS]]
    return table.sort_values("s", ascending=False, kind="stable").reset_index(drop=True)


def write_plain(table: pd.DataFrame, title: str, out: dict[str, str], latex_fmt: dict | None = None) -> None:
    """Markdown, LaTeX and HTML of a flat table (the CSV is the caller's: it may keep more columns)."""
    Path(out["md"]).parent.mkdir(parents=True, exist_ok=True)
    Path(out["md"]).write_text(markdown(table, ".4g") + "\n")
    styler = table.rename(columns=latex_text).style.hide(axis="index").format(precision=2, na_rep="--")
    for column, fmt in (latex_fmt or {}).items():
        styler = styler.format(fmt, subset=[column], na_rep="--")
    Path(out["tex"]).write_text(styler.to_latex(hrules=True))
    html = (table.style.hide(axis="index").format(lambda v: f"{v:.4g}" if isinstance(v, float) else v, na_rep="–")
            .set_caption(title).set_table_styles(HTML_STYLE).to_html())
    Path(out["html"]).write_text(html_page(html))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="table", required=True)
    for name, help_text in (("metrics", "every run in one tidy table"),
                            ("paper", "one model's runs in the paper's layout"),
                            ("ablation", "the candidate-count ablation of one model (rows = n)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--metrics", nargs="+", required=True, help="metrics JSONs (…/metrics/<model>/<setting>/stepsN.json)")
        p.add_argument("--infos", nargs="+", required=True, help="quantize info JSONs (…/quantized/<model>/<setting>.json)")
        p.add_argument("--cfg-scale", type=float, required=True)
        if name != "metrics":
            p.add_argument("--paper", required=True, help="config/paper_results.csv")
            p.add_argument("--resolution", type=int, help="the paper's resolution of this model (none: no paper cells)")
            p.add_argument("--runs", help="also write this model's runs (at --paper-count) as a tidy CSV here")
            p.add_argument("--paper-count", type=int,
                           help="sample count of the paper's numbers: ours at it beside the paper's, all samples beside")
    p = sub.add_parser("benchmarks", help="Snakemake's per-job benchmark records")
    p.add_argument("--records", required=True, help="folder of the records (results/<preset>/benchmarks)")
    for p in sub.choices.values():
        for fmt in ("csv", "md", "tex", "html"):
            p.add_argument(f"--{fmt}", required=True)
        p.add_argument("--notice", default="", help="warning put on every output (rehearsal: random weights)")


def add_notice(out: dict[str, str], notice: str) -> None:
    """Put ``notice`` on the written table: a CSV column, a bold line above the Markdown, LaTeX and HTML."""
    csv = pd.read_csv(out["csv"])
    csv.insert(0, "notice", notice)
    csv.to_csv(out["csv"], index=False)
    for fmt, line in (("md", f"**{notice}**\n\n"), ("tex", f"\\textbf{{{latex_text(notice)}}}\n\n")):
        Path(out[fmt]).write_text(line + Path(out[fmt]).read_text())
    banner = f"<p style='color: firebrick'><b>{notice}</b></p>"
    Path(out["html"]).write_text(re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + banner, Path(out["html"]).read_text(), count=1))


def run(args: argparse.Namespace) -> None:
    out = {fmt: getattr(args, fmt) for fmt in ("csv", "md", "tex", "html")}
    write_table(args, out)
    if args.notice:
        add_notice(out, args.notice)


def write_table(args: argparse.Namespace, out: dict[str, str]) -> None:
    if args.table == "benchmarks":
        records = benchmark_table(args.records)
        write_plain(records, "Per-job benchmark records (Snakemake)", out)
        records.to_csv(out["csv"], index=False)
        log.info("wrote %s", ", ".join(out.values()))
        return
    table = build_table(args.metrics, args.infos, args.cfg_scale)
    if args.table == "metrics":
        write_plain(display_table(table), "All runs", out, {"block MSE": "{:.2e}"})
        table.to_csv(out["csv"], index=False)  # every column, unrounded
        log.info("wrote %s", ", ".join(out.values()))
        return
    models = table["model"].unique().tolist()
    if len(models) != 1:
        raise ValueError(f"--metrics must belong to one model, got {models}")
    if args.runs:  # the trade-off plot's input: the runs at the count set beside the paper's points
        Path(args.runs).parent.mkdir(parents=True, exist_ok=True)
        at_sample_count(table, args.paper_count)[0].to_csv(args.runs, index=False)
    row_label = "setting"
    if args.table == "ablation":  # FP rows only serve ΔFID(FP)
        table, row_label = table[table["method"] != "fp"].assign(n=table["n_candidates"]), "n"
        if table["n"].isna().any():
            raise ValueError(f"ablation rows must be VQ settings; got {table.loc[table['n'].isna(), 'setting'].unique()}")
        table = table.assign(n=table["n"].astype(int)).sort_values(["n", "steps"], kind="stable")
    paper = read_paper(args.paper)
    title = (models[0] + (f" ({args.resolution}×{args.resolution})" if args.resolution else "")
             + (": candidate-count ablation" if args.table == "ablation" else ": ours vs the paper"))
    if args.paper_count and args.paper_count < table["n_samples"].max():
        title += f"; ours at the first {args.paper_count} samples, ours (all) at {table['n_samples'].max()}"
    write_comparison(comparison_table(table, paper, args.resolution, row_label, args.paper_count),
                     unmatched_paper_rows(paper, args.resolution, table["setting"].unique().tolist()), title, out)
    log.info("wrote %s", ", ".join(out.values()))
