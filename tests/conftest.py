"""Shared fixtures: the offline tiny-model kit, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores are shared by everything on this machine; more threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding every tiny random component (see ``thinkdiff make-tiny-models``)."""
    from thinkdiff.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    make_tiny_models(root, seed=0)
    return root
