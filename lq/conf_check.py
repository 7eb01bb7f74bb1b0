"""The checks ``lq-train`` runs on the composed config before it calls the recipe's runner: what the schemas of
:mod:`lq.conf_schema` cannot say, checked against the code that will use the config, so that a mistake fails
in a second instead of after the fp32 training of a recipe.

- ``quant`` builds its ``lq.QuantConfig`` (``QuantSpec`` checks the ranges: bits 2..16, percentile in (0, 100],
  num_bins >= 128);
- every node with a ``_target_`` (``model``, ``data``, ``trainer``, ``callback``, nested ones) has only keys that
  the target's signature takes (a typo such as ``callback.num_sample`` otherwise fails only where the runner
  builds that callback, e.g. after the fp32 training of ``workflow``); targets taking ``**kwargs`` and targets
  that cannot be imported here (an optional package missing: the runner reports it) are skipped;
- keys added with Hydra's ``+key=value`` to a schema node that does not declare them (``+`` opens any node);
- calibrator candidate names (``calibrators``, ``candidates``, ``gelu10_candidates``) and ``ptq_variants``;
- the root schema is the one of the task's runner (``- override /schema: <task>`` in the recipe), unless the
  config has no schema at all (a ``$LQ_CONF_DIR`` whose ``config.yaml`` lists no ``schema``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lq.conf_schema import TASK_SCHEMAS, OpenConfig, plain

#: keys of the runners that hold calibrator candidate names (lq.recipes.common.parse_candidate)
CANDIDATE_KEYS = ("calibrators", "candidates", "gelu10_candidates")
#: keys Hydra's instantiate reads itself
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """The composed config cannot run; the message names the key."""


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """``(dotted path, node)`` for every dict node, depth first."""
    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing():
            return
        yield path, node
        for key in node.keys():
            if not OmegaConf.is_missing(node, key):
                yield from _nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        for i, item in enumerate(node._iter_ex(resolve=False)):
            yield from _nodes(item, f"{path}[{i}]")


def extra_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys present in a schema node (a dataclass) that its dataclass does not declare (``+key=...``);
    the top level of ``schema=open`` takes any key."""
    extra = []
    for path, node in _nodes(cfg):
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema) or (path == "" and schema is OpenConfig):
            continue
        declared = {f.name for f in dataclasses.fields(schema)}
        extra += [f"{path}.{k}" if path else str(k) for k in node.keys() if k not in declared]
    return extra


def unknown_arguments(cfg: DictConfig, skip: tuple[str, ...] = ("quant",)) -> list[str]:
    """``"<key>: <target> takes no argument '<name>' (it takes: ...)"`` for every key of a ``_target_`` node
    that the target's signature does not take. ``skip``: top-level keys left out (``quant`` is built whole)."""
    problems = []
    for path, node in _nodes(cfg):
        if path.split(".")[0].split("[")[0] in skip or "_target_" not in node:
            continue
        try:
            target = get_object(str(node._target_))
            params = inspect.signature(target).parameters.values()
        except Exception:  # noqa: BLE001 - not importable here (an optional package): the runner reports it
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            continue
        names = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        for key in node.keys():
            if key not in _HYDRA_KEYS and key not in names:
                where = f"{path}.{key}" if path else str(key)
                problems.append(f"{where}: {node._target_} takes no argument {key!r} (it takes: {', '.join(names)})")
    return problems


def check(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every key of the composed ``cfg`` that would fail (or be ignored) in
    the job; return when the job can start."""
    from lq.recipes.common import parse_candidate, parse_variant

    extra = extra_keys(cfg)
    problems = [f"{k}: not a key of the schema (added with +? check the spelling)" for k in extra]
    task = None if OmegaConf.is_missing(cfg, "task") else str(cfg.task)
    wanted = TASK_SCHEMAS.get(task) if task else None
    schema = OmegaConf.get_type(cfg)
    typed = dataclasses.is_dataclass(schema)  # a config folder of its own without `schema` stays untyped
    if wanted is not None and typed and schema not in (wanted, OpenConfig):
        name = next((n for n, s in TASK_SCHEMAS.items() if s is schema), getattr(schema, "__name__", schema))
        problems.append(
            f"task {task!r} needs the schema of its runner, not {name!r}: add `- override /schema: {task}` to the "
            "recipe's defaults (lq/conf_schema.py)"
        )
    if cfg.get("quant") is not None and not any(k.startswith("quant.") for k in extra):
        try:
            instantiate(plain(cfg.quant), _convert_="all")
        except Exception as err:  # noqa: BLE001 - QuantSpec / QuantConfig validation
            cause = err.__cause__ or err
            problems.append(f"quant: {cause}")
    problems += unknown_arguments(cfg)
    for key in CANDIDATE_KEYS:
        if key in cfg and not OmegaConf.is_missing(cfg, key) and cfg[key] is not None:
            for i, name in enumerate(cfg[key]):
                try:
                    parse_candidate(str(name))
                except ValueError as err:
                    problems.append(f"{key}[{i}]: {err}")
    if "ptq_variants" in cfg and not OmegaConf.is_missing(cfg, "ptq_variants") and cfg.ptq_variants is not None:
        for i, name in enumerate(cfg.ptq_variants):
            try:
                parse_variant(str(name))
            except ValueError as err:
                problems.append(f"ptq_variants[{i}]: {err}")
    if problems:
        raise ConfigError("the config cannot run:\n  " + "\n  ".join(problems))


__all__ = ["CANDIDATE_KEYS", "ConfigError", "check", "extra_keys", "unknown_arguments"]
