"""Zero-data calibration: teacher inputs, the whole-model driver, its host reads, the L_r switch, block MSE, config."""

import collections
import copy

import pytest
import torch

from vq4dit.methods import calibration
from vq4dit.methods.assignments import quantize_model_linears
from vq4dit.methods.calibration import (
    CalibrationConfig,
    NonFiniteLoss,
    RatioRegSwitch,
    TeacherStreams,
    Trajectories,
    block_mse,
    calibrate,
    collect_calibration_inputs,
    held_out,
    load_checkpoint,
    restore_layers,
)
from vq4dit.io import JobTerminated
from vq4dit.models import block_linear_names

CFG = dict(outer_iterations=3, labels_per_trajectory=2, steps=5, ratio_reg_start=3, kmeans_iters=10, precision="fp32")


def _quantized(model, n_candidates: int = 2):
    """A copy of ``model`` with every block linear VQ'd at 2 bits (k=16, d=4), its container and layers."""
    q_model = copy.deepcopy(model)
    vq, layers = quantize_model_linears(q_model, block_linear_names(q_model), k=16, d=4,
                                        n_candidates=n_candidates, kmeans_iters=10, seed=0)
    return q_model, vq, layers


@pytest.fixture
def calib(tiny_dit):
    return collect_calibration_inputs(tiny_dit, held_out(CalibrationConfig(**CFG)), "cpu")


def test_teacher_inputs_shapes_null_labels_and_steps(tiny_dit) -> None:
    spec = Trajectories(trajectories=2, labels_per_trajectory=2, steps=4, cfg_scale=4.0, cfg_channels=None, seed=0)
    calib = collect_calibration_inputs(tiny_dit, spec, "cpu")
    n = spec.trajectories * spec.steps * 2 * spec.labels_per_trajectory
    assert calib.latents.shape == (n, 1, 8, 8) and calib.timesteps.shape == calib.labels.shape == (n,)
    assert int((calib.labels == 10).sum()) == n // 2  # the null-label half of the guided batch
    assert int((calib.labels < 10).sum()) == n // 2
    assert calib.timesteps.unique().numel() == spec.steps
    assert int((calib.timesteps == calib.timesteps[0]).sum()) == spec.trajectories * 2 * spec.labels_per_trajectory
    assert not calib.latents.is_inference()
    again = collect_calibration_inputs(tiny_dit, spec, "cpu")
    assert torch.equal(again.latents, calib.latents) and torch.equal(again.labels, calib.labels)


@pytest.mark.parametrize("objective", ["blockwise", "sequential"])
def test_whole_model_steps_reduce_block_mse_and_freezing_is_monotone(tiny_dit, calib, objective) -> None:
    q_model, vq, layers = _quantized(tiny_dit)
    before = block_mse(tiny_dit, q_model, calib)
    cfg = CalibrationConfig(**{**CFG, "lr_logits": 0.1, "objective": objective})
    history = calibrate(tiny_dit, q_model, vq, layers, cfg)
    assert block_mse(tiny_dit, q_model, calib) < before
    assert history["optimizer_steps"] == cfg.outer_iterations * cfg.steps == 15
    assert len(history["blocks"]) == 4 and history["calibration_seconds"] > 0
    for block in history["blocks"]:
        assert [entry[0] for entry in block] == list(range(15))  # <= HISTORY_POINTS: every step recorded
        frozen = [entry[3] for entry in block]
        assert frozen == sorted(frozen)


def test_fast_logits_freeze_and_harden_layers_during_calibration(tiny_dit) -> None:
    q_model, vq, layers = _quantized(tiny_dit)
    cfg = CalibrationConfig(**{**CFG, "lr_logits": 0.5, "objective": "blockwise", "ratio_reg_rule": "patience"})
    history = calibrate(tiny_dit, q_model, vq, layers, cfg)
    assert vq.hard.any()
    hard_frozen = vq.frozen[torch.cat([torch.full((end - start,), bool(h)) for start, end, h in
                                       zip(vq.row_offsets, vq.row_offsets[1:], vq.hard.tolist())])]
    assert hard_frozen.all()
    assert all(block[-1][3] > 0.5 for block in history["blocks"])


