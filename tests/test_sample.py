import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusers import DDPMScheduler

from vq4dit.models import build_transformer
from vq4dit.io import JobTerminated, TerminationRequest, read_meta
from vq4dit.sample import (
    BatchStore, RespacedDiffusion, generate_shard, guided_output, image_generator, labels_for, sample_batch, space_timesteps,
    to_uint8,
)


def test_space_timesteps_follows_the_published_rule():
    assert space_timesteps(1000, [10]) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    fifty = space_timesteps(1000, [50])
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999
    assert fifty[:4] == [0, 20, 41, 61]  # 999/49 = 20.39: 20.39 -> 20, 40.78 -> 41, 61.16 -> 61
    assert space_timesteps(1000, [250])[:3] == [0, 4, 8]  # stride 4.012
    assert space_timesteps(1000, [1000]) == list(range(1000))
    assert space_timesteps(10, [3, 2]) == [0, 2, 4, 5, 9]  # two sections of 5 steps
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, [20])


def test_image_generator_depends_on_seed_and_index_only():
    a = torch.randn(4, generator=image_generator(0, 7))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 7)))
    labels, _ = labels_for(0, 0, 200, 10)
    assert set(labels.tolist()) == set(range(10))


def test_guidance_touches_only_the_guided_noise_channels():
    cond = torch.ones(2, 8, 4, 4)
    uncond = torch.zeros(2, 8, 4, 4)
    out = guided_output(torch.cat([cond, uncond]), channels=4, cfg_scale=1.5, cfg_channels=3)
    assert torch.all(out[:, :3] == 1.5)  # uncond + 1.5 * (cond - uncond)
    assert torch.all(out[:, 3:] == 1.0)  # 4th noise channel and the learned variance: conditional, unguided
    all_channels = guided_output(torch.cat([cond, uncond]), channels=4, cfg_scale=1.5, cfg_channels=None)
    assert torch.all(all_channels[:, :4] == 1.5) and torch.all(all_channels[:, 4:] == 1.0)


def test_uint8_conversion_matches_dit():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_shards_do_not_depend_on_shard_or_batch_size(tiny_dit, cfg_scale):
    whole, labels = generate_shard(tiny_dit, None, 3, 0, 6, 6, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    first, _ = generate_shard(tiny_dit, None, 3, 0, 2, 1, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    rest, rest_labels = generate_shard(tiny_dit, None, 3, 2, 4, 3, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    assert whole.shape == (6, 8, 8, 1) and whole.dtype == np.uint8
    np.testing.assert_array_equal(whole, np.concatenate([first, rest]))
    np.testing.assert_array_equal(labels[2:], rest_labels)


def test_guidance_changes_samples(tiny_dit):
    plain, _ = generate_shard(tiny_dit, None, 0, 0, 4, 4, steps=3, cfg_scale=1.0, cfg_channels=None)
    guided, _ = generate_shard(tiny_dit, None, 0, 0, 4, 4, steps=3, cfg_scale=4.0, cfg_channels=None)
    assert not np.array_equal(plain, guided)


def test_bf16_autocast_stays_close_and_precision_is_checked(tiny_dit):
    fp32, _ = generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None)
    bf16, _ = generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None,
                             precision="bf16")
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="fp16"):
        generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None, precision="fp16")


