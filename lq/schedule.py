"""The QAT fine-tuning learning-rate schedule of Wu et al. 2020 (Section 6, Appendix A.2).

"The fine-tuning learning rate starts at 1/100th of the initial value used in the original training session
and is decayed down to 1/100th of the initial fine-tuning learning rate ... a cosine annealing learning rate
schedule which follows the monotonically decreasing half period of the cosine function."
"""

from __future__ import annotations

import math


def cosine_factor(step: int, total_steps: int, final_ratio: float) -> float:
    """Multiplier of the starting LR at ``step``: 1 at step 0, ``final_ratio`` at ``total_steps`` and after.

    ``final_ratio + (1 - final_ratio) * (1 + cos(pi * step / total_steps)) / 2``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class CosineFactor:
    """Picklable ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` (checkpoints pickle the scheduler)."""

    def __init__(self, total_steps: int, final_ratio: float) -> None:
        self.total_steps = int(total_steps)
        self.final_ratio = float(final_ratio)

    def __call__(self, step: int) -> float:
        return cosine_factor(step, self.total_steps, self.final_ratio)
