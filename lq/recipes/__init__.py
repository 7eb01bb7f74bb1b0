"""Recipe runners: plain functions ``run(cfg) -> dict`` that ``lq-train`` (``lq.cli``) calls with the composed
Hydra config. A recipe (``recipes/<name>.yaml``) names its runner in ``task``::

    task: ptq_table        # lq.recipes.ptq_table.run: PTQ with every calibrator (paper Table 5)
    task: workflow         # lq.recipes.workflow.run: fp32 -> PTQ -> sensitivity -> QAT (paper Fig. 5)
    task: int8_train       # lq.recipes.int8_train.run: Int8Training vs fp32 from the same init
    task: minilm           # lq.recipes.minilm.run: MiniLM sentence encoder PTQ, GELU10, partial quantization

``task`` may also be a dotted path ``package.module.function`` to a runner of your own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lq.extras import EXTRA_OF, missing_extra_message

#: runner name -> "module:function"
RUNNERS: dict[str, str] = {
    "ptq_table": "lq.recipes.ptq_table:run",
    "workflow": "lq.recipes.workflow:run",
    "int8_train": "lq.recipes.int8_train:run",
    "minilm": "lq.recipes.minilm:run",
}


def get_runner(task: str) -> Callable[[Any], dict]:
    """The runner function for ``task`` (a name in :data:`RUNNERS` or a dotted ``module.function`` path)."""
    if task in RUNNERS:
        module, _, fn = RUNNERS[task].partition(":")
    elif "." in str(task):
        module, _, fn = str(task).rpartition(".")
    else:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(RUNNERS)} or a dotted path module.function")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as err:
        if isinstance(err, ModuleNotFoundError) and err.name in EXTRA_OF:  # the runners need the cli extra
            raise ImportError(missing_extra_message(err.name, f"the {task!r} runner"), name=err.name) from err
        if task in RUNNERS:
            raise
        raise ValueError(f"task {task!r}: cannot import {module}.{fn} ({err})") from err


def run_recipe(cfg: Any) -> dict:
    """Run the composed config's ``task`` and return its results."""
    return get_runner(cfg.task)(cfg)


__all__ = ["RUNNERS", "get_runner", "run_recipe"]
