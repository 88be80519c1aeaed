"""Shared pieces of the pytest-benchmark suite (run with `tox -e bench` or `pytest -m bench`)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.config import load_experiment


@pytest.fixture(scope="session")
def proxy_exp():
    # Random weights: timing does not depend on them, and the suite needs no weight file.
    return load_experiment("proxy", ["model.weights=[]"])


def proxy_batch(exp, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from benchmarks.synthetic_inputs import SyntheticSource

    source = SyntheticSource(exp.data.crop_size, count=exp.train.batch_size, seed=seed)
    samples = [source[i] for i in range(exp.train.batch_size)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])
