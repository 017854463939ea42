"""Size accounting by the paper's convention (DiT-XL/2 bars) and the ``size`` command."""

import json
import subprocess
import sys

import pytest
from torch import nn

from vq4dit.size import dit_block_linear_shapes, fp_size, linear_shapes, scalar_size, vq_size


def test_dit_xl_shapes_match_the_paper_counts() -> None:
    shapes = dit_block_linear_shapes("DiT-XL/2")
    assert len(shapes) == 196
    assert sum(o * i for o, i in shapes) == 668_860_416
    assert sum(o for o, _ in shapes) == 483_840


@pytest.mark.parametrize(("arch", "hidden", "depth"), [("DiT-L/2", 1024, 24), ("DiT-B/2", 768, 12), ("DiT-S/2", 384, 12)])
def test_smaller_archs(arch: str, hidden: int, depth: int) -> None:
    shapes = dit_block_linear_shapes(arch)
    assert len(shapes) == 7 * depth
    assert sum(o * i for o, i in shapes) == 18 * hidden * hidden * depth


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        dit_block_linear_shapes("DiT-M/2")


def test_vq_size_bars_dit_xl_2bit() -> None:
    shapes = dit_block_linear_shapes("DiT-XL/2")
    sizes = vq_size(shapes, k=256, d=4)
    assert round(sizes["fp32_mb"], 2) == 2553.35
    assert round(sizes["assignments_mb"], 2) == 159.47
    assert abs(sizes["total_mb"] - 162.08) < 0.5
    assert sizes["n_codebooks"] == 196 and sizes["bits_per_weight"] == 2.0
    assert sizes["bits_per_weight_with_codebooks"] > 2.0
    paper = vq_size(shapes, k=256, d=4, codebook_bits=32)
    assert round(paper["codebooks_mb"], 2) == 0.77
    assert round(paper["biases_mb"], 2) == 1.85
    assert round(paper["total_mb"], 2) == 162.08
    assert paper["total_mb"] * 2**20 == 169_953_280


def test_vq_size_3bit_and_clamping() -> None:
    assert vq_size(dit_block_linear_shapes("DiT-XL/2"), k=64, d=2)["bits_per_weight"] == 3.0
    tiny = vq_size([(16, 32)], k=256, d=4, codebook_bits=32)  # 128 sub-vectors: k -> 32
    assert tiny["bits_per_weight"] == 5 / 4
    assert tiny["codebooks_mb"] * 2**20 == 32 * 4 * 4


def test_fp_and_scalar_sizes() -> None:
    shapes = dit_block_linear_shapes("DiT-XL/2")
    assert round(fp_size(shapes)["total_mb"], 2) == 2553.35
    scalar = scalar_size(shapes, bits=2)
    assert round(scalar["weights_mb"], 2) == 159.47
    assert scalar["overhead_mb"] * 2**20 == 483_840 * 4
    assert scalar["total_mb"] == pytest.approx(159.47 + 1.85 + 1.85, abs=0.01)


def test_linear_shapes_of_a_model() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert linear_shapes(model, ["0", "2"]) == [(16, 8), (4, 16)]


def test_cli_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vq4dit", "size", "--arch", "DiT-XL/2", "--k", "256", "--d", "4", "--codebook-bits", "32", "--json"],
        capture_output=True, text=True, check=True,
    )
    sizes = json.loads(result.stdout)
    assert sizes["arch"] == "DiT-XL/2" and sizes["n_codebooks"] == 196
    assert round(sizes["total_mb"], 2) == 162.08 and round(sizes["assignments_mb"], 2) == 159.47


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    from argparse import Namespace

    from vq4dit.size import run

    run(Namespace(arch="DiT-XL/2", k=256, d=4, codebook_bits=16, json=False))
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split() for line in lines)
    assert table["arch"] == "DiT-XL/2" and table["assignments_mb"] == "159.4688"
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # aligned values
