"""Optional dependencies, installed with ``pip install 'lq[EXTRA]'``.

lq's core (``lq.quantize``, ``lq.calibrate``, sensitivity, the Lightning callbacks, the int8 kernels,
``lq.convert``) needs torch, Lightning, torchmetrics, bitsandbytes and numpy only. The rest is imported inside
the function that uses it, through :func:`import_extra`, so a missing package fails there with the command
that installs it::

    cli     hydra-core, wandb (and matplotlib)   lq-train and its recipes (lq.cli, lq.recipes, lq.tracking)
    onnx    onnx, onnxruntime                    lq.export_onnx, the callbacks' export_onnx=
    plots   matplotlib                           the PNG charts (sensitivity, calibration histograms)
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> the extra that installs it
EXTRA_OF: dict[str, str] = {
    "hydra": "cli",
    "omegaconf": "cli",
    "wandb": "cli",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "matplotlib": "plots",
}


def missing_extra_message(module: str, feature: str) -> str:
    """``"<feature> needs <module> ...: pip install 'lq[<extra>]'"``."""
    top = module.partition(".")[0]
    return f"{feature} needs {top}, which is not installed: pip install 'lq[{EXTRA_OF[top]}]'"


def import_extra(module: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``; when the module's package is not installed, an ImportError that
    names the extra installing it (``pip install 'lq[onnx]'``).

    Args:
        module: the module to import, its top-level package one of :data:`EXTRA_OF`.
        feature: what needs it, for the message (``"lq.export_onnx"``).

    Raises:
        ImportError: the package is missing (a package that is installed but fails to import, e.g. for a
            dependency of its own, raises its own error unchanged).
    """
    top = module.partition(".")[0]
    if top not in EXTRA_OF:
        raise ValueError(f"import_extra: {top!r} is not an optional dependency of lq ({sorted(EXTRA_OF)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != top:  # the package is there; something inside it is missing
            raise
        raise ImportError(missing_extra_message(module, feature), name=top) from err


__all__ = ["EXTRA_OF", "import_extra", "missing_extra_message"]
