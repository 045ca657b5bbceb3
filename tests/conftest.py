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


CAPTIONS = [
    f"a {colour} {thing} on a {bg} background"
    for colour in ("red", "blue", "green", "yellow")
    for thing in ("car", "ball", "cup", "hat", "dog", "cat")
    for bg in ("white", "black")
]


def write_feature_folder(
    root: Path,
    tokenizer,
    width: int = 64,
    shards: int = 2,
    per_shard: int = 24,
    seed: int = 0,
    prompt_features: bool = False,
) -> Path:
    """Feature shards whose features are a fixed function of the generated tokens (learnable)."""
    from thinkdiff.data.feature_shards import FeatureShardWriter, write_index

    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(len(tokenizer), width, generator=gen)
    for s in range(shards):
        with FeatureShardWriter(root, s, prompt_features=prompt_features) as writer:
            for i in range(per_shard):
                text = CAPTIONS[(s * per_shard + i) % len(CAPTIONS)]
                ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
                features = table[ids] + 0.1 * torch.randn(len(ids), width, generator=gen)
                extra = (
                    {"prompt_features_PH": torch.randn(7, width, generator=gen)} if prompt_features else {}
                )
                writer.add(f"s{s}-{i:03d}", ids, features, prompt="Describe the image.", text=text, **extra)
            writer.finish()
    write_index(root, num_source_shards=shards, model="tiny:qwen2-vl")
    return root


@pytest.fixture(scope="session")
def tiny_env(tiny_models: Path, monkeypatch_session) -> Path:
    """Make ``tiny:<name>`` model names resolve to the session's kit."""
    monkeypatch_session.setenv("THINKDIFF_TINY_DIR", str(tiny_models))
    return tiny_models


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def feature_dir(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_env / "qwen2-vl")
    return write_feature_folder(tmp_path_factory.mktemp("features"), tokenizer)