def improved_ddpm_tables(use_timesteps: set[int]) -> dict[str, np.ndarray]:
    """improved-DDPM (openai/improved-diffusion) in float64: linear betas, SpacedDiffusion's respaced betas, then
    GaussianDiffusion's tables computed from those betas."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    last, betas = 1.0, []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use_timesteps:
            betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
    betas = np.array(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_recip": np.sqrt(1.0 / ac), "sqrt_recipm1": np.sqrt(1.0 / ac - 1),
        "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac), "coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "log_var_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])), "log_betas": np.log(betas),
    }


def improved_ddpm_step(tables, index, x, eps, var_value, noise):
    """p_sample of a learned-range epsilon model: each table entry cast to float32 (``_extract_into_tensor``)."""
    at = {k: torch.tensor(v[index], dtype=torch.float32) for k, v in tables.items()}
    frac = (var_value + 1) / 2
    log_variance = frac * at["log_betas"] + (1 - frac) * at["log_var_clipped"]
    pred_xstart = at["sqrt_recip"] * x - at["sqrt_recipm1"] * eps
    mean = at["coef1"] * pred_xstart + at["coef2"] * x
    return mean + float(index != 0) * torch.exp(0.5 * log_variance) * noise


@pytest.mark.parametrize("steps", [4, 50, 250])
def test_respaced_step_is_improved_ddpms_float64_schedule(steps):
    kept = space_timesteps(1000, [steps])
    tables, diffusion = improved_ddpm_tables(set(kept)), RespacedDiffusion(kept)
    assert diffusion.timesteps == kept[::-1]
    gen = torch.Generator().manual_seed(steps)
    for index in (len(kept) - 1, len(kept) // 2, 1, 0):
        x, out = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen).clamp(-1, 1)
        seeds = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        noise = torch.cat([torch.randn(1, 1, 4, 4, generator=g) for g in seeds])
        ours = diffusion.step(out, kept[index], x, [torch.Generator().manual_seed(10 + i) for i in range(3)])
        expected = improved_ddpm_step(tables, index, x, out[:, :1], out[:, 1:], noise)
        torch.testing.assert_close(ours, expected, rtol=0, atol=3e-7)  # bit-exact here; diffusers: up to 1e-5 off


def test_float64_schedule_differs_from_diffusers_float32_only_by_rounding():
    """diffusers' DDPMScheduler takes the same step from float32 tables: equal up to float32 rounding."""
    kept = space_timesteps(1000, [50])
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="learned_range",
                              clip_sample=False, prediction_type="epsilon")
    scheduler.set_timesteps(timesteps=kept[::-1])
    ab64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    relative = np.abs(scheduler.alphas_cumprod.double().numpy() - ab64) / ab64
    assert relative.max() > 1e-7  # the float32 cumulative product drifts ...
    diffusion, x = RespacedDiffusion(kept), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    for t in (kept[-1], kept[1]):  # ... but the step is the same formula
        theirs = scheduler.step(out, t, x, generator=[torch.Generator().manual_seed(i) for i in range(2)]).prev_sample
        ours = diffusion.step(out, t, x, [torch.Generator().manual_seed(i) for i in range(2)])
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_guidance_below_one_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="cfg_scale 0.5.*>= 1"):
        sample_batch(tiny_dit, torch.tensor([1]), [image_generator(0, 0)], steps=2, cfg_scale=0.5)
    cli = subprocess.run([sys.executable, "-m", "vq4dit", "sample", "--cfg-scale", "0.5"], capture_output=True, text=True)
    assert cli.returncode == 2 and "--cfg-scale" in cli.stderr and ">= 1" in cli.stderr and "Traceback" not in cli.stderr


