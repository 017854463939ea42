import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from vq4dit.plots import spread_ticks, tile
from vq4dit.tables import benchmark_table, build_table, comparison_table, read_paper, unmatched_paper_rows

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SETTINGS = {"fp": ("fp", 32.0, 4.5), "rtn-w2": ("rtn", 2.0, 0.3)}
PAPER = """method,setting,resolution,steps,bits,size_mb,fid,sfid,is,precision,verified,source
FP,fp,256,50,32,4.0,55.0,,,,yes,Table 1 row FP
RTN,rtn-w2,256,,2,,99.0,,,,no,somewhere without steps
GPTQ,,256,50,2,,70.0,,,,yes,Table 1 row GPTQ
"""


@pytest.fixture
def results(tmp_path):
    metrics, infos = [], []
    for setting, (method, bits, mb) in SETTINGS.items():
        info = tmp_path / "quantized" / "m" / f"{setting}.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps({"setting": {"id": setting, "method": method}, "file_mb": mb,
                                    "quantize_seconds": 1.0, "block_mse": 0.0 if method == "fp" else 0.1,
                                    "size": {"bits_per_weight": bits, "total_mb": mb}}))
        infos.append(str(info))
        for steps in (50, 25):
            path = tmp_path / "metrics" / "m" / setting / f"steps{steps}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            fid = 10.0 if method == "fp" else 40.0
            first_40 = {"fid": fid + steps + (3 if method == "fp" else 5), "sfid": 1.5, "is": 1.5, "precision": 0.4,
                        "recall": 0.3, "n_samples": 40}  # the metrics on the first 40 of the 100 samples
            path.write_text(json.dumps({"fid": fid + steps, "sfid": 1.0, "is": 2.0, "precision": 0.5,
                                        "recall": 0.4, "n_samples": 100, "n_reference": 50, "subsets": [first_40]}))
            metrics.append(str(path))
    return tmp_path, metrics, infos


def test_table_has_one_row_per_setting_and_steps(results):
    _, metrics, infos = results
    table = build_table(metrics, infos, cfg_scale=1.5)
    assert len(table) == 8  # (setting, steps) x sample counts (40 first, all 100)
    assert list(table[["n_samples", "setting", "steps"]].itertuples(index=False, name=None))[:4] == [
        (40, "fp", 25), (40, "rtn-w2", 25), (40, "fp", 50), (40, "rtn-w2", 50)]
    row = table[(table.setting == "rtn-w2") & (table.steps == 50) & (table.n_samples == 100)].iloc[0]
    assert row["fid"] == 90.0 and row["bits_per_weight"] == 2.0 and row["cfg_scale"] == 1.5
    assert row["delta_fid_fp"] == 30.0 and pd.isna(row["n_candidates"])  # scalar method: no candidates
    first = table[(table.setting == "rtn-w2") & (table.steps == 50) & (table.n_samples == 40)].iloc[0]
    assert first["fid"] == 95.0 and first["delta_fid_fp"] == 32.0 and first["n_reference"] == 50


def test_comparison_table_places_paper_numbers_by_setting_resolution_and_steps(results, tmp_path):
    _, metrics, infos = results
    (tmp_path / "paper.csv").write_text(PAPER)
    paper = read_paper(str(tmp_path / "paper.csv"))
    table = comparison_table(build_table(metrics, infos, 1.5), paper, resolution=256)
    assert "ours (all)" not in table.columns.get_level_values("source")  # no paper count: all samples only
    fp = table.loc[("fp", "fp", 32.0)]
    assert fp[("50 steps", "FID↓", "ours")] == 60.0 and fp[("50 steps", "FID↓", "paper")] == 55.0
    assert fp[("50 steps", "FID↓", "Δ")] == 5.0 and np.isnan(fp[("25 steps", "FID↓", "paper")])
    assert fp[("size", "MB", "paper")] == 4.0 and fp[("size", "MB", "Δ")] == 0.5
    assert table.loc[("rtn-w2", "rtn", 2.0)][("50 steps", "ΔFID(FP)", "ours")] == 30.0
    assert np.isnan(comparison_table(build_table(metrics, infos, 1.5), paper, resolution=512)
                    .loc[("fp", "fp", 32.0)][("50 steps", "FID↓", "paper")])
    at_40 = comparison_table(build_table(metrics, infos, 1.5), paper, resolution=256, paper_count=40)
    fp = at_40.loc[("fp", "fp", 32.0)]
    assert (fp[("50 steps", "FID↓", "ours")], fp[("50 steps", "FID↓", "ours (all)")]) == (63.0, 60.0)
    assert fp[("50 steps", "FID↓", "Δ")] == 8.0 and fp[("50 steps", "IS↑", "ours")] == 1.5
    assert at_40.loc[("rtn-w2", "rtn", 2.0)][("50 steps", "ΔFID(FP)", "ours")] == 32.0
    with pytest.raises(ValueError, match="paper's sample count 10000.*metrics.sample_counts"):
        comparison_table(build_table(metrics, infos, 1.5), paper, resolution=256, paper_count=10000)
    notes = unmatched_paper_rows(paper, 256, ["fp", "rtn-w2"])
    assert sorted(notes["method"]) == ["GPTQ", "RTN"]


