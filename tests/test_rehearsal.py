"""The rehearsal preset: stand-in assets (unit tests) and, marked ``rehearsal``, the 256 run end to end.

``pytest -m rehearsal`` runs ``snakemake table_256 --configfile config/rehearsal.yaml`` offline from an
empty copy of the workflow (DiT-XL/2 at full size on random weights: tens of minutes on 2 cores).
"""

import hashlib
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from vq4dit.models import build_transformer
from vq4dit.prepare import convert_dit_state
from vq4dit.rehearsal import NOTICE, dit_shapes, write_asset
from vq4dit.tables import add_notice
from test_workflow import COPIED, job_counts, snakemake

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("image_size, tokens", [(256, 256), (512, 1024)])
def test_dit_asset_has_the_released_checkpoints_keys_and_shapes(image_size, tokens):
    shapes = dit_shapes(image_size)
    # facebookresearch/DiT's DiT-XL/2 EMA state dicts, written out here independently of vq4dit.rehearsal
    assert shapes["pos_embed"] == (1, tokens, 1152)
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert shapes["t_embedder.mlp.0.weight"] == (1152, 256)
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6912, 1152)
    assert shapes["blocks.13.mlp.fc2.weight"] == (1152, 4608)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)
    assert len(shapes) == 8 + 28 * 10 + 4
    n_params = sum(math.prod(s) for k, s in shapes.items() if k != "pos_embed")
    assert round(n_params / 1e6) == 675  # DiT paper: DiT-XL/2 has 675M parameters


def test_dit_asset_converts_to_diffusers_dit_xl2():
    with torch.device("meta"):
        original = {k: torch.empty(s) for k, s in dit_shapes(256).items()}
        model = build_transformer("DiT-XL/2", sample_size=32, in_channels=4, num_classes=1000)
    converted = convert_dit_state(original, 28)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_assets_are_byte_identical_when_written_twice(tmp_path):
    for folder in ("a", "b"):
        write_asset("reference", tmp_path / folder / "ref.npz", seed=3, image_size=256, n_images=2)
        write_asset("vae-config", tmp_path / folder / "config.json", seed=3, image_size=256, n_images=2)
    for name in ("ref.npz", "config.json"):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name)
    with np.load(tmp_path / "a" / "ref.npz") as ref:
        assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (2, 256, 256, 3)
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
        assert np.linalg.eigvalsh(ref["sigma"]).min() > 0  # FID takes its matrix square root


def test_pinned_hashes_of_the_vae_config_and_the_inception_weights_are_reproduced(tmp_path):
    """The written bytes are what config/rehearsal.yaml pins (the inception weights: a torch.save zip, whose
    records are named after the file, so an atomic write must not change that name)."""
    config = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())
    write_asset("vae-config", tmp_path / "config.json", seed=0, image_size=256, n_images=8)
    assert sha256(tmp_path / "config.json") == config["vae"]["files"]["config.json"]["sha256"]
    weights = config["feature_extractor"]["weights"]
    write_asset("inception", tmp_path / weights["file"], seed=0, image_size=256, n_images=8)
    assert sha256(tmp_path / weights["file"]) == weights["sha256"]


def test_notice_is_on_every_table_format(tmp_path):
    out = {fmt: str(tmp_path / f"t.{fmt}") for fmt in ("csv", "md", "tex", "html")}
    pd.DataFrame({"fid": [1.0]}).to_csv(out["csv"], index=False)
    Path(out["md"]).write_text("| fid |\n")
    Path(out["tex"]).write_text("\\begin{tabular}\n")
    Path(out["html"]).write_text("<html><body style='x'><table></table></body></html>")
    add_notice(out, NOTICE)
    assert pd.read_csv(out["csv"])["notice"].tolist() == [NOTICE]
    for fmt in ("md", "tex", "html"):
        assert "random weights" in Path(out[fmt]).read_text()
    assert Path(out["html"]).read_text().index("random weights") < Path(out["html"]).read_text().index("<table>")


def test_rehearsal_dry_run_makes_every_download_from_a_local_asset(tmp_path):
    for name in COPIED:
        subprocess.run(["cp", "-r", str(REPO / name), str(tmp_path)], check=True)
    output = snakemake(tmp_path, "-n", "table_256", "--configfile", "config/rehearsal.yaml")[1]
    counts = job_counts(output)
    assert counts["download"] == 5 and counts["rehearsal_dit"] == 1 and counts["rehearsal_vae"] == 1
    assert counts["rehearsal_inception"] == 1 and counts["rehearsal_reference"] == 1
    assert output.count("--url file:resources/rehearsal-assets/") == 5 and "--url http" not in output


@pytest.mark.rehearsal
def test_rehearsal_256_runs_offline_from_an_empty_copy(tmp_path):
    for name in COPIED:
        subprocess.run(["cp", "-r", str(REPO / name), str(tmp_path)], check=True)
    result = subprocess.run(["snakemake", "table_256", "--cores", "2", "--configfile", "config/rehearsal.yaml"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    results = tmp_path / "results/rehearsal"
    table = pd.read_csv(results / "tables/paper-DiT-XL-2-256.csv")
    config = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())
    fid = table[(table["quantity"] == "FID↓") & (table["source"] == "ours")]
    assert sorted(fid["setting"]) == sorted(config["settings"]) and np.isfinite(fid["value"]).all()
    assert (table["notice"] == NOTICE).all()
    assert NOTICE in (results / "tables/paper-DiT-XL-2-256.md").read_text()
    for setting in config["settings"]:
        info = yaml.safe_load((results / f"quantized/DiT-XL-2-256/{setting}.json").read_text())
        on_disk = (results / f"quantized/DiT-XL-2-256/{setting}.safetensors").stat().st_size / 2**20
        assert on_disk <= (info["size"]["total_mb"] + info["nonblock_mb"]) * 1.02, setting
    assert (results / "quantized/DiT-XL-2-256/vq4dit-w2.safetensors").stat().st_size <= 190 * 2**20
