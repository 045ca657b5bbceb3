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


@pytest.mark.parametrize("cut", ["inside a member's data", "inside the next header", "before the next header"])
def test_truncated_tar_keeps_what_was_read_and_names_the_cut_sample(tmp_path: Path, tars: Path, cut) -> None:
    with tarfile.open(tars / "00001.tar") as tar:
        jpg, txt = tar.getmember("000010002.jpg"), tar.getmember("000010002.txt")
    data = (tars / "00001.tar").read_bytes()
    # Cut in the .txt header: the .jpg of 000010002 was read whole, its caption never was.
    end = {
        "inside a member's data": jpg.offset_data + jpg.size // 2,
        "inside the next header": txt.offset + 100,  # tarfile itself takes this for the end
        "before the next header": txt.offset,
    }[cut]
    (tmp_path / "cut.tar").write_bytes(data[:end])
    keys, log = _read_all(tmp_path / "cut.tar")
    assert keys == GOOD_KEYS[4:6]  # the samples before the cut survive
    assert log.counts() == {"truncated_sample": 1, "unreadable_shard": 1}
    cut_sample = next(s for s in log.skips if s.reason == "truncated_sample")
    assert cut_sample.key == "000010002" and cut_sample.shard == str(tmp_path / "cut.tar")
    shard_skip = next(s for s in log.skips if s.reason == "unreadable_shard")
    assert shard_skip.detail.startswith("ReadError: ")


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


def test_blip2_preprocess_applies_the_exif_orientation_of_an_rgb_image() -> None:
    """The same image the LVLM and the data sources see (thinkdiff.imaging), RGB included."""
    buffer = io.BytesIO()
    plain = Image.new("RGB", (40, 20), (200, 30, 30))
    plain.paste((30, 30, 200), (0, 0, 20, 20))  # left half blue
    exif = plain.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees clockwise
    plain.save(buffer, format="PNG", exif=exif)
    tagged = Image.open(buffer)
    assert tagged.mode == "RGB" and tagged.getexif().get(0x0112) == 6
    upright = plain.transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(blip2_preprocess(tagged, size=20), blip2_preprocess(upright, size=20), atol=0, rtol=0)


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


def test_image_caption_dataset_skips_bad_samples(tars: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageCaptionDataset(tars, shuffle_buffer=0, rank=0, world_size=1)
    with caplog.at_level("WARNING", logger="thinkdiff.data.image_caption"):
        assert [s["key"] for s in ds] == GOOD_KEYS
    assert set(ds.skips.counts()) == set(BAD_SAMPLES.values())
    # Each dropped training sample is in the log, with its reason.
    assert sorted(r.getMessage().split()[1] for r in caplog.records) == sorted(BAD_SAMPLES)


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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_caption_that_is_not_utf8_is_skipped_and_reported(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, members in [
            ("good", {"txt": "café".encode()}),
            ("latin1_txt", {"txt": "café".encode("latin-1")}),
            ("latin1_json", {"json": '{"caption": "café"}'.encode("latin-1")}),
        ]:
            _add(tar, f"{key}.jpg", jpeg_bytes(0))
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "folder" / "a.txt").write_bytes(b"caf\xe9 au lait")
    keys, log = _read_all(tmp_path / "00000.tar")
    folder_keys, folder_log = _read_all(tmp_path / "folder")
    assert keys == ["good"] and folder_keys == []
    skips = {s.key: (s.reason, s.detail) for s in log.skips + folder_log.skips}
    assert skips == {
        "latin1_txt": ("caption_not_utf8", ".txt: byte 0xe9 at 3 is not UTF-8"),
        "latin1_json": ("caption_not_utf8", ".json: byte 0xe9 at 16 is not UTF-8"),
        "a": ("caption_not_utf8", "a.txt: byte 0xe9 at 3 is not UTF-8"),
    }


def test_bad_manifest_rows_name_their_line(tmp_path: Path) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg_bytes(0))
    lines = [
        json.dumps({"image_path": "0.jpg", "caption": "fine"}).encode(),
        b"",  # blank lines are not rows, but they count as lines
        b'{"image_path": "0.jpg", "caption": ',
        json.dumps(["not", "an", "object"]).encode(),
        b'{"image_path": "0.jpg", "caption": "caf\xe9"}',
        json.dumps({"image_path": 7, "caption": "a number is no path"}).encode(),
        json.dumps({"image_path": "0.jpg", "caption": "fine again", "key": "again"}).encode(),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    keys, log = _read_all(manifest, samples_per_shard=2)
    assert keys == ["0", "again"]
    assert [(s.key, s.reason, s.detail) for s in log.skips] == [
        ("line3", "bad_manifest_row", "line 3: not valid JSON: Expecting value (column 36)"),
        ("line4", "bad_manifest_row", "line 4: not a JSON object"),
        ("line5", "bad_manifest_row", "line 5 is not UTF-8 (byte 39)"),
        ("line6", "bad_manifest_row", "line 6: no image_path / image / path / file_name string"),
    ]


def test_a_csv_manifest_that_is_not_utf8_is_one_clear_error(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"image_path,caption\n0.jpg,caf\xe9\n")
    with pytest.raises(ValueError, match=r"manifest .*m\.csv is not UTF-8 text \(byte 28\)"):
        list_source_shards(manifest)
    # Through the command: one line naming the file, exit 2, no output folder.
    from thinkdiff.cli import main

    out = tmp_path / "features"
    argv = ["extract-features", "--model", "tiny:qwen2-vl", "--source", str(manifest), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"manifest {manifest} is not UTF-8 text (byte 28)" in err
    assert not out.exists()
