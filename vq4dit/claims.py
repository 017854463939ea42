"""Claims stage: one verdict per claim of the paper that this preset can test, each with its evidence.

``results/<preset>/claims.{csv,md,html}``: one row per (claim, scope), with our numbers (rows of
``tables/metrics.csv`` and the quantize infos; ``claims-baselines.*`` of the ``baselines`` target also
reads ``tables/baselines.csv``, for presets whose baselines run outside the main settings), the paper's
number and its source, the rule that decides and a verdict: **holds**, **does not hold**, **not run**
(this preset has no run that could test it) or **not comparable** (the paper's number is an unverified
secondary reading or lacks its step count, the preset's model is a proxy for DiT-XL/2, no seed spread is recorded, …). Nothing is
hard-coded but the paper's own statements (``PAPER``, each with its source); every number of ours is
read from the run's files.

The noise the rules use is the **seed spread** of the preset, ``config/seed_spread/<preset>.csv``
(``benchmarks/seed_variation.py`` writes it: the same models sampled with several seeds; per model,
setting, steps, sample count N and metric, the standard deviation σ over seeds):

- an ordering "A better than B" **holds** when its margin (FID(B) − FID(A), at all samples) exceeds
  ``Z`` = 2 standard deviations of the difference, ``Z·sqrt(σ_A² + σ_B²)``; otherwise it does not hold
  (reversed beyond that, or within it: not shown);
- an absolute number agrees with the paper's when ``|ours − paper| ≤ Z·√2·σ`` at the paper's sample
  count (two independent estimates at N samples each: ours, and the paper's);
- sizes agree to the paper's printed precision (±0.005 MB); the calibration time is judged only for
  DiT-XL/2 on a GPU with the authors' 50,000-step budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pandas as pd

from vq4dit import size
from vq4dit.tables import HTML_STYLE, INFO_PATH, html_page, markdown, parse, read_json, read_paper

log = logging.getLogger(__name__)

VERDICTS = ("holds", "does not hold", "not run", "not comparable")
#: standard deviations of the noise a margin must exceed
Z = 2.0
#: size tolerance: the paper prints MB with two decimals
SIZE_TOLERANCE_MB = 0.005
#: the paper's model; sizes are computed for it from shapes alone
PAPER_ARCH = "DiT-XL/2"
#: metrics of config/paper_results.csv judged as absolute numbers
PAPER_METRICS = ("fid", "sfid", "is", "precision")
#: the paper's statements that are not table cells (each with where it is stated)
PAPER = {
    "calibration_time": (20 * 60, 5 * 3600, "abstract (arXiv 2408.17131 v1, checked): 'on a single NVIDIA A100 GPU "
                                            "within 20 minutes to 5 hours depending on the different quantization settings'"),
    "calibration_steps": (50_000, "the authors' loop: 1000 outer iterations x 50 sampling steps, one optimiser step "
                                  "per sampling step (dengjuncan/VQ4DiT at 104c62c, sample_quant.py line 138 and "
                                  "gaussian_diffusion.py ≈ lines 605-725; not checked against the PDF)"),
    "scalar_collapse": "scalar 2-bit baselines (GPTQ, RepQ-ViT, Q-DiT) collapse: FID > 48, 'over 300' (secondary "
                       "reading of arXiv 2408.17131's 2-bit rows; not in config/paper_results.csv)",
    "codebook_vs_kmeans": "calibrating the codebook improves on k-means VQ without calibration (the paper's motivation; "
                          "no number of it in config/paper_results.csv)",
    "vq4dit_vs_gptvq": "not a claim of the paper (no VQ4DiT paper compares against GPTVQ): our question, issue 18",
    "w3_gap": "at 3 bits VQ4DiT is about 5-6 FID above full precision (secondary reading of arXiv 2408.17131's "
              "3-bit rows; not in config/paper_results.csv)",
}
#: the FID above which the paper's scalar 2-bit baselines count as collapsed (the lowest it reports, PAPER["scalar_collapse"])
COLLAPSE_FID = 48.0
#: what makes a row of a tidy table one run
RUN_KEYS = ["model", "setting", "steps", "n_samples"]
COLUMNS = ["id", "claim", "scope", "verdict", "evidence", "paper", "rule", "ours", "paper_value", "margin", "threshold"]


# --- inputs -------------------------------------------------------------------------------------------


def read_settings_table(path: str) -> pd.DataFrame:
    """``config/settings.tsv`` with bits per weight and candidate count per row (``bpw``, ``n``)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except OSError as err:
        raise OSError(f"{path}: cannot read the settings table ({err})") from err
    missing = [c for c in ("id", "method") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    for column in ("bits", "k", "d", "n_candidates"):
        table[column] = pd.to_numeric(table.get(column, ""), errors="coerce")
    vq = table["k"].notna() & table["d"].notna()
    table["scalar"] = table["bits"].notna() & ~vq
    table["bpw"] = table["bits"].where(~vq, (table["k"].apply(math.log2) / table["d"]).where(vq))
    table["n"] = table["n_candidates"].where(table["method"] == "vq4dit", 1).where(vq)
    table.loc[(table["method"] == "vq4dit") & table["n"].isna(), "n"] = 2  # quantize.quantize_vq's default
    return table.set_index("id", drop=False)


def read_spread(path: str | None) -> pd.DataFrame | None:
    """The preset's seed-spread record (None when the preset has none)."""
    if not path:
        return None
    spread = pd.read_csv(path, comment="#")
    needed = ["model", "setting", "steps", "n_samples", "metric", "seeds", "std"]
    missing = [c for c in needed if c not in spread.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected a record of benchmarks/seed_variation.py")
    spread.attrs["path"] = path
    return spread.set_index(["model", "setting", "steps", "n_samples", "metric"]).sort_index()


def info_table(paths: list[str]) -> pd.DataFrame:
    """One row per quantize info: model, setting, timings and what the job recorded about its device."""
    rows = []
    for path in paths:
        info, keys = read_json(path), parse(path, INFO_PATH)
        env = info.get("environment", {})
        rows.append({**keys, "quantize_seconds": info.get("quantize_seconds"),
                     "calibration_seconds": info.get("calibration_seconds"),
                     "optimizer_steps": info.get("optimizer_steps"),
                     "device": info.get("device") or env.get("device"),
                     "device_name": env.get("device_name"), "precision": info.get("precision"),
                     "size_mb": info.get("size", {}).get("total_mb"), "path": path})
    return pd.DataFrame(rows, columns=["model", "setting", "quantize_seconds", "calibration_seconds", "optimizer_steps",
                                       "device", "device_name", "precision", "size_mb", "path"])


def read_tidy(paths: list[str]) -> pd.DataFrame:
    """The tidy tables of the tables stage in one, each run once (the first table's row where they overlap)."""
    tables = []
    for path in paths:
        try:
            table = pd.read_csv(path)
        except OSError as err:
            raise OSError(f"{path}: cannot read the metrics table ({err})") from err
        missing = [c for c in RUN_KEYS + ["fid"] if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected a tidy table of the tables stage "
                             "(tables/metrics.csv or tables/baselines.csv)")
        tables.append(table)
    metrics = pd.concat(tables, ignore_index=True).drop_duplicates(RUN_KEYS)
    metrics.attrs["source"] = " + ".join("tables/" + Path(p).name for p in paths)
    return metrics


class Evidence:
    """The run's files and the preset's config, with lookups the rules share."""

    def __init__(self, metrics: pd.DataFrame, infos: pd.DataFrame, settings: pd.DataFrame, paper: pd.DataFrame,
                 spread: pd.DataFrame | None, config: dict):
        self.metrics, self.infos, self.settings, self.paper, self.spread = metrics, infos, settings, paper, spread
        #: the tidy tables the metrics come from (named in every evidence)
        self.source = metrics.attrs.get("source", "tables/metrics.csv")
        self.config = config
        counts = config.get("metrics", {}).get("sample_counts") or []
        #: the preset's stand-in for the paper's 10k samples: the first of metrics.sample_counts, else all samples
        self.paper_count = counts[0] if counts else config["sampling"]["n_samples"]
        self.models = config["models"]

    def select(self, **conditions) -> list[str]:
        """Setting ids of the settings table matching every condition (column == value)."""
        rows = self.settings
        for column, value in conditions.items():
            rows = rows[rows[column] == value]
        return rows.index.tolist()

    def runs(self, setting: str) -> pd.DataFrame:
        return self.metrics[self.metrics["setting"] == setting]

    def value(self, model: str, setting: str, steps: int, n: int, metric: str = "fid") -> float | None:
        row = self.metrics[(self.metrics["model"] == model) & (self.metrics["setting"] == setting)
                           & (self.metrics["steps"] == steps) & (self.metrics["n_samples"] == n)]
        return None if row.empty else float(row[metric].iloc[0])

    def sigma(self, model: str, setting: str, steps: int, n: int, metric: str = "fid") -> float | None:
        if self.spread is None:
            return None
        try:
            return float(self.spread.loc[(model, setting, steps, n, metric), "std"])
        except KeyError:
            return None

    def spread_source(self) -> str:
        if self.spread is None:
            return "no seed spread recorded for this preset"
        seeds = sorted(set(self.spread["seeds"].astype(str)))
        return f"seed spread {self.spread.attrs['path']} (seeds {', '.join(seeds)})"

    def paper_fid(self, setting: str) -> str:
        """The paper's FID numbers of a setting with their rows' verification state."""
        rows = self.paper[(self.paper["setting"] == setting) & self.paper["fid"].notna()]
        return "; ".join(f"{setting} FID {r.fid:g} ({int(r.resolution) if pd.notna(r.resolution) else '?'} px, "
                         f"verified: {r.verified})" for r in rows.itertuples()) or f"no FID of {setting}"


def text(value) -> str:
    """A table cell as text; missing (None, NaN) as ''."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def row(id_: str, claim: str, scope: str, verdict: str, evidence: str, paper: str, rule: str, **numbers) -> dict:
    assert verdict in VERDICTS, verdict
    return {"id": id_, "claim": claim, "scope": scope, "verdict": verdict, "evidence": evidence, "paper": paper,
            "rule": rule, **numbers}


# --- rules --------------------------------------------------------------------------------------------


def ordering(ev: Evidence, id_: str, claim: str, better: list[str], worse: list[str], what: str, paper: str) -> list[dict]:
    """``better`` has a lower FID than ``worse`` by more than the seed noise, per (model, steps) where both ran."""
    rule = f"holds if FID(worse) - FID(better) > {Z:g}·sqrt(σ_better² + σ_worse²) (σ: seed spread), at all samples"
    if not better or not worse:
        missing = what.split(" vs ")[0 if not better else 1]
        return [row(id_, claim, "–", "not run", f"no {missing} setting in the settings table", paper, rule)]
    out = []
    for a in better:
        for b in worse:
            both = ev.runs(a).merge(ev.runs(b), on=["model", "steps", "n_samples"], suffixes=("_a", "_b"))
            if both.empty:
                ran = [s for s in (a, b) if not ev.runs(s).empty]
                elsewhere = [s for s in (a, b) if s in ev.config.get("baseline_settings", []) and s not in ran]
                where = f"; the `baselines` target runs {', '.join(elsewhere)}: claims-baselines.*" if elsewhere else ""
                out.append(row(f"{id_}", claim, "–", "not run",
                               f"{a} vs {b}: {'only ' + ran[0] + ' ran' if ran else 'neither ran'} in this preset "
                               f"(not at a common model and step count){where}", paper, rule))
                continue
            full = both[both["n_samples"] == both.groupby(["model", "steps"])["n_samples"].transform("max")]
            for r in full.itertuples():
                out.append(compare_pair(ev, id_, claim, a, b, r.model, int(r.steps), int(r.n_samples),
                                        float(r.fid_a), float(r.fid_b), paper, rule))
    return out


def compare_pair(ev, id_, claim, a, b, model, steps, n, fid_a, fid_b, paper, rule) -> dict:
    scope = f"{model}, {steps} steps, N={n}"
    margin = fid_b - fid_a
    evidence = f"FID {a} {fid_a:.2f}, {b} {fid_b:.2f} ({ev.source}); margin {margin:.2f}"
    sigmas = [ev.sigma(model, s, steps, n) for s in (a, b)]
    if None in sigmas:
        missing = [s for s, sigma in zip((a, b), sigmas) if sigma is None]
        return row(id_, claim, scope, "not comparable",
                   f"{evidence}; no seed spread for {missing} at ({model}, {steps} steps, N={n}): {ev.spread_source()}",
                   paper, rule, ours=margin, margin=margin)
    threshold = Z * math.hypot(*sigmas)
    if margin > threshold:
        verdict, how = "holds", "exceeds"
    else:
        verdict, how = "does not hold", ("reversed beyond" if margin < -threshold else "within")
    evidence += f" {how} the noise {threshold:.2f} (σ {sigmas[0]:.2f}, {sigmas[1]:.2f}; {ev.spread_source()})"
    return row(id_, claim, scope, verdict, evidence, paper, rule, ours=margin, margin=margin, threshold=threshold)


def w2_claims(ev: Evidence) -> list[dict]:
    vq4dit = ev.select(method="vq4dit", bpw=2.0, n=2.0)
    codebook = ev.select(method="vq-codebook", bpw=2.0)
    kmeans = ev.select(method="vq-kmeans", bpw=2.0)
    n3 = ev.select(method="vq4dit", bpw=2.0, n=3.0)
    scalar = ev.settings[ev.settings["scalar"] & (ev.settings["bits"] == 2)]
    rows = ordering(ev, "w2: VQ4DiT < codebook-only", "At 2 bits, calibrating candidate assignments (VQ4DiT, n = 2) "
                    "beats codebook-only calibration (n = 1)", vq4dit, codebook, "VQ4DiT 2-bit n = 2 vs codebook-only 2-bit",
                    f"paper: {ev.paper_fid(vq4dit[0]) if vq4dit else '–'}; {ev.paper_fid(codebook[0]) if codebook else '–'}")
    rows += ordering(ev, "w2: codebook-only < k-means", "At 2 bits, codebook calibration beats k-means VQ without "
                     "calibration", codebook, kmeans, "codebook-only 2-bit vs k-means 2-bit", PAPER["codebook_vs_kmeans"])
    shared = scalar["method"].duplicated(keep=False)  # a method with several 2-bit settings: named by setting
    names = {setting: setting if several else method
             for setting, method, several in zip(scalar.index, scalar["method"], shared)}
    for setting, name in names.items():
        rows += ordering(ev, f"w2: {name} worse than VQ4DiT", f"At 2 bits, scalar {scalar.loc[setting, 'method']} is "
                         f"behind VQ4DiT ({setting} worse than VQ4DiT 2-bit beyond the noise)", vq4dit, [setting],
                         f"VQ4DiT 2-bit n = 2 vs {setting}", PAPER["scalar_collapse"])
    rows += collapse_claims(ev, names)
    gptvq = ev.select(method="gptvq", bpw=2.0)
    rows += ordering(ev, "w2: VQ4DiT < GPTVQ", "At 2 bits, calibrating candidate assignments (VQ4DiT) beats "
                     "Hessian-aware VQ (GPTVQ) at the same k and d", vq4dit, gptvq, "VQ4DiT 2-bit n = 2 vs GPTVQ 2-bit",
                     PAPER["vq4dit_vs_gptvq"])
    rows += ordering(ev, "ablation: n = 3 < n = 2", "A third candidate helps slightly (n = 3 better than n = 2 at 2 bits)",
                     n3, vq4dit, "VQ4DiT 2-bit n = 3 vs VQ4DiT 2-bit n = 2",
                     f"paper: {ev.paper_fid(n3[0]) if n3 else '–'}; {ev.paper_fid(vq4dit[0]) if vq4dit else '–'}")
    return rows


def collapse_claims(ev: Evidence, names: dict[str, str]) -> list[dict]:
    """The paper's collapse of each scalar 2-bit setting (``names``: setting -> claim name): FID above
    COLLAPSE_FID at the paper's sample count, judged on real weights only (a proxy model's FID is not comparable)."""
    claim, rule = "At 2 bits, scalar {} collapses as in the paper", f"holds if FID > {COLLAPSE_FID:g} (the paper's scale)"
    if not names:
        return [row("w2: scalar collapses", claim.format("quantization"), "–", "not run",
                    "no scalar 2-bit setting in the settings table", PAPER["scalar_collapse"], rule)]
    out = []
    for setting, name in names.items():
        id_, text = f"w2: {name} collapses", claim.format(f"{name} ({setting})")
        runs = ev.runs(setting)
        runs = runs[runs["n_samples"] == ev.paper_count]
        if runs.empty:
            out.append(row(id_, text, "–", "not run", f"{setting} not run at N={ev.paper_count} in this preset",
                           PAPER["scalar_collapse"], rule))
        for r in runs.itertuples():
            scope, fid = f"{r.model}, {r.steps} steps, N={r.n_samples}", float(r.fid)
            evidence = f"FID {setting} {fid:.2f} ({ev.source})"
            if reasons := comparability(ev, r.model):
                out.append(row(id_, text, scope, "not comparable", f"{evidence}; " + "; ".join(reasons),
                               PAPER["scalar_collapse"], rule, ours=fid))
                continue
            out.append(row(id_, text, scope, "holds" if fid > COLLAPSE_FID else "does not hold", evidence,
                           PAPER["scalar_collapse"], rule, ours=fid, paper_value=COLLAPSE_FID,
                           margin=fid - COLLAPSE_FID, threshold=0.0))
    return out


def w3_gap(ev: Evidence) -> list[dict]:
    """Our ΔFID(FP) at 3 bits against the paper's (its FP and 3-bit FID from config/paper_results.csv)."""
    claim = "At 3 bits VQ4DiT stays close to full precision (its FID gap to FP as in the paper)"
    rule = f"holds if |ΔFID(FP) ours - paper| ≤ {Z:g}·√2·sqrt(σ_w3² + σ_fp²) at the paper's sample count"
    w3, fp = ev.select(method="vq4dit", bpw=3.0, n=2.0), ev.select(method="fp")
    if not w3 or not fp:
        return [row("w3: gap to FP", claim, "–", "not run", "no 3-bit VQ4DiT or FP setting in the settings table",
                    PAPER["w3_gap"], rule)]
    both = ev.runs(w3[0]).merge(ev.runs(fp[0]), on=["model", "steps", "n_samples"], suffixes=("_q", "_fp"))
    both = both[both["n_samples"] == ev.paper_count]
    if both.empty:
        return [row("w3: gap to FP", claim, "–", "not run", f"{w3[0]} and {fp[0]} not both run at N={ev.paper_count}",
                    PAPER["w3_gap"], rule)]
    out = []
    for r in both.itertuples():
        gap = float(r.fid_q - r.fid_fp)
        scope = f"{r.model}, {r.steps} steps, N={r.n_samples}"
        evidence = f"FID {w3[0]} {r.fid_q:.2f} - {fp[0]} {r.fid_fp:.2f} = ΔFID(FP) {gap:.2f} ({ev.source})"
        resolution = ev.models[r.model].get("paper_resolution")
        paper_gap, source = paper_difference(ev.paper, w3[0], fp[0], resolution, r.steps)
        reasons = comparability(ev, r.model)
        if paper_gap is None:
            reasons.append(f"the paper's FP and 3-bit FID at {resolution or '?'} px, {r.steps} steps are not in "
                           "config/paper_results.csv")
        sigmas = [ev.sigma(r.model, s, r.steps, r.n_samples) for s in (w3[0], fp[0])]
        if None in sigmas:
            reasons.append(ev.spread_source() if ev.spread is None else "no seed spread for these runs")
        if reasons:
            out.append(row("w3: gap to FP", claim, scope, "not comparable", f"{evidence}; " + "; ".join(reasons),
                           source or PAPER["w3_gap"], rule, ours=gap))
            continue
        threshold = Z * math.sqrt(2) * math.hypot(*sigmas)
        verdict = "holds" if abs(gap - paper_gap) <= threshold else "does not hold"
        out.append(row("w3: gap to FP", claim, scope, verdict, f"{evidence}; |Δ| {abs(gap - paper_gap):.2f} vs "
                       f"tolerance {threshold:.2f}", source, rule, ours=gap, paper_value=paper_gap,
                       margin=abs(gap - paper_gap), threshold=threshold))
    return out


def paper_difference(paper: pd.DataFrame, setting: str, reference: str, resolution, steps) -> tuple[float | None, str]:
    """Paper FID(setting) - FID(reference) at (resolution, steps), verified rows only, with the rows' sources."""
    at = paper[(paper["resolution"] == resolution) & (paper["steps"] == steps) & paper["fid"].notna()
               & (paper["verified"] == "yes")].set_index("setting")
    if setting not in at.index or reference not in at.index:
        return None, ""
    return (float(at.loc[setting, "fid"] - at.loc[reference, "fid"]),
            f"paper: {setting} {at.loc[setting, 'fid']:g}, {reference} {at.loc[reference, 'fid']:g} "
            f"({at.loc[setting, 'source']})")


def comparability(ev: Evidence, model: str) -> list[str]:
    """Why a model's absolute numbers cannot stand next to the paper's (empty: they can)."""
    spec = ev.models[model]
    if not spec.get("paper_resolution"):
        return [f"{model} is a proxy model (no paper_resolution): its FID says nothing about DiT-XL/2's"]
    if ev.config.get("notice"):
        return [ev.config["notice"]]
    return []


def size_claims(ev: Evidence) -> list[dict]:
    """The paper's sizes (config/paper_results.csv size_mb) against vq4dit.size for DiT-XL/2's shapes."""
    rule = f"holds if |ours - paper| ≤ {SIZE_TOLERANCE_MB} MB (the paper prints two decimals)"
    shapes = size.dit_block_linear_shapes(PAPER_ARCH)
    rows = ev.paper[ev.paper["size_mb"].notna() & ev.paper["setting"].notna()].drop_duplicates(["setting", "size_mb"])
    out = []
    for r in rows.itertuples():
        claim = f"{r.method} ({r.setting}) of {PAPER_ARCH} is {r.size_mb:g} MB by the paper's convention"
        paper = f"paper: {r.size_mb:g} MB (config/paper_results.csv, verified: {r.verified}; {r.source})"
        if r.setting not in ev.settings.index:
            out.append(row(f"size: {r.setting}", claim, PAPER_ARCH, "not run", f"{r.setting} is not in the settings table",
                           paper, rule))
            continue
        setting = ev.settings.loc[r.setting]
        if setting["method"] == "fp":
            ours, how = size.fp_size(shapes), "fp32 weights and biases"
        elif pd.notna(setting["k"]):
            ours, how = size.vq_size(shapes, int(setting["k"]), int(setting["d"]), codebook_bits=32), \
                "fp32 codebooks, as the paper counts them (our packed files store fp16 ones)"
        else:
            ours, how = size.scalar_size(shapes, int(setting["bits"])), "per-row scale and zero point"
        mb = ours["total_mb"]
        evidence = (f"{mb:.3f} MB from {PAPER_ARCH}'s shapes (vq4dit/size.py, {how}; "
                    f"`python -m vq4dit size --arch {PAPER_ARCH}`)")
        run = ev.infos[(ev.infos["setting"] == r.setting) & ev.infos["model"].map(
            lambda m: ev.models.get(m, {}).get("arch") == PAPER_ARCH)]
        if not run.empty:
            evidence += f"; this run's quantize info: {run['size_mb'].iloc[0]:.3f} MB ({run['path'].iloc[0]})"
        verdict = "holds" if abs(mb - r.size_mb) <= SIZE_TOLERANCE_MB else "does not hold"
        out.append(row(f"size: {r.setting}", claim, PAPER_ARCH, verdict, evidence, paper, rule, ours=mb,
                       paper_value=float(r.size_mb), margin=abs(mb - r.size_mb), threshold=SIZE_TOLERANCE_MB))
    return out


def calibration_time(ev: Evidence) -> list[dict]:
    """Quantize time (k-means + calibration) of every calibrated setting, per model, against 20 min to 5 h."""
    low, high, source = PAPER["calibration_time"]
    budget, budget_source = PAPER["calibration_steps"]
    claim = f"VQ4DiT quantizes {PAPER_ARCH} on one GPU in {low // 60} minutes to {high // 3600} hours"
    rule = (f"holds if every calibrated setting's quantize time ≤ {high // 3600} h, judged only for {PAPER_ARCH} on a "
            f"GPU at the authors' budget ({budget:,} optimiser steps)")
    calibrated = ev.infos[ev.infos["calibration_seconds"].notna()]
    if calibrated.empty:
        return [row("calibration time", claim, "–", "not run", "no calibrated setting in this preset", source, rule)]
    calibration = ev.config.get("calibration", {})
    steps_cfg = calibration.get("outer_iterations", 1000) * calibration.get("steps", 50)
    out = []
    for model, group in calibrated.groupby("model", sort=False):
        hours = group["quantize_seconds"] / 3600
        evidence = "; ".join(
            f"{r.setting} {r.quantize_seconds / 60:.1f} min (calibration {r.calibration_seconds / 60:.1f} min"
            + (f", {int(r.optimizer_steps):,} optimiser steps" if pd.notna(r.optimizer_steps) else "")
            + (f", {text(r.precision)}" if text(r.precision) else "")
            + f") on {text(r.device_name) or text(r.device) or 'a device not recorded'}" for r in group.itertuples())
        steps = group["optimizer_steps"].dropna()
        steps_run = int(steps.min()) if not steps.empty else steps_cfg
        reasons = []
        if ev.models[model].get("arch") != PAPER_ARCH:
            reasons.append(f"{model} is not {PAPER_ARCH}")
        devices = set(group["device"].dropna().astype(str))
        if not devices or not all(d.startswith("cuda") for d in devices):
            reasons.append(f"not run on a GPU (device {', '.join(sorted(devices)) or 'not recorded'})")
        if steps_run is None or steps_run < budget:
            reasons.append(f"calibration budget {steps_run if steps_run is not None else '?'} steps "
                           f"(optimizer_steps of the infos, else calibration.outer_iterations x steps) < the authors' {budget:,} "
                           f"({budget_source})")
        scope = f"{model}, {len(group)} calibrated setting(s)"
        if reasons:
            out.append(row("calibration time", claim, scope, "not comparable", f"{evidence}; " + "; ".join(reasons),
                           source, rule, ours=float(hours.max())))
            continue
        verdict = "holds" if hours.max() <= high / 3600 else "does not hold"
        names = {text(n) for n in group["device_name"]} - {""}
        note = "" if any("A100" in n for n in names) else f" (on {', '.join(sorted(names)) or 'a GPU'}, not an A100)"
        out.append(row("calibration time", claim, scope, verdict, evidence + note, source, rule,
                       ours=float(hours.max()), paper_value=high / 3600, margin=float(high / 3600 - hours.max()),
                       threshold=high / 3600))
    return out


def paper_numbers(ev: Evidence) -> list[dict]:
    """Each metric cell of config/paper_results.csv against ours at the paper's sample count."""
    out = []
    paper_models = {m: s["paper_resolution"] for m, s in ev.models.items() if s.get("paper_resolution")}
    for r in ev.paper.to_dict("records"):
        for metric in PAPER_METRICS:
            if pd.isna(r[metric]):
                continue
            out.append(paper_number(ev, r, metric, paper_models))
    return out


def paper_number(ev: Evidence, r: dict, metric: str, paper_models: dict) -> dict:
    resolution = int(r["resolution"]) if pd.notna(r["resolution"]) else None
    steps = int(r["steps"]) if pd.notna(r["steps"]) else None
    setting = r["setting"] if isinstance(r["setting"], str) else None
    id_ = f"paper: {setting or r['method']} {metric}" + (f" @{resolution}" if resolution else "")
    claim = (f"{r['method']} at {resolution or '?'} px, {steps or '?'} steps: {metric.upper() if metric != 'is' else 'IS'} "
             f"{r[metric]:g}")
    paper = f"paper: {r[metric]:g} (config/paper_results.csv, verified: {r['verified']}; {r['source']})"
    rule = f"agrees if |ours - paper| ≤ {Z:g}·√2·σ at N={ev.paper_count} (σ: seed spread at that count)"
    if not paper_models:
        models = ", ".join(ev.models)
        return row(id_, claim, models, "not comparable", f"this preset's model(s) ({models}) are proxies "
                   "(no paper_resolution): their numbers say nothing about DiT-XL/2's", paper, rule)
    models = [m for m, res in paper_models.items() if resolution is None or res == resolution]
    if not models:
        return row(id_, claim, "–", "not run", f"no model at {resolution} px in this preset", paper, rule)
    if setting is None or setting not in set(ev.metrics["setting"]):
        return row(id_, claim, ", ".join(models), "not run",
                   f"{setting or r['method']} is not one of this preset's runs", paper, rule)
    runs = ev.metrics[ev.metrics["model"].isin(models) & (ev.metrics["setting"] == setting)
                      & (ev.metrics["n_samples"] == ev.paper_count)]
    if steps is not None:
        runs = runs[runs["steps"] == steps]
        if runs.empty:
            return row(id_, claim, ", ".join(models), "not run", f"{setting} was not sampled at {steps} steps", paper, rule)
    ours = "; ".join(f"{x.model} {x.steps} steps N={x.n_samples}: {x[metric]:.2f}" for _, x in runs.iterrows())
    reasons = [] if str(r["verified"]).strip().lower() == "yes" else \
        ["the paper's cell is an unverified secondary reading (verified: no)"]
    if steps is None or resolution is None:
        reasons.append("the paper's step count or resolution is not stated")
    reasons += [reason for m in models for reason in comparability(ev, m)]
    if len(runs) != 1 and not reasons:
        reasons.append("more than one run matches")
    first = runs.iloc[0] if len(runs) else None
    sigma = None if first is None else ev.sigma(first["model"], setting, int(first["steps"]), ev.paper_count, metric)
    if sigma is None and not reasons:
        reasons.append(f"no seed spread of {metric} at N={ev.paper_count}: {ev.spread_source()}")
    scope = ", ".join(models) + f", N={ev.paper_count}"
    if reasons or first is None:
        return row(id_, claim, scope, "not comparable", f"ours: {ours or 'no run at N=' + str(ev.paper_count)}; "
                   + "; ".join(reasons), paper, rule)
    value, threshold = float(first[metric]), Z * math.sqrt(2) * sigma
    verdict = "holds" if abs(value - r[metric]) <= threshold else "does not hold"
    return row(id_, claim, scope, verdict, f"ours: {ours}; |Δ| {abs(value - r[metric]):.2f} vs tolerance {threshold:.2f}",
               paper, rule, ours=value, paper_value=float(r[metric]), margin=abs(value - r[metric]), threshold=threshold)


def build_claims(ev: Evidence) -> pd.DataFrame:
    rows = w2_claims(ev) + w3_gap(ev) + size_claims(ev) + calibration_time(ev) + paper_numbers(ev)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


# --- outputs ------------------------------------------------------------------------------------------

VERDICT_COLOURS = {"holds": "#d9f2d9", "does not hold": "#f8d0d0", "not run": "#eeeeee", "not comparable": "#fff3c4"}


def counts_line(claims: pd.DataFrame) -> str:
    counts = claims["verdict"].value_counts()
    return ", ".join(f"{v}: {counts.get(v, 0)}" for v in VERDICTS)


def write(claims: pd.DataFrame, preset: str, out: dict[str, str], notice: str = "") -> None:
    Path(out["csv"]).parent.mkdir(parents=True, exist_ok=True)
    shown = claims[["id", "claim", "scope", "verdict", "evidence", "paper", "rule"]]
    title = f"Claims of the paper tested by preset {preset}: {counts_line(claims)}"
    banner = f"**{notice}**\n\n" if notice else ""
    Path(out["md"]).write_text(f"{banner}### {title}\n\n" + markdown(shown, ".4g") + "\n")
    styled = (shown.style.hide(axis="index").set_caption(title).set_table_styles(HTML_STYLE)
              .map(lambda v: f"background-color: {VERDICT_COLOURS[v]}", subset=["verdict"])
              .set_properties(**{"white-space": "normal", "text-align": "left"}))
    html_banner = f"<p style='color: firebrick'><b>{notice}</b></p>" if notice else ""
    Path(out["html"]).write_text(html_page(html_banner + styled.to_html()))
    (claims.assign(notice=notice) if notice else claims).to_csv(out["csv"], index=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", nargs="+", required=True,
                        help="tidy tables: results/<preset>/tables/metrics.csv [and tables/baselines.csv]")
    parser.add_argument("--infos", nargs="+", required=True, help="quantize info JSONs")
    parser.add_argument("--settings-table", required=True, help="config/settings.tsv")
    parser.add_argument("--paper", required=True, help="config/paper_results.csv")
    parser.add_argument("--seed-spread", default="", help="the preset's seed-spread record (benchmarks/seed_spread/)")
    parser.add_argument("--config", required=True, help="the preset's config as JSON")
    for fmt in ("csv", "md", "html"):
        parser.add_argument(f"--{fmt}", required=True)
    parser.add_argument("--notice", default="", help="warning put on every output (rehearsal: random weights)")


def run(args: argparse.Namespace) -> None:
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config: not JSON ({err})") from err
    metrics = read_tidy(args.metrics)
    ev = Evidence(metrics, info_table(args.infos), read_settings_table(args.settings_table), read_paper(args.paper),
                  read_spread(args.seed_spread), config)
    claims = build_claims(ev)
    write(claims, config["preset"], {fmt: getattr(args, fmt) for fmt in ("csv", "md", "html")}, args.notice)
    log.info("%d claims: %s", len(claims), counts_line(claims))
