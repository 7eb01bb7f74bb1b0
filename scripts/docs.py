"""Build lq's API reference (HTML) from the docstrings with pdoc.

    python scripts/docs.py            # writes docs/api/index.html (docs/ is not committed)
    python scripts/docs.py OUT_DIR

Every public module of the package is documented (names starting with "_" are private). The test
``tests/test_docs.py`` runs the same build, so CI builds the docs on every run, and fails on a public name
without a docstring.
"""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path

#: pdoc says this when a package's ``__init__`` re-exports a name that equals a submodule's name
#: (``lq.deploy.convert`` the function vs the module): the module is documented once, which is what we want.
_REPEATED = "but a module with this name has already been added"


def public_modules() -> list[str]:
    """``lq`` and every submodule whose dotted name has no part starting with ``_``."""
    import lq

    names = ["lq"]
    for info in pkgutil.walk_packages(lq.__path__, "lq."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def build(out: Path) -> list[str]:
    """Write the HTML reference to ``out``; returns pdoc's warnings other than the expected repeats.

    Raises:
        ImportError: pdoc is not installed (``pip install 'lq[docs]'``).
    """
    try:
        import pdoc
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError("the API reference needs pdoc: pip install 'lq[docs]'") from err
    pdoc.render.configure(docformat="google", footer_text="lq", search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*public_modules(), output_directory=Path(out))
    return [str(w.message) for w in caught if _REPEATED not in str(w.message)]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "docs" / "api"
    problems = build(out)
    for message in problems:
        print(f"pdoc: {message}", file=sys.stderr)
    print(f"API reference: {out / 'index.html'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
