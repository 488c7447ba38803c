"""Suite-wide settings: no network, deterministic, bounded threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# The models in tests are tiny: extra intra-op threads only add contention on small CI
# machines (measured: a compiler module took 9 min with 2 threads beside other work, 24 s with 1).
torch.set_num_threads(int(os.environ.get("VTDSL_TEST_THREADS", "1")))
