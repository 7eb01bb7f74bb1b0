"""Test-session settings."""

import os

# torch.compile of the int8 quantizers costs 20-40 s per variant on the first call; the tests compare the
# eager math (lq.ops.fused is checked against it separately), so compile stays off in the suite.
os.environ.setdefault("LQ_COMPILE_QUANT", "0")
