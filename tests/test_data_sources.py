"""Image-caption sources, bad-sample handling, rank/worker splitting and the CLIP-side dataset."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thinkdiff.data.image_caption import CLIP_MEAN, CLIP_STD, ImageCaptionDataset, blip2_preprocess
from thinkdiff.data.sharding import rank_and_world_size, select_worker_slots, shuffle_buffer
from thinkdiff.data.sources import SkipLog, iter_samples, list_source_shards
from thinkdiff.data.synthetic import BAD_SAMPLES, jpeg_bytes, write_tar_shards

GOOD_KEYS = [f"{s:05d}{i:04d}" for s in range(2) for i in range(4)]


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tars")
    write_tar_shards(folder, num_shards=2, samples_per_shard=4, bad=True)
    return folder


def _read_all(spec, **kwargs) -> tuple[list[str], SkipLog]:
    log = SkipLog()
    keys = [s.key for shard in list_source_shards(spec, **kwargs) for s in iter_samples(shard, log)]
    return keys, log


def test_tar_shards_skip_each_bad_sample_and_keep_the_rest(tars: Path) -> None:
    keys, log = _read_all(tars)
    assert keys == GOOD_KEYS  # the good samples after the bad ones in shard 0 are all there
    assert {s.key: s.reason for s in log.skips} == BAD_SAMPLES
    assert all(s.shard.endswith("00000.tar") for s in log.skips)
    assert log.counts() == {reason: 1 for reason in sorted(BAD_SAMPLES.values())}


def test_tar_source_forms_give_the_same_shards(tars: Path) -> None:
    by_folder = list_source_shards(tars)
    by_brace = list_source_shards(f"{tars}/{{00000..00001}}.tar")
    by_list = list_source_shards([tars / "00000.tar", tars / "00001.tar"])
    by_glob = list_source_shards(f"{tars}/*.tar")
    assert by_folder == by_brace == by_list == by_glob
    assert [s.index for s in by_folder] == [0, 1]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        list_source_shards(f"{tars}/{{00000..00002}}.tar")


def test_captions_come_from_txt_or_json(tars: Path) -> None:
    shard = list_source_shards(tars)[1]
    samples = list(iter_samples(shard, SkipLog()))
    assert [s.caption for s in samples] == [f"a test picture number {i} of shard 1" for i in range(4)]
    assert all(s.image.mode == "RGB" and s.image.size == (32, 32) for s in samples)


def test_truncated_tar_keeps_what_was_read(tmp_path: Path, tars: Path) -> None:
    with tarfile.open(tars / "00001.tar") as tar:
        member = tar.getmember("000010002.jpg")
    data = (tars / "00001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: member.offset_data + member.size // 2])
    keys, log = _read_all(tmp_path / "cut.tar")
    assert keys == GOOD_KEYS[4:6]  # the samples before the cut survive
    assert log.counts() == {"unreadable_shard": 1}


def test_image_folder_source(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
        if i != 3:
            (tmp_path / f"img{i}.txt").write_text(f"caption {i}" if i != 1 else "")
    (tmp_path / "notes.md").write_text("not part of the data")
    shards = list_source_shards(tmp_path, samples_per_shard=2)
    assert [(s.start, s.stop) for s in shards] == [(0, 2), (2, 4), (4, 5)]
    keys, log = _read_all(tmp_path, samples_per_shard=2)
    assert keys == ["img0", "img2", "img4"]
    assert {s.key: s.reason for s in log.skips} == {"img1": "empty_caption", "img3": "missing_caption"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_source(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        rows.append({"image_path": f"images/{i}.jpg", "caption": f"caption {i}"})
    rows[2]["caption"] = " "
    rows.append({"image_path": "images/missing.jpg", "caption": "gone"})
    manifest = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    else:
        with manifest.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image_path", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    keys, log = _read_all(manifest, samples_per_shard=3)
    assert keys == ["images/0", "images/1", "images/3"]
    reasons = {s.key: s.reason for s in log.skips}
    assert reasons["images/2"] == "empty_caption"
    assert reasons["images/missing"] == "unreadable_image"
    if fmt == "jsonl":
        assert "bad_manifest_row" in log.counts()


def test_blip2_preprocess_matches_transformers_blip_processor() -> None:
    from transformers import BlipImageProcessorPil

    image = Image.open(io.BytesIO(jpeg_bytes(7, size=100))).crop((0, 0, 100, 60))
    ours = blip2_preprocess(image)
    reference = BlipImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_rank_and_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (3, 4)
    assert rank_and_world_size(1, 2) == (1, 2)  # explicit values win
    with pytest.raises(ValueError):
        rank_and_world_size(2, 2)
    with pytest.raises(ValueError):
        rank_and_world_size(rank=1)


def test_worker_slots_partition_a_stream() -> None:
    items = list(range(23))
    parts = [list(select_worker_slots(items, batch_size=4, worker_id=w, num_workers=3)) for w in range(3)]
    assert sorted(x for part in parts for x in part) == items
    assert parts[0][:4] == [0, 1, 2, 3] and parts[1][:4] == [4, 5, 6, 7]
    resumed = [
        list(select_worker_slots(items, batch_size=4, worker_id=w, num_workers=3, skip=10)) for w in range(3)
    ]
    assert sorted(x for part in resumed for x in part) == items[10:]
    assert resumed[0][:4] == [10, 11, 12, 13]


def test_shuffle_buffer_is_a_seeded_permutation() -> None:
    import random

    a = list(shuffle_buffer(range(100), 10, random.Random(1)))
    b = list(shuffle_buffer(range(100), 10, random.Random(1)))
    assert a == b and sorted(a) == list(range(100)) and a != list(range(100))


def _loader_keys(dataset, num_workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=num_workers,
        collate_fn=lambda b: [s["key"] for s in b],
    )
    return [key for batch in loader for key in batch]


def test_image_caption_dataset_ranks_workers_and_resume(tmp_path: Path) -> None:
    write_tar_shards(tmp_path, num_shards=4, samples_per_shard=3, bad=False, image_size=16)
    all_keys = sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(3))
    per_rank = []
    for rank in range(2):
        ds = ImageCaptionDataset(tmp_path, batch_size=2, shuffle_buffer=4, seed=3, rank=rank, world_size=2)
        keys = _loader_keys(ds, num_workers=0)
        assert _loader_keys(ds, num_workers=0) != keys  # each pass without set_epoch is a new epoch
        ds.set_epoch(0)
        assert _loader_keys(ds, num_workers=2) == keys  # the order does not depend on the workers
        per_rank.append(keys)
    assert sorted(per_rank[0] + per_rank[1]) == all_keys

    ds = ImageCaptionDataset(tmp_path, batch_size=2, shuffle_buffer=4, seed=3, rank=0, world_size=2)
    sample = next(iter(ds))
    assert sample["pixel_values"].shape == (3, 224, 224) and sample["caption"].startswith("a test picture")
    state = ds.state_dict(samples_seen=2)
    resumed = ImageCaptionDataset(tmp_path, batch_size=2, shuffle_buffer=4, seed=3, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert _loader_keys(resumed, num_workers=2) == per_rank[0][2:]


def test_image_caption_dataset_skips_bad_samples(tars: Path) -> None:
    ds = ImageCaptionDataset(tars, shuffle_buffer=0, rank=0, world_size=1)
    assert [s["key"] for s in ds] == GOOD_KEYS
    assert set(ds.skips.counts()) == set(BAD_SAMPLES.values())


def test_a_non_image_member_beside_an_image_is_ignored(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name, data in [("a.jpg", jpeg_bytes(0)), ("a.txt", b"cap"), ("a.npy", np.zeros(2).tobytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    keys, log = _read_all(tmp_path / "x.tar")
    assert keys == ["a"] and not log.skips


def test_image_caption_dataset_with_fewer_shards_than_ranks(tmp_path: Path) -> None:
    write_tar_shards(tmp_path, num_shards=1, samples_per_shard=5, bad=False, image_size=16)
    parts = [
        _loader_keys(ImageCaptionDataset(tmp_path, rank=r, world_size=3), num_workers=0) for r in range(3)
    ]
    assert sorted(k for part in parts for k in part) == [f"00000{i:04d}" for i in range(5)]
