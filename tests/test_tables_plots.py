import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from vq4dit.plots import tile
from vq4dit.tables import build_table

SETTINGS = {"fp": ("fp", 32.0, 4.5), "rtn-w2": ("rtn", 2.0, 0.3)}


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
            path.write_text(json.dumps({"fid": fid + steps, "sfid": 1.0, "is": 2.0, "precision": 0.5,
                                        "recall": 0.4, "n_samples": 100, "n_reference": 50}))
            metrics.append(str(path))
    return tmp_path, metrics, infos


def test_table_has_one_row_per_setting_and_steps(results):
    _, metrics, infos = results
    table = build_table(metrics, infos, cfg_scale=1.5)
    assert len(table) == 4
    assert list(table[["setting", "steps"]].itertuples(index=False, name=None)) == [
        ("fp", 25), ("rtn-w2", 25), ("fp", 50), ("rtn-w2", 50)]
    row = table[(table.setting == "rtn-w2") & (table.steps == 50)].iloc[0]
    assert row["fid"] == 90.0 and row["bits_per_weight"] == 2.0 and row["cfg_scale"] == 1.5


def test_table_rejects_a_path_without_wildcards(results, tmp_path):
    _, metrics, infos = results
    odd = tmp_path / "other.json"
    odd.write_text("{}")
    with pytest.raises(ValueError, match="other.json"):
        build_table(metrics + [str(odd)], infos, cfg_scale=1.5)


def test_tables_and_plots_commands_write_their_files(results):
    root, metrics, infos = results
    out = root / "out"
    subprocess.run([sys.executable, "-m", "vq4dit", "tables", "--metrics", *metrics, "--infos", *infos,
                    "--cfg-scale", "1.5", "--csv", str(out / "t.csv"), "--markdown", str(out / "t.md"),
                    "--latex", str(out / "t.tex")], check=True)
    assert pd.read_csv(out / "t.csv").shape[0] == 4
    assert "FID" in (out / "t.md").read_text() and r"\toprule" in (out / "t.tex").read_text()
    subprocess.run([sys.executable, "-m", "vq4dit", "plots", "tradeoff", "--table", str(out / "t.csv"),
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
