"""Soak: a few hundred predictions of mixed sizes in one process keep memory bounded."""

import gc
import re
from pathlib import Path

import numpy as np
import pytest

from ovenet.config import ModelConfig
from ovenet.models import build_model


def rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status (Linux)")
    return int(re.search(r"VmRSS:\s+(\d+)", status.read_text())[1]) / 1024


def test_predict_soak_bounded_memory():
    model = build_model(ModelConfig(arch="hrnetv2_w18_small_v1", head="fcn", num_classes=6)).eval()
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(24, 97, size=(12, 2))]

    def run(n: int) -> None:
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            result = model.predict(image)
            assert result.labels.shape == (h, w) and result.offsets.shape == (2, h, w)

    run(len(sizes))  # warm-up: every shape once (allocator and kernel caches)
    gc.collect()
    before = rss_mib()
    run(300)
    gc.collect()
    after = rss_mib()
    assert after - before < 64, f"RSS grew from {before:.0f} to {after:.0f} MiB over 300 predictions"
