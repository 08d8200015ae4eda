"""Shared pytest set-up: tests marked ``gpu`` need a CUDA device and are skipped without one.

``pytest -m gpu`` selects exactly those tests (benchmarks/gpu_check.sh runs them on a lent GPU).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
