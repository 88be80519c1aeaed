"""Shared fixtures: a tiny synthetic world in the real on-disk formats, generated once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A few pairs per domain (GTAV, Cityscapes, BDD100K, Mapillary) written by the generator."""
    from datasets.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(root, size="tiny", seed=0)
    return root


@pytest.fixture
def smoke_experiment(tiny_world, tmp_path):
    """The smoke preset on the tiny world, writing results into a fresh folder."""
    from benchmarks.config import load_experiment

    return load_experiment("smoke", [f'data.root="{tiny_world}"', f'run.results_dir="{tmp_path / "runs"}"'])


@pytest.fixture
def one_intra_op_thread():
    """For tests of tiny models: one intra-op thread is fastest, and far faster on shared, busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
