"""Feature shards: the on-disk format, the index, and the training dataset over them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from thinkdiff.data.feature_dataset import FeatureShardDataset, padding_fraction
from thinkdiff.data.feature_shards import (
    FeatureShards,
    FeatureShardWriter,
    load_index,
    verify_shards,
    write_index,
)
from thinkdiff.data.synthetic import write_random_feature_shards

NUM_SHARDS, PER_SHARD = 3, 7
ALL_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD))


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_feature_shards(
        tmp_path_factory.mktemp("features"), NUM_SHARDS, PER_SHARD, hidden_size=8, num_tokens=(2, 12), seed=1
    )


def test_writer_round_trip_and_layout(tmp_path: Path) -> None:
    samples = [(f"k{i}", torch.arange(i + 1), torch.randn(i + 1, 6), torch.randn(3 + i, 6)) for i in range(4)]
    with FeatureShardWriter(tmp_path, 5, prompt_features=True) as writer:
        for key, ids, feats, prompt in samples:
            writer.add(key, ids, feats, prompt="p", text=f"t {key}", prompt_features_PH=prompt, caption="c")
        record = writer.finish({"source": "somewhere"})
    assert record["name"] == "shard-000005" and record["num_samples"] == 4 and record["num_tokens"] == 10
    assert not list(tmp_path.glob("*.tmp"))

    with safe_open(str(tmp_path / "shard-000005.safetensors"), framework="pt") as f:
        assert f.get_slice("features").get_dtype() == "BF16"
        assert f.get_tensor("token_ids").dtype == torch.int32
        assert f.get_tensor("offsets").tolist() == [0, 1, 3, 6, 10]
    assert (tmp_path / "shard-000005.safetensors").read_bytes()[4096:4098] != b"  "  # data start at 4096
    lines = [json.loads(x) for x in (tmp_path / "shard-000005.jsonl").read_text().splitlines()]
    assert lines[2] == {"key": "k2", "prompt": "p", "text": "t k2", "num_tokens": 3, "caption": "c"}

    write_index(tmp_path, num_source_shards=1)
    shards = FeatureShards(tmp_path, prompt_features=True)
    for i, (key, ids, feats, prompt) in enumerate(samples):
        got = shards[i]
        assert got["key"] == key and got["text"] == f"t {key}"
        assert torch.equal(got["token_ids"], ids) and got["token_ids"].dtype == torch.long
        assert torch.equal(got["features"], feats.bfloat16())
        assert torch.equal(got["prompt_features"], prompt.bfloat16())


def test_an_interrupted_shard_leaves_no_final_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), FeatureShardWriter(tmp_path, 0) as writer:
        writer.add("a", torch.arange(3), torch.randn(3, 4))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_index_records_counts_and_checksums(features: Path) -> None:
    index = load_index(features)
    assert (
        index["complete"]
        and index["num_shards"] == NUM_SHARDS
        and index["num_samples"] == NUM_SHARDS * PER_SHARD
    )
    assert index["hidden_size"] == 8
    assert all(len(f["sha256"]) == 64 for shard in index["shards"] for f in shard["files"].values())
    assert verify_shards(features) == []


def test_verify_finds_a_changed_file(tmp_path: Path) -> None:
    root = write_random_feature_shards(tmp_path, 1, 3)
    path = root / "shard-000000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify_shards(root) == ["shard-000000.safetensors: size or checksum differs from the record"]


def _keys(dataset: FeatureShardDataset, num_workers: int = 0) -> list[str]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=num_workers,
        collate_fn=lambda b: [s["key"] for s in b],
    )
    return [key for batch in loader for key in batch]


def test_ranks_and_workers_cover_every_sample_once(features: Path) -> None:
    world = 3
    per_rank = []
    for rank in range(world):
        dataset = FeatureShardDataset(
            features, batch_size=2, shuffle_buffer=5, seed=0, rank=rank, world_size=world
        )
        keys = _keys(dataset, num_workers=0)
        dataset.set_epoch(0)
        assert _keys(dataset, num_workers=2) == keys  # same order whatever the number of workers
        assert len(keys) == len(dataset) == len(ALL_KEYS) // world
        per_rank.append(keys)
    seen = [key for keys in per_rank for key in keys]
    assert sorted(seen) == ALL_KEYS  # 21 samples / 3 ranks: nothing dropped, nothing twice


def test_epochs_reshuffle_and_uneven_ranks_are_evened(features: Path) -> None:
    dataset = FeatureShardDataset(features, shuffle_buffer=8, rank=0, world_size=1)
    first, second = _keys(dataset), _keys(dataset)  # no set_epoch: each pass is the next epoch
    assert sorted(first) == sorted(second) == ALL_KEYS and first != second
    dataset.set_epoch(0)
    assert _keys(dataset) == first
    four = [FeatureShardDataset(features, rank=r, world_size=4) for r in range(4)]
    assert [len(d) for d in four] == [5, 5, 5, 5]  # 21 // 4; one sample of the epoch is left out
    assert len({k for d in four for k in _keys(d)}) == 20


def test_reader_resumes_at_the_same_sample(features: Path) -> None:
    kwargs = {"batch_size": 3, "shuffle_buffer": 6, "seed": 5, "rank": 1, "world_size": 2}
    dataset = FeatureShardDataset(features, **kwargs)
    dataset.set_epoch(2)
    full = _keys(dataset)
    state = dataset.state_dict(samples_seen=6)  # two batches consumed, then the run stops

    restarted = FeatureShardDataset(features, **kwargs)
    restarted.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint stores it as JSON
    restarted.set_epoch(2)  # what a training loop does at the top of the (resumed) epoch
    assert _keys(restarted, num_workers=2) == full[6:]
    restarted.set_epoch(3)
    assert len(_keys(restarted)) == len(full)  # the next epoch is whole again

    with pytest.raises(ValueError, match="cannot resume"):
        FeatureShardDataset(features, **{**kwargs, "world_size": 3, "rank": 0}).load_state_dict(state)


def test_samples_have_the_documented_fields(features: Path) -> None:
    sample = next(iter(FeatureShardDataset(features, rank=0, world_size=1)))
    assert set(sample) == {"key", "features", "token_ids", "text", "epoch"}
    assert sample["features"].dtype == torch.bfloat16 and sample["features"].shape[1] == 8
    assert (
        sample["token_ids"].dtype == torch.long
        and sample["token_ids"].shape[0] == sample["features"].shape[0]
    )
    assert sample["text"] == f"text {sample['key']}"
    # A copy, not a view of the whole memory-mapped shard (DataLoader workers would share all of it).
    assert sample["features"].untyped_storage().nbytes() == sample["features"].numel() * 2


def test_padding_fraction_and_bucketing(features: Path) -> None:
    assert padding_fraction([[2, 4], [3, 3]]) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([]) == 0.0
    plain = FeatureShardDataset(features, batch_size=3, shuffle_buffer=4, rank=0, world_size=1)
    bucketed = FeatureShardDataset(
        features, batch_size=3, shuffle_buffer=4, rank=0, world_size=1, bucket_batches=7
    )
    assert sorted(_keys(bucketed)) == ALL_KEYS
    assert bucketed.planned_padding_fraction() < plain.planned_padding_fraction()