def test_paper_results_file_is_complete_and_sourced():
    paper = read_paper(str(REPO / "config/paper_results.csv"))
    settings = pd.read_csv(REPO / "config/settings.tsv", sep="\t")["id"]
    assert paper["setting"].dropna().isin(settings).all()
    assert paper["verified"].isin(["yes", "no"]).all() and paper["source"].str.len().gt(10).all()


def test_paper_results_without_a_source_is_named(tmp_path):
    bad = tmp_path / "paper.csv"
    bad.write_text(PAPER + "X,fp,256,50,32,,1.0,,,,no,\n")
    with pytest.raises(ValueError, match=r"paper.csv: row\(s\) \[5\] have no source"):
        read_paper(str(bad))


def test_benchmark_table_reads_every_record(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, seconds in (("quantize/m/fp", 2.0), ("tables/metrics", 9.0)):
        path = tmp_path / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:0{int(seconds)}\t100\t1\t90\t1\t0\t0\t50\t1.5\n")
    table = benchmark_table(str(tmp_path))
    assert table["job"].tolist() == ["tables/metrics", "quantize/m/fp"] and table["max_rss"].tolist() == [100, 100]
    with pytest.raises(ValueError, match="no Snakemake benchmark records"):
        benchmark_table(str(tmp_path / "quantize" / "m" / "none"))


def test_table_rejects_a_path_without_wildcards(results, tmp_path):
    _, metrics, infos = results
    odd = tmp_path / "other.json"
    odd.write_text("{}")
    with pytest.raises(ValueError, match="other.json"):
        build_table(metrics + [str(odd)], infos, cfg_scale=1.5)


def test_tables_and_plots_commands_write_their_files(results):
    root, metrics, infos = results
    out = root / "out"
    def formats(stem):
        return [arg for fmt in ("csv", "md", "tex", "html") for arg in (f"--{fmt}", str(out / f"{stem}.{fmt}"))]

    common = ["--metrics", *metrics, "--infos", *infos, "--cfg-scale", "1.5"]
    subprocess.run([sys.executable, "-m", "vq4dit", "tables", "metrics", *common, *formats("t")], check=True)
    assert pd.read_csv(out / "t.csv").shape[0] == 8 and "|   N |" in (out / "t.md").read_text()
    assert "FID" in (out / "t.md").read_text() and r"\toprule" in (out / "t.tex").read_text()
    (root / "paper.csv").write_text(PAPER)
    subprocess.run([sys.executable, "-m", "vq4dit", "tables", "paper", *common, "--paper", str(root / "paper.csv"),
                    "--resolution", "256", "--paper-count", "40", "--runs", str(out / "runs.csv"), *formats("paper")],
                   check=True)
    long = pd.read_csv(out / "paper.csv")
    cell = long[(long.setting == "fp") & (long.group == "50 steps") & (long.quantity == "FID↓")]
    assert dict(zip(cell.source, cell.value)) == {"ours": 63.0, "paper": 55.0, "Δ": 8.0, "ours (all)": 60.0}
    assert "ours at the first 40 samples, ours (all) at 100" in (out / "paper.md").read_text()
    assert (pd.read_csv(out / "runs.csv")["n_samples"] == 40).all()
    assert "GPTQ" in (out / "paper.md").read_text() and r"\multicolumn" in (out / "paper.tex").read_text()
    subprocess.run([sys.executable, "-m", "vq4dit", "plots", "tradeoff", "--table", str(out / "runs.csv"),
                    "--model", "m", "--paper", str(root / "paper.csv"), "--resolution", "256",
                    "--png", str(out / "p.png"), "--pdf", str(out / "p.pdf")], check=True)
    shard = out / "s.npz"
    np.savez(shard, arr_0=np.zeros((40, 8, 8, 1), np.uint8))
    subprocess.run([sys.executable, "-m", "vq4dit", "plots", "samples", "--shards", str(shard), str(shard),
                    "--names", "a", "b", "--png", str(out / "g.png"), "--pdf", str(out / "g.pdf")], check=True)
    for name in ("p.png", "p.pdf", "g.png", "g.pdf"):
        assert (out / name).stat().st_size > 1000, name


def test_tile_layout():
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2, 1)
    mosaic = tile(images, columns=3)
    assert mosaic.shape == (4, 6, 1)
    np.testing.assert_array_equal(mosaic[:2, 2:4], images[1])
    np.testing.assert_array_equal(mosaic[2:, :2], images[3])
    assert not mosaic[2:, 4:].any()  # padding
    gapped = tile(images, columns=3, gap=1, fill=7)
    assert gapped.shape == (5, 8, 1) and (gapped[2] == 7).all() and (gapped[:, 2] == 7).all()
    np.testing.assert_array_equal(gapped[3:, 3:5], images[4])


def test_spread_ticks_drop_crowded_values():
    assert spread_ticks(pd.Series([2.0, 2.06, 3.0, 32.0, 32.0])) == [2.0, 3.0, 32.0]
