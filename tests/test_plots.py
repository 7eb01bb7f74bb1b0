"""lq's figures (Fig. 3 sensitivity chart, Fig. 2 calibration histograms) use matplotlib's object API: the
user's backend, pyplot and rcParams are left alone (issue 11), and the PNGs are real images."""

import json
import subprocess
import sys
import textwrap

import pytest

from PIL import Image

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import matplotlib
    matplotlib.use("pdf")  # the user's backend (a notebook's would be inline): lq must not switch it
    backend = matplotlib.get_backend()
    rc = {k: repr(v) for k, v in matplotlib.rcParams.items()}

    import torch
    from torch import nn

    import lq
    from lq import plots, tracking
    from lq.workflow import PartialQuantization, SensitivityReport

    out = sys.argv[1]
    report = SensitivityReport(fp32=0.9, int8=0.8, layers={"net.0": 0.82, "net.2": 0.88})
    result = PartialQuantization(skipped=["net.0"], metric=0.89, fp32=0.9, target=0.01, reached=False,
                                 history=[(0, 0.8), (1, 0.89), (2, 0.9)])

    class Trainer:  # what log_sensitivity reads from a Lightning Trainer
        log_dir = default_root_dir = out
        loggers = []
        global_step = 0

    pngs = [plots.log_sensitivity(Trainer(), report, result, "val_acc")]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lq.quantize(model, lq.QuantConfig())  # entropy activations: histogram statistics
    lq.calibrate(model, [torch.randn(16, 8) for _ in range(4)], num_samples=64)
    ranges = tracking.log_calibration_histograms([], model, out, layers=2)
    pngs += sorted(str(p) for p in tracking.run_files(out) if p.name.startswith("lq_hist_"))
    print(json.dumps({
        "backend_before": backend,
        "backend_after": matplotlib.get_backend(),
        "pyplot_imported": "matplotlib.pyplot" in sys.modules,
        "rc_changed": sorted(k for k, v in matplotlib.rcParams.items() if rc.get(k) != repr(v)),
        "histograms": sorted(ranges),
        "pngs": pngs,
    }))
    """
)


def test_plots_leave_backend_pyplot_and_rcparams_alone_and_write_pngs(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["backend_before"] == "pdf" and got["backend_after"] == "pdf"
    assert got["pyplot_imported"] is False
    assert got["rc_changed"] == []
    assert got["histograms"] == ["0.input_quantizer", "2.input_quantizer"]
    sens, *hists = got["pngs"]
    assert sens == str(tmp_path / "lq_sensitivity.png") and len(hists) == 2
    # Valid PNGs of the sizes asked for: figsize (inches) x dpi of each savefig (the sensitivity chart: 6
    # inches for two bars + 2 for the legend outside the axes).
    for path, size in [(sens, (880, 495))] + [(h, (700, 380)) for h in hists]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == size
            im.load()  # decodes the whole file: a truncated PNG raises here
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # something drawn on the white background


def _visible(bbox, axes_bbox):
    """The part of a bar inside the axes (a bar starts at 0, below a y axis that starts near the values)."""
    from matplotlib.transforms import Bbox

    return Bbox.intersection(bbox, axes_bbox)


@pytest.mark.parametrize(
    "fp32, int8, layers, history, mode",
    [
        # all-int8 far below every per-layer bar (the line used to fall off the chart)
        (0.91, 0.12, {f"encoder.layer.{i}.attention.output.dense": 0.905 - 0.004 * i for i in range(12)},
         [(0, 0.12), (1, 0.5), (2, 0.9)], "max"),
        # a loss (lower is better): fp32 at the bottom, all int8 far above every bar
        (0.30, 2.5, {"net.0": 0.9, "net.2": 0.45, "net.4": 0.33}, [(0, 2.5), (1, 0.4)], "min"),
        # one layer alone beats fp32; no partial-quantization line
        (0.90, 0.20, {"a": 0.95, "b": 0.85}, None, "max"),
    ],
)
def test_sensitivity_chart_holds_both_reference_lines_and_legend_covers_no_bar(fp32, int8, layers, history, mode):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from lq.plots import sensitivity_figure
    from lq.workflow import PartialQuantization, SensitivityReport

    layers = dict(sorted(layers.items(), key=lambda kv: kv[1], reverse=(mode == "min")))
    report = SensitivityReport(fp32=fp32, int8=int8, layers=layers, mode=mode)
    result = None
    if history is not None:
        result = PartialQuantization(skipped=[], metric=history[-1][1], fp32=fp32, target=0.01, reached=False,
                                     history=history)
    fig = sensitivity_figure(report, result, "val_acc")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    # both reference lines: horizontal, inside the y range and not on the frame
    refs = {line.get_label().split()[0] + (" int8" if "int8" in line.get_label() else ""): line.get_ydata()[0]
            for line in ax.get_lines() if line.get_label().startswith(("fp32", "all int8"))}
    assert refs == {"fp32": fp32, "all int8": int8}
    for y in refs.values():
        assert lo < y < hi, (y, lo, hi)
    # every bar top and every point of the partial line inside too
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() < 1]
    assert len(bars) == len(layers)
    assert all(lo < b.get_height() < hi for b in bars)
    partial = [line for line in ax.get_lines() if line.get_marker() == "o"]  # the partial-quantization line
    if history is not None:
        assert all(lo < y < hi for y in partial[0].get_ydata())
    # the legend names all of them and overlaps no bar (nor the part of a bar drawn inside the axes)
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert any(t.startswith("fp32") for t in texts) and any(t.startswith("all int8") for t in texts)
    box = legend.get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    for bar in bars:
        visible = _visible(bar.get_window_extent(renderer), axes_box)
        assert visible is not None and visible.height > 0
        assert not box.overlaps(visible), (box, visible)
    for line in partial:
        assert not box.overlaps(line.get_window_extent(renderer))
    # and it is inside the figure (not cut off by the PNG's edge)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    assert all(isinstance(line, Line2D) for line in ax.get_lines())
