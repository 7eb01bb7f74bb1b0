"""Progress bars with an ETA for lq's long loops: the per-layer sensitivity sweep, partial quantization and
calibrator "auto" evaluate the model once per step, which takes minutes on a real model.

One tqdm bar per loop (tqdm ships with Lightning), the current step's name (a layer, a calibrator) as the
bar's postfix, written to stderr and cleared when the loop ends. ``show``:

- ``True``: always show (the Lightning callbacks pass ``True`` when the Trainer has an enabled progress bar,
  on rank zero only; see ``lq.callbacks.base.progress_enabled``);
- ``None``: tqdm's own choice: shown when stderr is a terminal, hidden in logs and pipes;
- ``False``: no bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: what the ``progress=`` arguments of ``lq.sensitivity``, ``lq.partial_quantize``, ``lq.calibrate`` and
#: ``lq.choose_calibration`` accept (``lq.sensitivity`` also takes a ``progress(iterable)`` wrapper)
Show = bool | None


def check_show(show: Any, what: str) -> None:
    """Raise TypeError unless ``show`` is True, False or None."""
    if show is not None and not isinstance(show, bool):
        raise TypeError(f"{what}: progress must be True, False or None (shown on a terminal), got {show!r}")


def track(
    items: Sequence[T], show: Show, desc: str, unit: str = "eval", label: Callable[[T], str] = str
) -> Iterator[T]:
    """Yield ``items`` while a bar counts them: before each item the bar's postfix names it (``label(item)``),
    after it the count goes up, so the ETA is the mean time per item so far times the items left. Breaking
    out of the loop early closes the bar."""
    if show is False:
        yield from items
        return
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(items), desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=None if show is None else False
    )
    try:
        for item in items:
            bar.set_postfix_str(label(item), refresh=True)
            yield item
            bar.update(1)
    finally:
        bar.close()
