"""Zero-data calibration: calibration inputs, block-wise and sequential loops, block MSE, config."""

import copy

import pytest
import torch

from vq4dit.assignments import quantize_model_linears
from vq4dit.calibration import (
    CalibrationConfig,
    RatioRegSwitch,
    block_mse,
    calibrate_blockwise,
    calibrate_sequential,
    collect_calibration_inputs,
)
from vq4dit.models import block_linear_names

CFG = dict(trajectories=2, labels_per_trajectory=2, steps=4, iterations=30, batch_size=8,
           ratio_reg_start=5, kmeans_iters=10)


def _quantized(model, n_candidates: int = 2):
    """A copy of ``model`` with every block linear VQ'd at 2 bits (k=16, d=4), and its layers."""
    q_model = copy.deepcopy(model)
    layers = quantize_model_linears(q_model, block_linear_names(q_model), k=16, d=4,
                                    n_candidates=n_candidates, kmeans_iters=10, seed=0)
    return q_model, layers


@pytest.fixture
def calib(tiny_dit):
    return collect_calibration_inputs(tiny_dit, CalibrationConfig(**CFG), "cpu")


def test_calibration_inputs_shapes_null_labels_and_steps(tiny_dit, calib) -> None:
    cfg = CalibrationConfig(**CFG)
    n = cfg.trajectories * cfg.steps * 2 * cfg.labels_per_trajectory
    assert calib.latents.shape == (n, 1, 8, 8) and calib.timesteps.shape == calib.labels.shape == (n,)
    assert int((calib.labels == 10).sum()) == n // 2  # the null-label half of the guided batch
    assert int((calib.labels < 10).sum()) == n // 2
    assert calib.timesteps.unique().numel() == cfg.steps
    assert int((calib.timesteps == calib.timesteps[0]).sum()) == cfg.trajectories * 2 * cfg.labels_per_trajectory
    assert not calib.latents.is_inference()
    again = collect_calibration_inputs(tiny_dit, cfg, "cpu")
    assert torch.equal(again.latents, calib.latents) and torch.equal(again.labels, calib.labels)


@pytest.mark.parametrize("joint_blocks", [1, 3, 0])
def test_blockwise_reduces_block_mse_and_freezing_is_monotone(tiny_dit, calib, joint_blocks) -> None:
    q_model, layers = _quantized(tiny_dit)
    before = block_mse(tiny_dit, q_model, calib)
    cfg = CalibrationConfig(**CFG, lr_logits=0.5, joint_blocks=joint_blocks)
    history = calibrate_blockwise(tiny_dit, q_model, layers, calib, cfg)
    after = block_mse(tiny_dit, q_model, calib)
    assert after < before
    assert len(history["blocks"]) == 4 and history["calibration_seconds"] > 0
    for block in history["blocks"]:
        frozen = [entry[3] for entry in block]
        assert frozen == sorted(frozen) and frozen[-1] > 0
        assert block[-1][0] == CFG["iterations"] - 1
    assert len(history["block_seconds"]) == 4


def test_joint_blocks_match_one_at_a_time(tiny_dit, calib) -> None:
    """One backward of the summed losses trains each block exactly as training it alone."""
    weights = []
    for joint in (1, 0):
        q_model, layers = _quantized(tiny_dit)
        cfg = CalibrationConfig(**{**CFG, "iterations": 5, "joint_blocks": joint})
        calibrate_blockwise(tiny_dit, q_model, layers, calib, cfg)
        weights.append(torch.cat([layer.weight().detach().flatten() for layer in layers.values()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_blockwise_is_deterministic(tiny_dit, calib) -> None:
    weights = []
    for _ in range(2):
        q_model, layers = _quantized(tiny_dit)
        calibrate_blockwise(tiny_dit, q_model, layers, calib, CalibrationConfig(**{**CFG, "iterations": 5}))
        weights.append(torch.cat([layer.weight().detach().flatten() for layer in layers.values()]))
    assert torch.equal(*weights)


def test_single_candidate_trains_only_codebook_and_bias(tiny_dit, calib) -> None:
    q_model, layers = _quantized(tiny_dit, n_candidates=1)
    logits = {name: layer.logits.detach().clone() for name, layer in layers.items()}
    codebooks = {name: layer.codebook.detach().clone() for name, layer in layers.items()}
    calibrate_blockwise(tiny_dit, q_model, layers, calib, CalibrationConfig(**{**CFG, "iterations": 5}))
    for name, layer in layers.items():
        assert layer.is_hard and torch.equal(layer.logits, logits[name])
    assert any(not torch.equal(layer.codebook, codebooks[name]) for name, layer in layers.items())


def test_sequential_loop_runs_and_records_every_block(tiny_dit, calib) -> None:
    q_model, layers = _quantized(tiny_dit)
    before = block_mse(tiny_dit, q_model, calib)
    cfg = CalibrationConfig(**{**CFG, "steps": 3})
    history = calibrate_sequential(tiny_dit, q_model, layers, cfg, "cpu", outer_iterations=2)
    assert len(history["blocks"]) == 4
    assert [entry[0] for entry in history["blocks"][0]] == list(range(6))
    for block in history["blocks"]:
        frozen = [entry[3] for entry in block]
        assert frozen == sorted(frozen)
    assert block_mse(tiny_dit, q_model, calib) < before


def test_block_mse_of_fp_model_is_zero(tiny_dit, calib) -> None:
    assert block_mse(tiny_dit, tiny_dit, calib, max_samples=7) == 0.0
    assert len(calib.subset(7)) == 7


def test_ratio_regularizer_switches_on_after_plateau() -> None:
    switch = RatioRegSwitch(patience=3)
    assert not any(switch.update(loss) for loss in [5.0, 4.0, 3.0, 2.0])
    assert [switch.update(10.0) for _ in range(4)] == [False, False, True, True]
    assert RatioRegSwitch(patience=0).update(1.0)


def test_ratio_regularizer_deadline_switches_on_while_l_d_still_improves() -> None:
    switch = RatioRegSwitch(patience=100, deadline=3)
    assert [switch.update(loss) for loss in [5.0, 4.0, 3.0, 2.0, 1.0]] == [False, False, False, True, True]


def test_config_from_dict() -> None:
    cfg = CalibrationConfig.from_dict({"iterations": 7, "lambda_r": 0.5})
    assert cfg.iterations == 7 and cfg.lambda_r == 0.5 and cfg.cfg_scale == 4.0
    with pytest.raises(ValueError, match="bogus_key"):
        CalibrationConfig.from_dict({"bogus_key": 1})
