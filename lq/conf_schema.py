"""Structured configs (Hydra's ConfigStore) for ``lq-train``: the composed config is type-checked while Hydra
composes it, so a wrong key, type or calibrator name fails before any job starts, with OmegaConf's error
naming the key (``Key 'calibratr' not in 'QuantSpecSchema' full_key: quant.activation.calibratr``;
``Invalid value 'maxx', expected one of [max, entropy, ...]``).

What is checked at compose time:

- ``quant`` (and ``quant.weight`` / ``quant.activation``): :class:`QuantConfigSchema` / :class:`QuantSpecSchema`
  are *derived* from the dataclasses ``lq.QuantConfig`` / ``lq.QuantSpec`` (their fields, annotations and
  defaults, plus Hydra's ``_target_``), so they cannot drift from the code. The string choices become enums
  built from the tuples ``QuantSpec`` validates against: ``calibrator`` from ``lq.quant.config.CALIBRATORS``,
  ``granularity`` from ``GRANULARITIES``, ``layers`` from ``LAYER_KINDS``.
- the top-level keys: every key ``lq-train`` and its runner read, typed (:class:`LqConfig`, and one subclass per
  runner in :data:`TASK_SCHEMAS` for the keys only that runner reads, e.g. ``calibrators`` of ``workflow``);
  ``tracking.*``.

Not checked here (open dicts): ``model``, ``data``, ``trainer``, ``callback`` (each option names a different
``_target_``; :mod:`lq.conf_check` checks their keys against the target's signature before the job runs) and
``logger`` (read with defaults by ``lq.tracking.make_logger``).

ConfigStore layout, group ``schema`` (package ``_global_``: the schema is the root of the config):
``schema/base`` (``conf/config.yaml`` lists it first, so everything after merges into it), one option per
runner (a recipe picks its runner's with ``- override /schema: workflow``), and ``schema/open``: the same
types with the top level open, for a recipe of your own whose runner reads keys of its own.

Values are enums of ``str`` (``cfg.quant.activation.calibrator == "max"`` holds, ``str()`` gives the name);
:func:`plain` turns a node into plain Python containers with ``str`` values, for anything built from it.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import typing
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lq.quant.config import CALIBRATORS, GRANULARITIES, LAYER_KINDS, QuantConfig, QuantSpec
from lq.tracking import LOGGER_KINDS

#: the ConfigStore group of the root schemas
GROUP = "schema"


class ChoiceEnum(str, Enum):
    """An enum of string choices whose members are the strings themselves (``== "max"``, ``str()`` -> "max")."""

    def __str__(self) -> str:
        return str(self.value)


def choice_enum(name: str, values: typing.Iterable[str], doc: str = "") -> type[ChoiceEnum]:
    """A :class:`ChoiceEnum` named ``name`` with one member per value, kept in this module (picklable)."""
    enum = ChoiceEnum(name, [(str(v), str(v)) for v in values], module=__name__)  # type: ignore[call-overload]
    enum.__doc__ = doc or f"The choices {', '.join(map(str, values))}."
    setattr(sys.modules[__name__], name, enum)
    return enum


CalibratorName = choice_enum("CalibratorName", CALIBRATORS, "``QuantSpec.calibrator``: lq.quant.config.CALIBRATORS.")
Granularity = choice_enum("Granularity", GRANULARITIES, "``QuantSpec.granularity``: lq.quant.config.GRANULARITIES.")
LayerKind = choice_enum("LayerKind", LAYER_KINDS, "``QuantConfig.layers``: lq.quant.config.LAYER_KINDS.")


def target_path(cls: type) -> str:
    """``"module.QualName"``: the ``_target_`` that builds ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _schema_default(value: Any, schemas: dict[type, type]) -> Any:
    """A dataclass field default as a schema default: nested dataclasses become their schema, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value) in schemas:
        kwargs = {f.name: _schema_default(getattr(value, f.name), schemas) for f in dataclasses.fields(value)}
        return schemas[type(value)](**kwargs)
    if isinstance(value, (list, tuple)):
        return [_schema_default(v, schemas) for v in value]
    return value


def schema_of(cls: type, types_: dict[str, Any] | None = None, schemas: dict[type, type] | None = None) -> type:
    """A dataclass with ``_target_`` (= ``cls``) and every field of the dataclass ``cls``, same order, same
    defaults and annotations; ``types_`` replaces a field's type (e.g. ``str`` by an enum of its choices);
    ``schemas`` maps a nested dataclass type to its schema (for defaults such as ``QuantConfig.weight``)."""
    types_ = types_ or {}
    schemas = schemas or {}
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=target_path(cls)))]
    for f in dataclasses.fields(cls):
        if f.default is not NO_DEFAULT:
            default = _schema_default(f.default, schemas)
        elif f.default_factory is not NO_DEFAULT:  # type: ignore[misc]
            default = _schema_default(f.default_factory(), schemas)  # type: ignore[misc]
        else:
            default = MISSING
        if isinstance(default, list) or dataclasses.is_dataclass(default):  # mutable: a fresh copy each time
            spec = field(default_factory=lambda d=default: copy.deepcopy(d))
        else:
            spec = field(default=default)
        fields.append((f.name, types_.get(f.name, hints[f.name]), spec))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
    schema.__module__ = __name__
    for name, _, spec in fields:  # a class attribute per field, as a written dataclass has (pdoc reads them)
        if name not in vars(schema):
            setattr(schema, name, spec.default_factory())  # type: ignore[misc]
    schema.__doc__ = f"Hydra schema of ``{target_path(cls)}``, derived from its dataclass fields (lq.conf_schema)."
    setattr(sys.modules[__name__], schema.__name__, schema)
    return schema


QuantSpecSchema = schema_of(QuantSpec, {"calibrator": CalibratorName, "granularity": Granularity})
QuantConfigSchema = schema_of(
    QuantConfig,
    {"weight": QuantSpecSchema, "activation": QuantSpecSchema, "layers": List[LayerKind]},  # type: ignore[valid-type]
    {QuantSpec: QuantSpecSchema},
)


@dataclass
class TrackingSchema:
    """``tracking``: what the runners log besides metrics (lq.tracking)."""

    histogram_layers: Any = MISSING  # int (the first N activation quantizers) or a list of globs
    percentiles: List[float] = MISSING


LoggerKind = choice_enum("LoggerKind", LOGGER_KINDS, "``logger.kind``: lq.tracking.LOGGER_KINDS.")


@dataclass
class LoggerSchema:
    """``logger`` (the keys ``lq.tracking.make_logger`` reads; conf/logger/*.yaml)."""

    kind: LoggerKind = MISSING  # type: ignore[valid-type]
    name: Optional[str] = None  # null: the recipe name
    project: str = "lq"  # W&B project
    offline: bool = True  # W&B: offline unless false and logged in
    log_model: bool = False  # W&B: Lightning's checkpoint upload


@dataclass
class LqConfig:
    """The top level every ``lq-train`` job has (``conf/config.yaml`` and the groups it lists). ``MISSING``
    (``???``) keys take the runner's default when a recipe leaves them out, or are required (``task``)."""

    task: str = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    run_dir: Optional[str] = MISSING
    metric: str = MISSING  # the logged test metric the result tables report (lq.recipes.common.test_metric)
    model: Dict[str, Any] = MISSING
    data: Dict[str, Any] = MISSING
    trainer: Dict[str, Any] = MISSING
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    quant: Optional[QuantConfigSchema] = None  # type: ignore[valid-type]  # null: no QuantConfig (Int8Training)
    callback: Dict[str, Any] = MISSING
    tracking: TrackingSchema = field(default_factory=TrackingSchema)


@dataclass
class PtqTableConfig(LqConfig):
    """Runner ``ptq_table`` (lq.recipes.ptq_table)."""

    candidates: Optional[List[str]] = MISSING  # calibrator candidates of calibrator=auto, e.g. percentile_99.99


@dataclass
class SensitivitySchema:
    """``sensitivity`` of runner ``workflow`` (Int8Sensitivity)."""

    target: float = MISSING  # relative drop allowed after partial quantization
    limit_batches: Any = MISSING  # int (batches) or float (fraction) of the validation split


@dataclass
class WorkflowConfig(LqConfig):
    """Runner ``workflow`` (lq.recipes.workflow)."""

    fold_bn: bool = MISSING
    calibrators: List[str] = MISSING
    ptq_variants: List[str] = field(default_factory=list)  # equalize / bias_correction / equalize+bias_correction
    sensitivity: SensitivitySchema = field(default_factory=SensitivitySchema)
    qat_fraction: float = MISSING
    qat_steps: Optional[int] = MISSING


@dataclass
class Int8TrainConfig(LqConfig):
    """Runner ``int8_train`` (lq.recipes.int8_train): no keys of its own."""


@dataclass
class PartialSchema:
    """``partial`` of runner ``minilm`` (lq.partial_quantize)."""

    enabled: bool = MISSING
    target: float = MISSING  # keep layers in float until the mean cosine is within this of 1.0


@dataclass
class MinilmConfig(LqConfig):
    """Runner ``minilm`` (lq.recipes.minilm)."""

    batch_size: int = MISSING
    layerwise_scope: str = MISSING  # "layer" | "model" (lq.calibrate)
    candidates: List[str] = MISSING
    gelu10_candidates: Optional[List[str]] = MISSING
    no_smoothquant_candidates: Optional[List[str]] = MISSING  # rows with QuantConfig(smoothquant=False)
    attention_matmuls: bool = MISSING  # Q K^T and P V through QuantMatmul (lq.nn.hf_attention)
    partial: PartialSchema = field(default_factory=PartialSchema)


@dataclass
class OpenConfig(LqConfig):
    """``schema=open``: :class:`LqConfig` whose top level also takes keys of its own (a runner of yours);
    ``quant`` and ``tracking`` stay closed."""


#: ``schema`` option -> root schema; the runner names of ``lq.recipes.RUNNERS`` plus ``base``
TASK_SCHEMAS: dict[str, type] = {
    "base": LqConfig,
    "ptq_table": PtqTableConfig,
    "workflow": WorkflowConfig,
    "int8_train": Int8TrainConfig,
    "minilm": MinilmConfig,
}
#: the ``schema`` option whose top level takes keys of a runner of your own (still typed below it)
OPEN = "open"

_registered = False


def register(store: ConfigStore | None = None) -> None:
    """Store the schemas in Hydra's ConfigStore (``schema/<option>``). Idempotent; ``lq.cli`` calls it."""
    global _registered
    if _registered and store is None:
        return
    cs = store or ConfigStore.instance()
    for name, schema in TASK_SCHEMAS.items():
        cs.store(group=GROUP, name=name, node=schema, package="_global_")
    open_root = OmegaConf.structured(OpenConfig)
    OmegaConf.set_struct(open_root, False)  # the top level takes new keys; quant, tracking stay closed
    for key in ("quant", "tracking"):
        OmegaConf.set_struct(open_root._get_node(key), True)  # type: ignore[arg-type]
    cs.store(group=GROUP, name=OPEN, node=open_root, package="_global_")
    _registered = _registered or store is None


def plain(node: Any) -> Any:
    """A config node as plain, resolved Python containers with enum values as strings (for building objects:
    an enum must not reach a QuantConfig or a checkpoint)."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return str(node) if isinstance(node, ChoiceEnum) else node


__all__ = [
    "CalibratorName",
    "ChoiceEnum",
    "GROUP",
    "Granularity",
    "LayerKind",
    "LqConfig",
    "MinilmConfig",
    "OPEN",
    "OpenConfig",
    "PtqTableConfig",
    "QuantConfigSchema",
    "QuantSpecSchema",
    "TASK_SCHEMAS",
    "WorkflowConfig",
    "Int8TrainConfig",
    "choice_enum",
    "plain",
    "register",
    "schema_of",
    "target_path",
]