def test_history_points_are_bounded(tiny_dit, monkeypatch) -> None:
    monkeypatch.setattr(calibration, "HISTORY_POINTS", 4)
    q_model, vq, layers = _quantized(tiny_dit)
    history = calibrate(tiny_dit, q_model, vq, layers, CalibrationConfig(**CFG))
    assert [entry[0] for entry in history["blocks"][0]] == [0, 3, 6, 9, 12, 14]


SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


def test_no_host_synchronisation_outside_history_points(tiny_dit, monkeypatch) -> None:
    """Every call that reads a tensor back to the host happens inside ``host_reads`` (history points, the end)."""
    q_model, vq, layers = _quantized(tiny_dit)
    outside, inside = collections.Counter(), collections.Counter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            (inside if calibration.inside_host_reads() else outside)[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    entries = calibration._HostReads.entries
    history = calibrate(tiny_dit, q_model, vq, layers, CalibrationConfig(**CFG))
    monkeypatch.undo()
    assert outside == {}
    assert inside["tolist"] > 0  # the patch sees the reads it allows
    assert calibration._HostReads.entries - entries == len(history["blocks"][0]) + 1  # history points + the end


def _step_inputs(streams: TeacherStreams, tiny_dit, steps: int) -> list[tuple]:
    inputs = []
    for _ in range(steps):
        x, t, y = streams.inputs()
        inputs.append((x, t, y))
        streams.advance(tiny_dit(x, timestep=t, class_labels=y).sample)
    return inputs


def test_one_stream_is_the_authors_trajectory_after_trajectory(tiny_dit) -> None:
    cfg = CalibrationConfig(**{**CFG, "steps": 4})
    with torch.no_grad():
        inputs = _step_inputs(TeacherStreams(tiny_dit, cfg), tiny_dit, 8)
    spec = Trajectories(2, cfg.labels_per_trajectory, cfg.steps, cfg.cfg_scale, cfg.cfg_channels, cfg.seed)
    recorded = collect_calibration_inputs(tiny_dit, spec, "cpu")
    torch.testing.assert_close(torch.cat([x for x, _, _ in inputs]), recorded.latents)
    assert torch.equal(torch.cat([y for _, _, y in inputs]), recorded.labels)


def test_staggered_streams_mix_timesteps_in_every_step(tiny_dit) -> None:
    cfg = CalibrationConfig(**{**CFG, "steps": 4, "streams": 2})
    streams = TeacherStreams(tiny_dit, cfg)
    with torch.no_grad():
        streams.stagger()
        inputs = _step_inputs(streams, tiny_dit, 6)
    timesteps = [t.unique().tolist() for _, t, _ in inputs]
    assert all(len(ts) == 2 for ts in timesteps)  # one label (+ null) per stream, two sampling steps apart
    assert [streams.started, [t.position for t in streams.trajectories]] == [[2, 3], [2, 0]]
    with pytest.raises(ValueError, match="streams"):
        CalibrationConfig(**{**CFG, "streams": 3})


def test_calibration_is_deterministic(tiny_dit) -> None:
    weights = []
    for _ in range(2):
        q_model, vq, layers = _quantized(tiny_dit)
        calibrate(tiny_dit, q_model, vq, layers, CalibrationConfig(**{**CFG, "outer_iterations": 1}))
        weights.append(torch.cat([vq.weight(i).detach().flatten() for i in range(len(vq))]))
    assert torch.equal(*weights)


def test_single_candidate_trains_only_codebook_and_bias(tiny_dit) -> None:
    q_model, vq, layers = _quantized(tiny_dit, n_candidates=1)
    logits, codebook = vq.logits.detach().clone(), vq.codebook.detach().clone()
    biases = {name: layer.bias.detach().clone() for name, layer in layers.items()}
    history = calibrate(tiny_dit, q_model, vq, layers, CalibrationConfig(**{**CFG, "outer_iterations": 1}))
    assert vq.hard.all() and torch.equal(vq.logits, logits) and not torch.equal(vq.codebook, codebook)
    assert any(not torch.equal(layer.bias, biases[name]) for name, layer in layers.items())
    assert all(entry[2] == 0.0 for block in history["blocks"] for entry in block)  # no L_r once hard


def test_after_hard_training_keeps_soft_layers_codebooks(tiny_dit) -> None:
    q_model, vq, layers = _quantized(tiny_dit)
    codebook = vq.codebook.detach().clone()
    cfg = CalibrationConfig(**{**CFG, "outer_iterations": 1, "codebook_training": "after-hard"})
    calibrate(tiny_dit, q_model, vq, layers, cfg)
    assert not vq.hard.any() and torch.equal(vq.codebook, codebook)


def _decisions(switch: RatioRegSwitch, values: list[float], l_r: float = 1.0) -> list[bool]:
    return [bool(switch.update(torch.tensor(v), torch.tensor(l_r))) for v in values]


def test_patience_rule_switches_on_after_a_plateau_for_good() -> None:
    switch = RatioRegSwitch("patience", patience=3, deadline=None, device=torch.device("cpu"))
    assert not any(_decisions(switch, [5.0, 4.0, 3.0, 2.0]))
    assert _decisions(switch, [10.0] * 4) == [False, False, True, True]
    assert _decisions(switch, [0.1]) == [True]
    assert int(switch.state["first_on"]) == 6 and int(switch.state["on_steps"]) == 3
    assert _decisions(RatioRegSwitch("patience", 0, None, torch.device("cpu")), [1.0]) == [True]


def test_patience_rule_deadline_switches_on_while_l_d_still_improves() -> None:
    switch = RatioRegSwitch("patience", patience=100, deadline=3, device=torch.device("cpu"))
    assert _decisions(switch, [5.0, 4.0, 3.0, 2.0, 1.0]) == [False, False, False, True, True]


def test_trajectory_min_rule_adds_l_r_above_its_running_minimum_of_the_trajectory() -> None:
    """The authors' loop: the minimum starts at 1000 each trajectory; L_r is added when it is above it."""
    switch = RatioRegSwitch("trajectory-min", patience=0, deadline=None, device=torch.device("cpu"))
    decisions = [bool(switch.update(torch.tensor(0.0), torch.tensor(v))) for v in [0.5, 0.4, 0.45, 0.4, 0.3]]
    assert decisions == [False, False, True, False, False]  # equal to the minimum is not above it
    switch.new_trajectory()
    assert [bool(switch.update(torch.tensor(0.0), torch.tensor(v))) for v in [0.6, 0.7]] == [False, True]


def test_block_mse_of_fp_model_is_zero(tiny_dit, calib) -> None:
    assert block_mse(tiny_dit, tiny_dit, calib, max_samples=7) == 0.0
    assert len(calib.subset(7)) == 7


def test_config_from_dict_and_bad_values() -> None:
    cfg = CalibrationConfig.from_dict({"outer_iterations": 7, "lambda_r": 0.5})
    assert cfg.outer_iterations == 7 and cfg.lambda_r == 0.5 and cfg.cfg_scale == 4.0 and cfg.optimizer_steps == 350
    with pytest.raises(ValueError, match="bogus_key"):
        CalibrationConfig.from_dict({"bogus_key": 1})
    with pytest.raises(ValueError, match="objective"):
        CalibrationConfig.from_dict({"objective": "magic"})


def _vq_weights(vq) -> torch.Tensor:
    return torch.cat([vq.weight(i).detach().flatten() for i in range(len(vq))])


def test_sigterm_writes_the_checkpoint_at_the_step_end_and_the_resume_ends_equal(tiny_dit, tmp_path, monkeypatch,
                                                                                 sigterm_at_call) -> None:
    """SIGTERM during optimiser step 6 (one teacher call a step): checkpoint after step 7, stop; the resumed run's
    codebooks and assignments equal an uninterrupted run's."""
    cfg = CalibrationConfig(**{**CFG, "checkpoint_minutes": 60})  # no periodic checkpoint in this run
    q_model, vq, layers = _quantized(tiny_dit)
    calibrate(tiny_dit, q_model, vq, layers, cfg)
    whole = _vq_weights(vq)
    checkpoint, key = tmp_path / "resume.pt", "fingerprint"
    q_model, vq, layers = _quantized(tiny_dit)
    sigterm_at_call(tiny_dit, 7)
    with pytest.raises(JobTerminated, match=r"resume.pt at optimiser step 7 kept: a rerun resumes there"):
        calibrate(tiny_dit, q_model, vq, layers, cfg, checkpoint, fingerprint=key)
    monkeypatch.undo()
    state = load_checkpoint(checkpoint, key, "cpu")
    assert state["switch"]["steps"] == 7
    q_model = copy.deepcopy(tiny_dit)
    vq, layers = restore_layers(q_model, block_linear_names(q_model), state)
    history = calibrate(tiny_dit, q_model, vq, layers, cfg, checkpoint, state, key)
    assert history["optimizer_steps"] == 15 and torch.equal(_vq_weights(vq), whole)


def test_out_of_memory_stops_naming_the_kept_checkpoint(tiny_dit, tmp_path, monkeypatch) -> None:
    """Halving a calibration step's inputs would change the calibration: it stops instead (one-line OSError)."""
    forward, calls = tiny_dit.forward, []

    def small_gpu(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    q_model, vq, layers = _quantized(tiny_dit)
    monkeypatch.setattr(tiny_dit, "forward", small_gpu)
    cfg = CalibrationConfig(**{**CFG, "checkpoint_minutes": 0})
    with pytest.raises(OSError, match=r"out of GPU memory at calibration step 3 \(checkpoint .*resume.pt at optimiser "
                                      r"step 3 kept.*labels_per_trajectory"):
        calibrate(tiny_dit, q_model, vq, layers, cfg, tmp_path / "resume.pt")


def test_nan_loss_stops_at_the_history_point_naming_step_and_block(tiny_dit, monkeypatch) -> None:
    """Block 1 turns NaN at optimiser step 4 (blockwise: block 0 stays finite); the next history point is step 6."""
    monkeypatch.setattr(calibration, "HISTORY_POINTS", 5)  # a history point every 3 steps
    q_model, vq, layers = _quantized(tiny_dit)
    layer = next(m for name, m in layers.items() if name.startswith("transformer_blocks.1."))
    forward, calls = layer.forward, []  # the student's layer runs once per optimiser step

    def diverging(x):
        calls.append(1)
        return forward(x) * (float("nan") if len(calls) > 4 else 1.0)

    monkeypatch.setattr(layer, "forward", diverging)
    cfg = CalibrationConfig(**{**CFG, "objective": "blockwise"})
    with pytest.raises(NonFiniteLoss, match=r"L_d nan, L_r .* at optimiser step 6 in block 1; no packed model"):
        calibrate(tiny_dit, q_model, vq, layers, cfg)


def test_checkpoint_fingerprint_ignores_the_checkpoint_interval_and_the_block_mse_check_only() -> None:
    from vq4dit.methods.vq import fingerprint

    setting, names = {"id": "vq4dit-w2", "method": "vq4dit", "k": 16, "d": 4}, ["a", "b"]
    base = fingerprint(setting, CalibrationConfig(), names)
    assert fingerprint(setting, CalibrationConfig(checkpoint_minutes=0, block_mse=False), names) == base
    assert fingerprint(setting, CalibrationConfig(lr_logits=0.1), names) != base
    assert fingerprint({**setting, "k": 32}, CalibrationConfig(), names) != base
