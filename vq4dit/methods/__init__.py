"""The quantization methods: one record per method name, read by every stage, rule and table that names methods.

Adding a method: one module in ``vq4dit/methods/`` with its quantize entry, one :data:`REGISTRY` record,
one ``config/settings.tsv`` row (and the name in ``workflow/schemas/settings.schema.yaml``'s enum).
Entries are imported lazily, so importing this package costs no torch import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    """One method name of ``config/settings.tsv``.

    ``entry`` is ``"module:function"`` (module under ``vq4dit.methods``), called as
    ``function(model, names, setting, calibration, device, teacher, **extra)`` -> (packed layers, info);
    ``extra`` holds ``checkpoint`` when ``calibrated`` and ``baselines`` when ``hessians``.
    """

    name: str
    format: str
    """Packed layer format (``vq4dit.packed.FORMATS``); ``fp``: no quantized layers."""
    calibrated: bool
    """Runs VQ4DiT's zero-data calibration (resumable from a checkpoint)."""
    hessians: bool
    """Needs the layer Hessians (and config key ``baselines``)."""
    entry: str

    def quantizer(self) -> Callable:
        """The quantize entry function (its module imported now)."""
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(f"vq4dit.methods.{module}"), function)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fp", "fp", calibrated=False, hessians=False, entry="fp:quantize_fp"),
    Method("rtn", "rtn", calibrated=False, hessians=False, entry="rtn:quantize_rtn"),
    Method("repq-vit", "rtn", calibrated=False, hessians=False, entry="rtn:quantize_rtn"),
    Method("gptq", "rtn", calibrated=False, hessians=True, entry="hessians:quantize_gptq"),
    Method("qdit", "rtn", calibrated=False, hessians=True, entry="hessians:quantize_qdit"),
    Method("vq-kmeans", "vq", calibrated=False, hessians=False, entry="vq:quantize_vq"),
    Method("vq-codebook", "vq", calibrated=True, hessians=False, entry="vq:quantize_vq"),
    Method("vq4dit", "vq", calibrated=True, hessians=False, entry="vq:quantize_vq"),
    Method("gptvq", "vq", calibrated=False, hessians=True, entry="hessians:quantize_gptvq"),
)}

#: methods whose quantize job runs the zero-data calibration (and can resume it)
CALIBRATED = frozenset(n for n, m in REGISTRY.items() if m.calibrated)
#: methods that need the layer Hessians (and config key ``baselines``)
HESSIAN_METHODS = frozenset(n for n, m in REGISTRY.items() if m.hessians)


def method(name: str) -> Method:
    """The registry record of ``name``; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]
