"""Lightning callbacks: doors onto the lq workflow (``lq.workflow``) for an unmodified LightningModule."""

from lq.callbacks.ptq import Int8PTQ
from lq.callbacks.qat import Int8QAT
from lq.callbacks.sensitivity import Int8Sensitivity
from lq.callbacks.training import Int8Training

__all__ = ["Int8PTQ", "Int8QAT", "Int8Sensitivity", "Int8Training"]
