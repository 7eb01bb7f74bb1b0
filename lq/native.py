"""Build and load lq's small C kernels (``lq/deploy/gemv.c``, ``lq/ops/quant.c``) at first use.

A kernel is compiled with the C compiler Inductor uses too (``$CC``, split as a shell would so ``ccache gcc``
works, else ``cc`` / ``gcc`` / ``clang``), once per source, compiler and flags, into ``$LQ_CACHE_DIR`` (default
``~/.cache/lq``; a fresh temporary folder when that cannot be written), and loaded with ctypes. Its OpenMP
threads are torch's: the loader resolves ``libgomp.so.1`` to the copy torch loaded. ``LQ_NATIVE=0`` turns every
kernel off quietly; a failed build warns once per kernel and leaves its callers on the library kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["FLAGS", "build", "cache_dir", "compiler", "enabled", "load"]

#: flags every kernel is compiled with: no contraction of a * b + c into one rounding, no fast math (the
#: kernels reproduce torch's fp32 arithmetic bit for bit)
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")


def enabled() -> bool:
    """Whether the C kernels may be used (``LQ_NATIVE`` is not ``0``)."""
    return os.environ.get("LQ_NATIVE", "1") != "0"


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split as a shell would), else the first of ``cc`` / ``gcc`` / ``clang``."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/lq``, else ``~/.cache/lq``."""
    root = os.environ.get("LQ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lq"
    return Path(root)


def build(source: Path, cc: list[str], flags: Sequence[str] = FLAGS) -> Path:
    """The shared library of ``source`` for this compiler and ``flags``, compiled unless the cache holds it (the key
    covers the source, the headers beside it, the compiler's version and the flags)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    headers = "".join(h.read_text() for h in sorted(source.parent.glob("*.h")))  # (included by the source)
    key = source.read_text() + headers + " ".join(cc) + version + " ".join(flags) + sys.platform
    name = f"lq_{source.stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / name).exists():
            return folder / name
        tmp = tempfile.mkdtemp(dir=folder)  # the rename below makes concurrent builds safe
    except OSError as err:
        log.info("lq: cache folder %s not writable (%s); building in a temporary folder", cache_dir(), err)
        folder = Path(tempfile.mkdtemp(prefix="lq_native_"))
        tmp = tempfile.mkdtemp(dir=folder)
    built = Path(tmp) / name
    try:
        done = subprocess.run([*cc, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / name


def load(source: Path, purpose: str, flags: Sequence[str] = FLAGS) -> ctypes.CDLL | None:
    """``source`` built and loaded, or ``None`` with ``LQ_NATIVE=0`` or when it cannot be built (a
    ``RuntimeWarning`` that names ``purpose``, what runs slower without it)."""
    if not enabled():
        return None
    cc = compiler()
    try:
        if not cc:
            raise RuntimeError("no C compiler found (set CC)")
        return ctypes.CDLL(str(build(source, cc, flags)))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"lq: the C kernel {source.parent.name}/{source.name} could not be built ({err}); {purpose}. Install a "
            "C compiler or set CC to use it.",
            RuntimeWarning, stacklevel=3,
        )
        return None
