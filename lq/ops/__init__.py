"""Real int8 compute with autograd (Wu et al. 2020 eq. 10 forward; Zhu et al. 2020 int8 training).

Public API::

    int8_linear(x, weight, bias=None, config=Int8ComputeConfig(), name=None, act_amax=None)
    int8_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                config=Int8ComputeConfig(), name=None, act_amax=None)

``Int8ComputeConfig.for_this_machine()`` picks 8-bit everything where the int8 kernels are exact (CUDA,
x86 with VNNI) and 7-bit activations/weights on x86 CPUs without VNNI (see ``lq.ops.hardware``); the
default ``Int8ComputeConfig()`` (8/8/8) runs the exact but slow reference kernels on such CPUs.
Set ``LQ_COMPILE_QUANT=0`` to skip torch.compile of the fused quantizers (``lq.ops.fused``).

Custom ops (``torch.ops.lq.*``): ``int8_mm``, ``int8_conv2d``, ``int8_conv2d_grad_input``,
``int8_conv2d_grad_weight`` -- each a portable reference plus CPU/CUDA fast kernels. On CPUs the quantizations
and output stages run small C kernels built at first use (``lq.ops.native_quant``: ``quant.c``, and ``amx.c``
for ``int8_mm`` on AMX-INT8 CPUs), bit-identical to the torch ops; ``LQ_NATIVE=0`` turns them off.
Gradient quantization helpers (Zhu et al.): ``quantize_grad``, ``deviation_lr_factor``,
``GradDeviationTracker``, ``reset_clip_state(model)`` (``Int8ComputeConfig(clip_every=n)``: the searched
clip ratios live with each layer object).
"""

from lq.ops.config import Int8ComputeConfig
from lq.ops.grad_quant import (
    GradDeviationTracker,
    deviation_lr_factor,
    quantize_grad,
    reset_clip_state,
)
from lq.ops.int8_conv import int8_conv2d
from lq.ops.int8_linear import int8_linear

__all__ = [
    "GradDeviationTracker",
    "Int8ComputeConfig",
    "deviation_lr_factor",
    "int8_conv2d",
    "int8_linear",
    "quantize_grad",
    "reset_clip_state",
]