def test_every_layer_norm_has_dits_eps():
    norms = [m for m in build_transformer("DiT-digits", 8, 1, 10).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 * 2 + 1 and all(m.eps == 1e-6 for m in norms)  # per block: before attention and MLP


SHARD = dict(seed=3, start=0, count=6, steps=4, cfg_scale=4.0, cfg_channels=None)


def _shard(model, batch_size, **kwargs):
    return generate_shard(model, None, SHARD["seed"], SHARD["start"], SHARD["count"], batch_size, SHARD["steps"],
                          SHARD["cfg_scale"], SHARD["cfg_channels"], **kwargs)


@pytest.mark.parametrize("resume_batch", [2, 3])
def test_shard_stopped_by_sigterm_resumes_at_its_first_missing_image(tiny_dit, tmp_path, monkeypatch, sigterm_at_call,
                                                                    resume_batch):
    """SIGTERM inside the second batch (4 model calls a batch): batch 0..1 kept; the resume, at the same or another
    batch size, makes the rest and the shard equals an uninterrupted run's."""
    whole, labels = _shard(tiny_dit, 2)
    folder, key = tmp_path / "shard0.npz.partial", {"seed": 3}
    sigterm_at_call(tiny_dit, 6)
    with TerminationRequest() as stop, pytest.raises(JobTerminated, match=r"images 0\.\.1 kept .* resumes at image 2"):
        _shard(tiny_dit, 2, store=BatchStore(folder, key), stop=stop)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["batch-000000000.npz"] and read_meta(next(folder.iterdir())) == key
    store = BatchStore(folder, key)
    images, resumed_labels = _shard(tiny_dit, resume_batch, store=store)
    np.testing.assert_array_equal(images, whole)
    np.testing.assert_array_equal(resumed_labels, labels)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["batch-000000000.npz", "batch-000000002.npz"]
    store.remove()
    assert not folder.exists()


def test_batches_of_other_inputs_are_removed_not_used(tiny_dit, tmp_path):
    folder = tmp_path / "shard0.npz.partial"
    _shard(tiny_dit, 2, store=BatchStore(folder, {"seed": 4}))
    (folder / "batch-000000004.npz").write_bytes(b"truncated")
    assert BatchStore(folder, {"seed": 3}).resume(0) == 0 and not list(folder.iterdir())


def test_out_of_memory_halves_the_batch_and_keeps_the_images(tiny_dit, monkeypatch, caplog):
    """Simulated OOM above 2 images (4 guided model inputs): batch 5 -> 2; the images of a batch-2 run."""
    at_two, labels = _shard(tiny_dit, 2)
    forward = tiny_dit.forward

    def small_gpu(x, *args, **kwargs):
        if len(x) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(tiny_dit, "forward", small_gpu)
    images, halved_labels = _shard(tiny_dit, 5)
    np.testing.assert_array_equal(images, at_two)
    np.testing.assert_array_equal(halved_labels, labels)
    assert "out of cpu memory at batch size 5: going on at 2" in caplog.text


@pytest.fixture
def fp_packed(tiny_dit_dir, tmp_path):
    packed = tmp_path / "fp.safetensors"
    subprocess.run([sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir / "config.json"),
                    "--setting", json.dumps({"id": "fp", "method": "fp"}), "--device", "cpu", "--output",
                    str(packed), "--info", str(tmp_path / "fp.json")], check=True, capture_output=True)
    return packed


def _sample_command(tiny_dit_dir, packed, output) -> list[str]:
    return [sys.executable, "-m", "vq4dit", "sample", "--transformer", str(tiny_dit_dir / "config.json"),
            "--quantized", str(packed), "--steps", "50", "--cfg-scale", "4", "--seed", "0", "--start", "0",
            "--count", "16", "--batch-size", "2", "--device", "cpu", "--output", str(output)]


def test_sample_job_ended_by_sigterm_resumes_to_the_uninterrupted_shard(tiny_dit_dir, fp_packed, tmp_path):
    """The CLI: SIGTERM after its first finished batch -> one line, exit 1, batches kept; the rerun writes the
    shard an uninterrupted job writes (same arrays and meta but for timing) and removes the batches."""
    whole, cut = tmp_path / "whole.npz", tmp_path / "cut.npz"
    subprocess.run(_sample_command(tiny_dit_dir, fp_packed, whole), check=True, capture_output=True)
    job = subprocess.Popen(_sample_command(tiny_dit_dir, fp_packed, cut), stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "cut.npz.partial"
    while not list(partial.glob("batch-*.npz")) and job.poll() is None:
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    stderr = job.communicate()[1]
    assert job.returncode == 1 and not cut.exists(), stderr
    assert stderr.strip().splitlines()[-1].startswith("vq4dit sample: error: SIGTERM received"), stderr
    kept = len(list(partial.glob("batch-*.npz")))
    assert 0 < kept < 8
    resumed = subprocess.run(_sample_command(tiny_dit_dir, fp_packed, cut), check=True, capture_output=True, text=True)
    assert f"resuming at image {2 * kept}" in resumed.stderr and not partial.exists()
    with np.load(whole) as a, np.load(cut) as b:
        assert a.files == b.files
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert read_meta(whole) == read_meta(cut)
