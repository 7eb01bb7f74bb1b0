"""Attention matmuls of Hugging Face transformers models as ``lq.nn.Matmul`` modules, so ``lq.quantize`` makes
them ``QuantMatmul`` (the paper quantizes "other matrix multiplications" too, Section 4: ``Q K^T`` and ``P V``).

transformers' attention modules call whatever function is registered under ``config._attn_implementation``
(its ``AttentionInterface``): ``sdpa`` by default, where the two matmuls are fused and invisible to module
swapping. :func:`use_matmul_attention` registers one more implementation, ``"lq_matmul"``: the eager
computation ``softmax(Q K^T * scaling + mask) V`` with its two matmuls through the modules ``qk_matmul`` and
``pv_matmul`` that it attaches to each attention module. In float it is the eager attention (sdpa computes the
same function, in another summation order).

What stays float: the softmax, the attention mask addition, LayerNorm, GELU and the embeddings (the paper
quantizes only the inputs of matrix multiplications).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lq.nn.matmul import Matmul

#: the name registered with transformers' AttentionInterface
IMPLEMENTATION = "lq_matmul"


def _lq_matmul_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, with ``Q K^T`` and ``P V`` through the module's Matmul modules (plain
    ``torch.matmul`` for an attention module :func:`use_matmul_attention` did not equip). Grouped-query
    attention repeats the key/value heads (``module.num_key_value_groups``); the softmax runs in fp32.

    Raises:
        NotImplementedError: the model asks for logit soft-capping, a sliding window or attention sinks, which
            this eager computation does not implement (keep such a model's ``sdpa``/eager attention).
    """
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(
            f"lq_matmul attention ({type(module).__name__}): {unsupported} are not implemented; this model's "
            "attention cannot run through lq.nn.Matmul (do not call use_matmul_attention on it)"
        )
    qk = getattr(module, "qk_matmul", torch.matmul)
    pv = getattr(module, "pv_matmul", torch.matmul)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = qk(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = pv(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _calls_attention_interface(module: nn.Module) -> bool:
    try:
        return "attention_interface" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def use_matmul_attention(model: nn.Module) -> list[str]:
    """Route every attention module of a transformers model through ``"lq_matmul"`` and give each one the Matmul
    modules ``qk_matmul`` and ``pv_matmul``; call before ``lq.quantize``. Returns the attention modules' names.

    Raises:
        ImportError: transformers is not installed.
        ValueError: the model has no attention module that dispatches through transformers' AttentionInterface
            (older transformers versions, or a model that computes attention in its own code: write
            ``self.matmul = lq.nn.Matmul()`` there instead).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError as err:
        raise ImportError("use_matmul_attention needs transformers with its AttentionInterface: "
                          "pip install 'transformers>=4.53'") from err
    AttentionInterface.register(IMPLEMENTATION, _lq_matmul_attention)
    # the model builds its attention mask by implementation name: additive float masks, as eager attention takes
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    names, configs = [], []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation") or not _calls_attention_interface(module):
            continue
        module.qk_matmul = Matmul()
        module.pv_matmul = Matmul()
        configs.append(config)
        names.append(name)
    if not names:
        raise ValueError(
            "use_matmul_attention: no attention module of this model dispatches through transformers' "
            "AttentionInterface; write self.matmul = lq.nn.Matmul() in your attention code instead"
        )
    for config in configs + [getattr(m, "config", None) for m in model.modules()]:
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = IMPLEMENTATION
    return names
