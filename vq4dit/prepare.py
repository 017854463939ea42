"""Prepare stage: the models and reference data every later stage reads.

Smoke preset (trained here, on CPU, from scikit-learn's digits):
  ``digits-transformer`` a tiny class-conditional DiT in pixel space (8x8x1) with learned sigma,
  trained with DiT's objective (epsilon MSE + variational bound for the variance, improved DDPM's
  hybrid loss) and 10% class dropout for guidance; saved in diffusers' layout.
  ``digits-features`` the digits feature network of the metrics (see ``vq4dit.features``).
  ``digits-reference`` the reference set: all 1797 digits as uint8 NHWC in ADM's .npz format.
Paper preset: ``download`` fetches a file and verifies its sha256; ``verify`` checks it again
before its first use (so a file placed by hand is checked too); ``convert-dit`` turns an
official DiT checkpoint (facebookresearch/DiT ``models.py`` key layout) into diffusers' layout.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import math
import pickle
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from vq4dit.features import DigitsFeatureNet
from vq4dit.io import atomic_output, atomic_savez, atomic_write_json, file_sha256, progress
from vq4dit.models import (
    block_linear_names, build_transformer, save_converted, tie_embedders, untie_embedders,
    use_original_timestep_embedding,
)
from vq4dit.sample import training_betas

log = logging.getLogger(__name__)

DIGITS_CLASSES = 10


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 NHWC (values 0..16 scaled to 0..255) and their labels."""
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class HybridLoss:
    """DiT's training loss: MSE on epsilon + the variational bound for the learned-range variance.

    The bound uses a stopped-gradient mean (improved DDPM); at t = 0 it is the Gaussian negative
    log-likelihood of x0 instead of ADM's discretized likelihood (a simplification for the proxy model).
    """

    def __init__(self):
        betas = torch.from_numpy(training_betas())
        ab = torch.cumprod(1 - betas, dim=0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        self.ab = ab.float()
        self.log_beta = torch.log(betas).float()
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.coef_x0 = (betas * ab_prev.sqrt() / (1 - ab)).float()
        self.coef_xt = ((1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)).float()

    def __call__(self, model, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(len(self.ab), (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = self.ab[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps, v = model(xt, timestep=t, class_labels=labels).sample.chunk(2, dim=1)
        mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        view = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731
        x0_pred = (xt - (1 - ab).sqrt() * eps.detach()) / ab.sqrt()
        mean_p = view(self.coef_x0) * x0_pred + view(self.coef_xt) * xt
        frac = (v + 1) / 2
        logvar_p = frac * view(self.log_beta) + (1 - frac) * view(self.post_logvar)
        mean_q = view(self.coef_x0) * x0 + view(self.coef_xt) * xt
        kl = normal_kl(mean_q, view(self.post_logvar), mean_p, logvar_p).mean(dim=(1, 2, 3))
        nll = 0.5 * (math.log(2 * math.pi) + logvar_p + (x0 - mean_p) ** 2 * torch.exp(-logvar_p)).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (mse + vb).mean()


def train_digits_transformer(steps: int, batch_size: int, lr: float, seed: int, class_dropout: float = 0.1):
    """Train the smoke preset's DiT on all digits; returns the model (untied embedders, eval mode)."""
    torch.manual_seed(seed)
    images, labels = digits_uint8()
    x_all, y_all = to_model_space(images), torch.from_numpy(labels)
    model = build_transformer("DiT-digits", sample_size=8, in_channels=1, num_classes=DIGITS_CLASSES)
    tie_embedders(model)
    model.eval()  # no dropout layers; label dropout is done here, once per sample for all blocks
    loss_fn, gen = HybridLoss(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)  # = per-tensor, faster on CPU
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = progress(range(steps), desc="train DiT-digits", unit="step")
    for _ in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        y = y_all[idx].clone()
        y[torch.rand(batch_size, generator=gen) < class_dropout] = DIGITS_CLASSES
        loss = loss_fn(model, x_all[idx], y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    untie_embedders(model)
    return model.eval()


def train_digits_features(steps: int, batch_size: int, lr: float, seed: int) -> tuple[DigitsFeatureNet, float]:
    """Train the digits feature network (random 1-pixel shifts as augmentation); returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = digits_uint8()
    x_all, y_all = to_model_space(images), torch.from_numpy(labels)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    train, test = perm[: int(0.8 * len(perm))], perm[int(0.8 * len(perm)):]
    net, gen = DigitsFeatureNet(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)  # = per-tensor, faster on CPU
    for _ in progress(range(steps), desc="train digits-cnn", unit="step"):
        idx = train[torch.randint(len(train), (batch_size,), generator=gen)]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x_all[idx], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(x)[2], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net(x_all[test])[2].argmax(1) == y_all[test]).float().mean().item()
    return net.eval(), accuracy


def download(url: str, output: Path, sha256: str | None, size: int | None = None) -> None:
    """Fetch ``url`` to ``output`` through a ``.part`` file; verify size and sha256 before the final rename."""
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, desc=output.name) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except (OSError, http.client.HTTPException) as err:
        part.unlink(missing_ok=True)
        expected = ", ".join(f"{k} {v}" for k, v in (("sha256", sha256), ("bytes", size)) if v)
        raise OSError(
            f"cannot download {url} to {output}: {err}. Offline? Place the file at {output} by hand"
            + (f" (expected {expected})" if expected else "")
        ) from err
    try:
        verify(part, sha256, size, name=output)
    except ValueError:
        part.unlink()
        raise
    part.replace(output)


def verify(path: Path, sha256: str | None, size: int | None = None, name: Path | None = None) -> str:
    """The file's sha256 (read once). Raises naming the file when it is missing, when its size is not ``size``
    (checked first: no hashing of a truncated 2 GB file) or its hash not ``sha256``; warns with the actual hash
    when no sha256 is configured."""
    if not path.is_file():
        raise FileNotFoundError(f"{name or path}: file not found; run the download rule or place it there by hand")
    actual_size = path.stat().st_size
    if size and actual_size != size:
        raise ValueError(f"{name or path}: {actual_size} bytes, expected {size} (truncated or a different file); "
                         "delete it and download it again")
    actual = file_sha256(path)
    if not sha256:
        log.warning("%s: no sha256 configured, not verified; it hashes to %s (pin that in the config)",
                    name or path, actual)
    elif actual != sha256:
        raise ValueError(f"{name or path}: sha256 {actual} does not match the expected {sha256}; "
                         "delete it and download it again")
    return actual


#: original DiT key prefix -> diffusers key prefix, per block (qkv is split separately)
BLOCK_KEYS = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
              "adaLN_modulation.1": "norm1.linear"}
#: original embedder key prefix -> diffusers prefix under each block's ``norm1.emb``
EMBEDDER_KEYS = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
                 "y_embedder.embedding_table": "class_embedder.embedding_table"}
TOP_KEYS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}


def convert_dit_state(original: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename an original DiT state dict into diffusers' ``DiTTransformer2DModel`` keys.

    qkv is split into to_q/to_k/to_v, the embedders are copied into every block's ``norm1.emb``, and
    the fixed sin-cos ``pos_embed`` (diffusers recomputes it) is dropped.
    """
    state = {}
    for suffix in ("weight", "bias"):
        for old, new in TOP_KEYS.items():
            state[f"{new}.{suffix}"] = original[f"{old}.{suffix}"]
        for i in range(depth):
            block = f"transformer_blocks.{i}"
            q, k, v = original[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)
            state.update({f"{block}.attn1.to_q.{suffix}": q, f"{block}.attn1.to_k.{suffix}": k,
                          f"{block}.attn1.to_v.{suffix}": v})
            for old, new in BLOCK_KEYS.items():
                state[f"{block}.{new}.{suffix}"] = original[f"blocks.{i}.{old}.{suffix}"]
            for old, new in EMBEDDER_KEYS.items():
                if f"{old}.{suffix}" in original:
                    state[f"{block}.norm1.emb.{new}.{suffix}"] = original[f"{old}.{suffix}"]
    return {k: v.clone() for k, v in state.items()}


def convert_dit(checkpoint: Path, arch: str, image_size: int, sha256: str | None):
    """Load an official DiT checkpoint (verified when a sha256 is configured) as a diffusers model."""
    verify(checkpoint, sha256)
    try:
        original = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{checkpoint}: cannot read the checkpoint ({err}); truncated? delete it and download it again") from err
    original = original.get("ema", original) if isinstance(original, dict) else original
    try:
        classes = original["y_embedder.embedding_table.weight"].shape[0] - 1
        channels = original["x_embedder.proj.weight"].shape[1]
        model = build_transformer(arch, sample_size=image_size // 8, in_channels=channels, num_classes=classes)
        state = convert_dit_state(original, len(model.transformer_blocks))
    except KeyError as err:
        raise ValueError(f"{checkpoint}: not a {arch} checkpoint in facebookresearch/DiT's layout; missing key {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: not a {arch} checkpoint ({err})") from err
    use_original_timestep_embedding(model)
    log.info("converted %s: %d block linears", checkpoint, len(block_linear_names(model)))
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("digits-transformer", "digits-features"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, required=True)
        p.add_argument("--batch-size", type=int, required=True)
        p.add_argument("--lr", type=float, required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--output", required=True, help="model folder (transformer) or weights file (features)")
    sub.add_parser("digits-reference").add_argument("--output", required=True)
    p = sub.add_parser("convert-dit")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--arch", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--output", required=True, help="diffusers model folder")
    p = sub.add_parser("download")
    p.add_argument("--url", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--size", type=int, default=0, help="expected bytes (0: not checked)")
    p.add_argument("--output", required=True)
    p = sub.add_parser("verify", help="check a downloaded (or hand-placed) file before its first use")
    p.add_argument("--file", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--size", type=int, default=0, help="expected bytes (0: not checked)")
    p.add_argument("--output", required=True, help="marker file: the file's sha256")


def run(args: argparse.Namespace) -> None:
    output, start = Path(args.output), time.perf_counter()
    if args.what == "digits-transformer":
        model = train_digits_transformer(args.steps, args.batch_size, args.lr, args.seed)
        model.save_pretrained(output, safe_serialization=True)
    elif args.what == "digits-features":
        net, accuracy = train_digits_features(args.steps, args.batch_size, args.lr, args.seed)
        log.info("digits-cnn held-out accuracy %.3f", accuracy)
        with atomic_output(output, (RuntimeError,)) as tmp:
            torch.save(net.state_dict(), tmp)
    elif args.what == "digits-reference":
        images, labels = digits_uint8()
        atomic_savez(output, "digits_reference", arr_0=images, labels=labels)
    elif args.what == "convert-dit":
        model = convert_dit(Path(args.checkpoint), args.arch, args.image_size, args.sha256 or None)
        save_converted(model, output, args.checkpoint)
    elif args.what == "verify":
        sha256 = verify(Path(args.file), args.sha256 or None, args.size or None)
        atomic_write_json(output, {"file": args.file, "sha256": sha256})
    else:
        download(args.url, output, args.sha256 or None, args.size or None)
    log.info("prepared %s in %.1f s", output, time.perf_counter() - start)
