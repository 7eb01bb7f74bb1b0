"""torch.export of a quantized (fake-quant) model: the program computes what the module computes."""

from __future__ import annotations

import torch
from torch import nn

import lq


def test_quantized_model_exports_with_torch_export():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, [x])
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.round_.default" in targets or "aten.round.default" in targets  # eq. 7 is in the graph
    x2 = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2))
