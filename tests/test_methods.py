"""The method registry: every list of method names agrees with it, and every registered method honours the
contract (quantize a tiny DiT, pack, reload bit-exactly, file within the size rule)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vq4dit.methods import REGISTRY, method
from vq4dit.methods.calibration import CalibrationConfig
from vq4dit.methods.hessians import BaselineConfig
from vq4dit.models import block_linear_names
from vq4dit.packed import FORMATS, nonblock_bytes, read_packed, save_packed
from vq4dit.plots import METHOD_COLOURS
from conftest import small_dit

SCHEMA = Path(__file__).parents[1] / "workflow" / "schemas" / "settings.schema.yaml"

#: one small setting per method (a new method needs a row here: the contract test fails without one)
SETTINGS = {
    "fp": {},
    "rtn": {"bits": 2},
    "repq-vit": {"bits": 3},
    "gptq": {"bits": 2},
    "qdit": {"bits": 2},
    "vq-kmeans": {"k": 16, "d": 4},
    "vq-codebook": {"k": 16, "d": 4},
    "vq4dit": {"k": 16, "d": 4, "n_candidates": 2},
    "gptvq": {"k": 16, "d": 4},
}
CALIBRATION = {"outer_iterations": 2, "labels_per_trajectory": 2, "steps": 2, "kmeans_iters": 3, "ratio_reg_start": 0}
BASELINES = {"trajectories": 1, "labels_per_trajectory": 2, "steps": 2, "kmeans_iters": 3, "codebook_update_iters": 1,
             "qdit_group_sizes": [16, 0], "qdit_budget_group_size": 16}


def test_the_settings_schema_enum_is_the_registry():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["method"]["enum"] == list(REGISTRY)
    required = {tuple(rule["then"]["required"]): rule["if"]["properties"]["method"].get("enum")
                for rule in schema["allOf"]}
    assert required[("bits",)] == [n for n, m in REGISTRY.items() if m.format == "rtn"]
    assert required[("k", "d")] == [n for n, m in REGISTRY.items() if m.format == "vq"]


def test_every_method_has_a_colour_and_a_packed_format():
    assert set(METHOD_COLOURS) == set(REGISTRY)
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)
    assert {m.format for m in REGISTRY.values()} <= set(FORMATS) | {"fp"}


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="'magic'.*vq4dit"):
        method("magic")


def test_importing_the_registry_does_not_import_torch():
    code = "import sys, vq4dit.methods; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.fixture(scope="module")
def teacher():
    """The FP model every contract run quantizes (a copy of it) and calibrates against."""
    return small_dit()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_method_contract_quantize_pack_reload_bit_exactly_within_size(name, teacher, tmp_path):
    spec = REGISTRY[name]
    setting = {"id": f"{name}-contract", "method": name, **SETTINGS[name]}
    student = small_dit()
    names = block_linear_names(student)
    extra = {"checkpoint": tmp_path / "calibration.pt"} if spec.calibrated else {}
    if spec.hessians:
        extra["baselines"] = BaselineConfig.from_dict(BASELINES)
    packed, info = spec.quantizer()(student, names, setting, CalibrationConfig.from_dict(CALIBRATION), "cpu", teacher,
                                    **extra)
    path = tmp_path / "packed.safetensors"
    save_packed(teacher.state_dict(), packed, spec.format, setting, path)

    state, layers, _ = read_packed(path)
    assert set(layers) == (set() if name == "fp" else set(names))
    assert {layer["format"] for layer in layers.values()} <= {spec.format}
    dequantize = FORMATS[spec.format][1] if packed else None
    for layer in names:
        expected = dequantize(packed[layer]) if packed else teacher.get_submodule(layer).weight.detach()
        assert torch.equal(state[f"{layer}.weight"], expected), layer
    limit = (info["size"]["total_mb"] * 2**20 + nonblock_bytes(teacher.state_dict(), names)) * 1.02
    assert path.stat().st_size <= limit, (path.stat().st_size, limit)
