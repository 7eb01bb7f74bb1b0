"""Attention matmuls of a transformers model through lq.nn.Matmul (Q K^T and P V quantized, paper Section 4),
on a tiny randomly initialised BERT built from its config (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lq
from lq.nn.hf_attention import use_matmul_attention

transformers = pytest.importorskip("transformers")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded sentences: the mask must reach the eager computation as an additive mask
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_matmul_attention_computes_the_same_function_in_float():
    model = _bert()
    x = _inputs()
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    names = use_matmul_attention(model)
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    with torch.no_grad():
        out = model(**x).last_hidden_state
    keep = x["attention_mask"].bool()  # padded positions' outputs are not defined the same way by sdpa
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_attention_matmuls_are_quantized_and_calibrated():
    model = _bert()
    use_matmul_attention(model)
    lq.quantize(model)
    matmuls = {n: m for n, m in lq.quantized_layers(model).items() if isinstance(m, lq.nn.QuantMatmul)}
    assert sorted(matmuls) == [f"encoder.layer.{i}.attention.self.{k}" for i in (0, 1)
                               for k in ("pv_matmul", "qk_matmul")]
    x = _inputs()
    lq.calibrate(model, [x], num_samples=None)
    for m in matmuls.values():
        assert m.input_quantizer.is_calibrated and m.other_quantizer.is_calibrated
    # the softmax output P, the input of P V, is in [0, 1]: its calibrated range cannot exceed 1
    assert float(matmuls["encoder.layer.0.attention.self.pv_matmul"].input_quantizer.amax) <= 1.0
    with torch.no_grad():
        q = model(**x).last_hidden_state
        with lq.quantization_disabled(model, layers=list(matmuls)):  # only the matmuls in float
            partly = model(**x).last_hidden_state
    assert not torch.equal(q, partly)  # quantizing Q K^T and P V changes the output: they run quantized


def test_model_without_attention_interface_is_refused():
    with pytest.raises(ValueError, match="lq.nn.Matmul"):
        use_matmul_attention(nn.Sequential(nn.Linear(4, 4)))


def test_copy_keeps_the_matmul_attention():
    model = _bert()
    use_matmul_attention(model)
    twin = copy.deepcopy(model)
    assert hasattr(twin.encoder.layer[0].attention.self, "qk_matmul")
    assert twin.config._attn_implementation == "lq_matmul"


def _llama(**kw) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32, **kw)
    return transformers.LlamaModel(config).eval()


def test_grouped_query_attention_computes_the_same_function():
    model = _llama(num_key_value_heads=2)  # 4 query heads share 2 key/value heads
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    use_matmul_attention(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-5)


def test_soft_capped_attention_is_refused_not_approximated():
    module = nn.Module()
    q = torch.randn(1, 2, 3, 4)
    from lq.nn.hf_attention import _lq_matmul_attention

    with pytest.raises(NotImplementedError, match="softcap"):
        _lq_matmul_attention(module, q, q, q, None, softcap=5.0)
