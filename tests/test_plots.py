"""lq's figures (Fig. 3 sensitivity chart, Fig. 2 calibration histograms) use matplotlib's object API: the
user's backend, pyplot and rcParams are left alone (issue 11), and the PNGs are real images."""

import json
import subprocess
import sys
import textwrap

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
    # Valid PNGs of the sizes asked for: figsize (inches) x dpi of each savefig.
    for path, size in [(sens, (660, 495))] + [(h, (700, 380)) for h in hists]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == size
            im.load()  # decodes the whole file: a truncated PNG raises here
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # something drawn on the white background
