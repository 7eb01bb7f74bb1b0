"""The API reference builds (pdoc, ``scripts/docs.py``) and documents every public name.

CI runs the test suite, so this is the docs build in CI: a public name without a docstring, or a module pdoc
cannot import, fails here.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the packages whose ``__all__`` is lq's public API (DESIGN.md "Public API" and the README)
PUBLIC = ["lq", "lq.callbacks", "lq.ops", "lq.deploy", "lq.nn", "lq.quant", "lq.calib", "lq.data", "lq.models"]


def _docs_script():
    spec = importlib.util.spec_from_file_location("lq_docs_script", ROOT / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public_names() -> list[tuple[str, str, object]]:
    names = []
    for modname in PUBLIC:
        module = importlib.import_module(modname)
        assert hasattr(module, "__all__"), f"{modname} has no __all__: its public API is undefined"
        names += [(modname, name, getattr(module, name)) for name in module.__all__]
    return names


def test_every_public_name_has_a_docstring():
    missing = []
    for modname, name, obj in _public_names():
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
            continue  # constants: documented by a #: comment where they are defined
        if not inspect.getdoc(obj):
            missing.append(f"{modname}.{name}")
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if attr.startswith("_") or not inspect.isfunction(fn):
                    continue
                # inherited hook docs count (a Lightning Callback hook documents itself)
                if not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{modname}.{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    docs = _docs_script()
    modules = docs.public_modules()
    assert "lq.callbacks" in modules and "lq.ops.int8_mm" in modules and not any("._" in m for m in modules)
    problems = docs.build(tmp_path)
    assert problems == [], problems
    index = tmp_path / "index.html"
    assert index.is_file()
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for modname in PUBLIC:
        assert modname.replace(".", "/") + ".html" in pages, f"no page for {modname}"
    # the fixed public API (DESIGN.md) is on its pages, with its docstrings
    top = (tmp_path / "lq.html").read_text()
    for name in ("quantize", "calibrate", "sensitivity", "partial_quantize", "convert", "export_onnx", "QuantConfig"):
        assert f'id="{name}"' in top, f"lq.{name} missing from the reference"
    callbacks = (tmp_path / "lq" / "callbacks.html").read_text()
    for name in ("Int8PTQ", "Int8QAT", "Int8Sensitivity", "Int8Training"):
        assert f'id="{name}"' in callbacks, f"lq.callbacks.{name} missing from the reference"
    assert inspect.getdoc(importlib.import_module("lq.callbacks").Int8QAT).split("\n")[0][:40] in callbacks
