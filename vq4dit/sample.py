"""Sample stage: one shard of class-conditional samples, DDPM with respaced steps and guidance.

The sampler follows DiT's evaluation (``sample_ddp.py``): 1000 training steps respaced by
``space_timesteps``, learned-range variance, classifier-free guidance on a doubled batch with the
null label, and only the conditional half kept. The schedule is improved-DDPM's (``RespacedDiffusion``):
every coefficient computed in float64, then cast to float32 as DiT does. diffusers' ``DDPMScheduler``
takes the same step but derives the respaced beta ``1 - ᾱ_t/ᾱ_prev`` and the posterior variance in
float32 from float32 ᾱ (about 1e-3 relative off near t = 0), so the step is written here.
Image ``i`` draws its label, initial noise and per-step noise from one generator seeded by
(``seed``, ``i``) only, so samples do not depend on the shard size or the batch size.

Nothing long is lost to a kill: a job keeps every finished batch in ``<shard>.partial/`` (:class:`BatchStore`)
and a rerun starts at the first missing image; out of GPU memory it halves its batch and goes on; on
SIGTERM it stops within one sampling step, its finished batches kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from vq4dit.io import (
    META_KEY, TerminationRequest, atomic_savez, corrupt, environment, file_sha256, halved_batch_size, load_npz,
    log_peak_gpu_memory, meta_array, progress, read_meta, resolve_device, verify_file, verify_npz,
)
from vq4dit.models import num_classes
from vq4dit.packed import load_quantized_transformer

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def training_betas() -> np.ndarray:
    """DiT's training diffusion: linear betas 1e-4..0.02 over 1000 steps, in float64 (improved DDPM's "linear")."""
    return np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64)


class RespacedDiffusion:
    """improved-DDPM's ``SpacedDiffusion`` over the kept ``timesteps``: learned-range variance, epsilon prediction.

    Respaced betas ``1 - ᾱ_t/ᾱ_prev``, posterior mean coefficients and the clipped posterior log-variance
    are computed in float64 from the float64 training schedule, then cast to float32 (as DiT's
    ``_extract_into_tensor``). ``timesteps`` are the original indices, descending (the model sees those).
    """

    def __init__(self, timesteps: list[int], device: torch.device | str = "cpu"):
        kept = sorted(timesteps)
        ab = np.cumprod(1.0 - training_betas())[kept]
        ab_prev = np.append(1.0, ab[:-1])
        betas = 1.0 - ab / ab_prev
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # entry 0 is replaced by entry 1 (improved DDPM); with one step it is unused (the last step adds no noise)
        clipped = np.append(post_var[1] if len(kept) > 1 else betas[0], post_var[1:])
        coefs = {
            "sqrt_recip_ab": np.sqrt(1.0 / ab), "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
            "mean_x0": betas * np.sqrt(ab_prev) / (1.0 - ab), "mean_xt": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
            "min_log": np.log(clipped), "max_log": np.log(betas),
        }
        self.coefs = {k: torch.from_numpy(v).to(device=device, dtype=torch.float32) for k, v in coefs.items()}
        self.timesteps = kept[::-1]
        self.index = {t: i for i, t in enumerate(kept)}

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """x_{prev} from x_t and the model's (epsilon, variance value) output; no noise at the last step.

        Noise of image ``i`` comes from ``generators[i]`` (drawn on the CPU, as diffusers' ``randn_tensor``).
        """
        c = {k: v[self.index[int(t)]] for k, v in self.coefs.items()}
        eps, var_value = model_output.split(x.shape[1], dim=1)
        x0 = c["sqrt_recip_ab"] * x - c["sqrt_recipm1_ab"] * eps
        mean = c["mean_x0"] * x0 + c["mean_xt"] * x
        if self.index[int(t)] == 0:
            return mean
        frac = (var_value + 1) / 2
        log_variance = frac * c["max_log"] + (1 - frac) * c["min_log"]
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generators]).to(x.device)
        return mean + torch.exp(0.5 * log_variance) * noise


def check_cfg_scale(cfg_scale: float) -> float:
    """DiT guides only above 1 (1 = no guidance); a scale below 1 is refused."""
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale {cfg_scale}: classifier-free guidance scale must be >= 1 (1 = no guidance), as in DiT")
    return cfg_scale


def space_timesteps(num_timesteps: int, section_counts: list[int]) -> list[int]:
    """Timesteps kept by improved-DDPM/DiT respacing: per equal section, evenly spaced and rounded.

    Python's ``round`` (half to even) is part of the published rule.
    """
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``: a function of (seed, index) only."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def guided_output(out: torch.Tensor, channels: int, cfg_scale: float, cfg_channels: int | None) -> torch.Tensor:
    """Combine the conditional and null halves: guide the first ``cfg_channels`` noise channels (all if None).

    DiT's ``forward_with_cfg`` guides 3 of the 4 latent channels; the learned variance is never guided.
    """
    cond, uncond = out.chunk(2)
    guided = cond.clone()
    g = channels if cfg_channels is None else min(cfg_channels, channels)
    guided[:, :g] = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
    return guided


class Trajectory:
    """One guided DDPM trajectory of DiT's respaced sampler, advanced one sampling step at a time.

    :meth:`inputs` gives the model input of the current step (the batch doubled with the null label
    when guided), :meth:`advance` takes the model's output on it. Image ``i``'s initial and per-step
    noise come from ``generators[i]``; :meth:`state_dict` holds everything needed to continue
    (current ``x``, step, generator states).
    """

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, generators: list[torch.Generator],
                 steps: int, cfg_scale: float, cfg_channels: int | None = None) -> None:
        self.device = next(model.parameters()).device
        cfg = model.config
        self.channels, self.cfg_scale, self.cfg_channels = cfg.in_channels, cfg_scale, cfg_channels
        self.scheduler = RespacedDiffusion(space_timesteps(NUM_TRAIN_TIMESTEPS, [steps]), self.device)
        self.generators = generators
        shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        self.labels = labels.to(self.device)
        self.null = torch.full_like(self.labels, num_classes(model))
        self.guided = check_cfg_scale(cfg_scale) > 1.0
        self.position = 0

    @property
    def done(self) -> bool:
        return self.position == len(self.scheduler.timesteps)

    @property
    def t(self) -> int:
        return self.scheduler.timesteps[self.position]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, t, class labels) the model sees at the current step."""
        model_in = torch.cat([self.x, self.x]) if self.guided else self.x
        class_in = torch.cat([self.labels, self.null]) if self.guided else self.labels
        return model_in, torch.full((len(model_in),), self.t, device=self.device, dtype=torch.long), class_in

    def advance(self, out: torch.Tensor) -> None:
        """One sampler step from the model's output on :meth:`inputs`."""
        out = out.float()
        if self.guided:
            out = guided_output(out, self.channels, self.cfg_scale, self.cfg_channels)
        self.x = self.scheduler.step(out, self.t, self.x, self.generators)
        self.position += 1

    def state_dict(self) -> dict:
        return {"x": self.x, "position": self.position, "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.position = state["x"].to(self.device), state["position"]
        for generator, generator_state in zip(self.generators, state["generators"]):
            generator.set_state(generator_state)


@torch.inference_mode()
def sample_batch(
    model: torch.nn.Module,
    labels: torch.Tensor,
    generators: list[torch.Generator],
    steps: int,
    cfg_scale: float,
    cfg_channels: int | None = None,
    hook=None,
) -> torch.Tensor:
    """Run the respaced DDPM sampler; returns final samples (model space). ``hook(t, x, y)`` sees each model input."""
    trajectory = Trajectory(model, labels, generators, steps, cfg_scale, cfg_channels)
    while not trajectory.done:
        model_in, t_in, class_in = trajectory.inputs()
        if hook is not None:
            hook(t_in, model_in, class_in)
        trajectory.advance(model(model_in, timestep=t_in, class_labels=class_in).sample)
    return trajectory.x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats to uint8 NHWC exactly as DiT's ``sample_ddp.py``: clamp((x+1)*127.5+0.5, 0, 255)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def decode(latents: torch.Tensor, vae) -> torch.Tensor:
    """Decode latents with the VAE after undoing the 0.18215 latent scale (pixel models pass ``vae=None``)."""
    if vae is None:
        return latents
    return vae.decode(latents / 0.18215).sample


def labels_for(seed: int, start: int, count: int, classes: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Labels and generators of images ``start .. start+count-1``; the label is the generator's first draw."""
    generators = [image_generator(seed, i) for i in range(start, start + count)]
    labels = torch.cat([torch.randint(classes, (1,), generator=g) for g in generators])
    return labels, generators


PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision: str, device_type: str) -> torch.autocast:
    """Matmul precision of the run: fp32, tf32 (DiT's sampling scripts allow TF32) or bf16 autocast.

    Returns the autocast context to run the networks in; the sampler's own arithmetic stays fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


class BatchStore:
    """The finished batches of one shard: in memory, and in ``folder`` when given (``batch-<first image>.npz``).

    Each batch file is written atomically, with its checksum record (checked on resume) and the job's
    ``key`` (what its images depend on: seed, steps, guidance, precision, packed model, shard range);
    files that fail the check or hold another key are removed.
    Batches are keyed by their first image: image i depends on (seed, i) only, so a rerun at another
    batch size continues at the first missing image.
    """

    def __init__(self, folder: Path | None = None, key: dict | None = None) -> None:
        self.folder, self.key = folder, key or {}
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def resume(self, start: int) -> int:
        """Load the kept batches contiguous from ``start``; returns the first image still to make."""
        if self.folder is None or not self.folder.is_dir():
            return start
        kept = {}
        for path in self.folder.glob("batch-*.npz"):
            if self._meta(path) != self.key:
                log.warning("%s: unreadable or made from other inputs; removed", path)
                path.unlink()
            else:
                kept[int(path.stem.split("-")[1])] = path
        begin = start
        while begin in kept:
            batch = load_npz(kept.pop(begin), ("images", "labels"))
            self.images.append(batch["images"])
            self.labels.append(batch["labels"])
            begin += len(batch["labels"])
        if begin > start:
            log.info("%s: resuming at image %d (%d images kept)", self.folder, begin, begin - start)
        return begin

    @staticmethod
    def _meta(path: Path) -> dict | None:
        try:
            verify_npz(path)
            return read_meta(path)
        except (OSError, ValueError, zipfile.BadZipFile):
            return None

    def add(self, begin: int, images: np.ndarray, labels: np.ndarray) -> None:
        if self.folder is not None:
            atomic_savez(self.folder / f"batch-{begin:09d}.npz", "sample", images=images, labels=labels,
                         **{META_KEY: meta_array(self.key)})
        self.images.append(images)
        self.labels.append(labels)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.images), np.concatenate(self.labels)

    def remove(self) -> None:
        """Drop the batch files (once the shard is written)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def partial_folder(shard: Path) -> Path:
    """Where the sample job of ``shard`` keeps its finished batches: ``<shard>.partial``, never a rule's output."""
    return shard.with_name(shard.name + ".partial")


def generate_shard(
    model: torch.nn.Module, vae, seed: int, start: int, count: int, batch_size: int,
    steps: int, cfg_scale: float, cfg_channels: int | None, precision: str = "fp32",
    store: BatchStore | None = None, stop: TerminationRequest | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of one shard, generated in batches from the first image ``store`` lacks.

    Out of GPU memory, the batch is halved (down to one image) and retried. ``stop``: checked at every
    sampling step; after SIGTERM it raises (finished batches kept in ``store``).
    """
    store = store or BatchStore()
    device = next(model.parameters()).device
    autocast = set_precision(precision, device.type)
    begin = store.resume(start)
    with progress(total=count, initial=begin - start, desc=f"shard@{start}", unit="image") as bar:
        while begin < start + count:
            n = min(batch_size, start + count - begin)
            hook = None if stop is None else lambda *_: stop.check(
                f"images {start}..{begin - 1} kept in {store.folder}: a rerun resumes at image {begin}")
            y, gens = labels_for(seed, begin, n, num_classes(model))
            try:
                with autocast:
                    x = sample_batch(model, y, gens, steps, cfg_scale, cfg_channels, hook)
                with torch.inference_mode(), autocast:
                    images = to_uint8(decode(x, vae).float())
            except torch.OutOfMemoryError:
                batch_size = halved_batch_size(n, device, log)
                continue
            store.add(begin, images, y.numpy())
            begin += n
            bar.update(n)
    return store.arrays()


def load_vae(directory: str | None, device: torch.device):
    """The VAE decoder of latent-space presets, or None for pixel-space models."""
    if not directory:
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(directory).to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transformer", required=True, help="diffusers transformer folder of the FP model")
    parser.add_argument("--quantized", required=True, help="packed model of the setting (quantize stage output)")
    parser.add_argument("--quantize-info", help="the quantize job's info JSON: the packed model is checked against its sha256")
    parser.add_argument("--vae", default="", help="diffusers VAE folder; empty for pixel-space models")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--cfg-scale", type=cfg_scale_arg, required=True, help="guidance scale >= 1 (1: none)")
    parser.add_argument("--cfg-channels", type=int, default=None, help="guided noise channels (default: all)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, required=True, help="global index of the shard's first image")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True, help=".npz with arr_0 (uint8 NHWC) and labels")


def cfg_scale_arg(text: str) -> float:
    """``--cfg-scale``: a float >= 1, else argparse's one-line usage error."""
    try:
        return check_cfg_scale(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def recorded_sha256(info: Path) -> str | None:
    """The packed model's sha256 its quantize job recorded in ``info`` (None in an info written before it did)."""
    try:
        return json.loads(info.read_text()).get("packed_sha256")
    except json.JSONDecodeError as err:
        raise corrupt(info, f"not JSON ({err})", "quantize") from err


def run(args: argparse.Namespace) -> None:
    packed_sha256 = (verify_file(args.quantized, recorded_sha256(Path(args.quantize_info)), "quantize")
                     if args.quantize_info else file_sha256(args.quantized))  # hashed once: checked, the resume key
    device = resolve_device(args.device)
    model = load_quantized_transformer(args.transformer, args.quantized, device)
    if args.compile:
        model = torch.compile(model)
    vae = load_vae(args.vae, device)
    log.info("sampling images %d..%d, %d steps, cfg %.2f on %s", args.start, args.start + args.count - 1,
             args.steps, args.cfg_scale, device)
    key = {"packed_sha256": packed_sha256, "start": args.start, "count": args.count,
           "seed": args.seed, "steps": args.steps,
           "cfg_scale": args.cfg_scale, "cfg_channels": args.cfg_channels, "precision": args.precision, "vae": args.vae}
    store = BatchStore(partial_folder(Path(args.output)), key)
    with TerminationRequest() as stop:
        images, labels = generate_shard(model, vae, args.seed, args.start, args.count, args.batch_size, args.steps,
                                        args.cfg_scale, args.cfg_channels, args.precision, store, stop)
    meta = environment(device, seed=args.seed, precision=args.precision)  # for the manifest (vq4dit.manifest)
    atomic_savez(Path(args.output), "sample", arr_0=images, labels=labels, **{META_KEY: meta_array(meta)})
    store.remove()
    log.info("wrote %s: %s", args.output, images.shape)
    log_peak_gpu_memory(log, device)
