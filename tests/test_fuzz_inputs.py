"""Property-based fuzzing of the input parsers: job files, manifests, captions and image files.

Whatever the bytes, a parser either accepts them or refuses them with the error the CLI prints as
one line (``ValueError`` / ``FileNotFoundError``, no newline, naming the file); the data sources
never raise at all: every bad sample becomes a skip, and every row is either a sample or a skip.
Derandomized and without an example database, so a run is the same everywhere and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from thinkdiff.commands import generate
from thinkdiff.data.sources import RawSample, SkipLog, decode_image, iter_samples, list_source_shards
from thinkdiff.data.synthetic import jpeg_bytes
from thinkdiff.imaging import open_rgb

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ONE_LINE_ERRORS = (ValueError, FileNotFoundError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
job_keys = st.sampled_from([*generate.JOB_KEYS, "meta", "sed", "image", ""])
# Mostly well-formed jobs with one odd field (what reaches the deeper checks), some anything.
well_formed_jobs = st.fixed_dictionaries(
    {"items": st.lists(st.text(max_size=8) | st.dictionaries(st.sampled_from(["text", "image"]), json_values, max_size=2), max_size=3)},
    optional={
        "seed": st.integers() | json_values,
        "out": st.sampled_from(["../x.png", "/tmp/x.png", "a/../b.png", "ok.png", "ok.jpg", "./ok.png"]) | json_values,
        "meta": json_values,
    },
)
jobs = st.one_of(well_formed_jobs, well_formed_jobs, st.dictionaries(job_keys, json_values, max_size=5), json_values)
job_lines = st.lists(
    st.one_of(jobs.map(lambda j: json.dumps(j).encode()), st.binary(max_size=40), st.just(b"")), min_size=1, max_size=4
)


def _assert_one_line(error: Exception, path: Path | None = None) -> None:
    message = str(error)
    assert message and "\n" not in message, message
    if path is not None:
        assert str(path) in message, message


@FUZZ
@given(lines=job_lines, single=st.booleans())
def test_job_files_parse_or_fail_in_one_line(lines: list[bytes], single: bool) -> None:
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("job.json" if single else "jobs.jsonl")
        path.write_bytes(lines[0] if single else b"\n".join(lines))
        out = Path(tmp) / "out"
        args = parser.parse_args(["generate", "--job" if single else "--jobs", str(path), "--out", str(out)])
        try:
            requests = generate._read_requests(args)
            generate._output_paths(args, requests, "image", "lvlm")
        except ONE_LINE_ERRORS as error:
            _assert_one_line(error, None if "several jobs" in str(error) or "output" in str(error) else path)
        assert not out.exists()  # parsing writes nothing


manifest_rows = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"image_path": st.sampled_from(["0.jpg", "missing.jpg", "broken.jpg", "", "sub/../0.jpg"]) | json_values},
            optional={"caption": json_values | st.text(max_size=10), "key": json_values},
        ).map(lambda row: json.dumps(row).encode()),
        st.binary(max_size=30),
        st.just(b""),
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(rows=manifest_rows, csv_bytes=st.binary(max_size=60), per_shard=st.integers(1, 3))
def test_manifests_account_for_every_row(rows: list[bytes], csv_bytes: bytes, per_shard: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "0.jpg").write_bytes(jpeg_bytes(0))
        (root / "broken.jpg").write_bytes(jpeg_bytes(1)[:40])
        manifest = root / "m.jsonl"
        manifest.write_bytes(b"\n".join(rows))
        try:
            shards = list_source_shards(manifest, samples_per_shard=per_shard)
        except ONE_LINE_ERRORS as error:
            _assert_one_line(error, manifest)
            assert not any(row.strip() for row in b"\n".join(rows).splitlines())  # only "no rows"
        else:
            log = SkipLog()
            samples = [s for shard in shards for s in iter_samples(shard, log)]
            real_rows = [row for row in b"\n".join(rows).splitlines() if row.strip()]
            assert len(samples) + len(log.skips) == len(real_rows)
            assert all(s.image.mode == "RGB" and s.caption == s.caption.strip() != "" for s in samples)

        csv_manifest = root / "m.csv"
        csv_manifest.write_bytes(b"image_path,caption\n" + csv_bytes)
        try:
            for shard in list_source_shards(csv_manifest):
                list(iter_samples(shard, SkipLog()))
        except ONE_LINE_ERRORS as error:
            _assert_one_line(error, csv_manifest)


caption_members = st.dictionaries(
    st.sampled_from(["txt", "json", "jpg", "png", "cls"]),
    st.one_of(st.binary(max_size=24), st.text(max_size=12).map(str.encode), json_values.map(lambda v: json.dumps({"caption": v}).encode())),
    max_size=3,
)


@FUZZ
@given(samples=st.lists(caption_members, min_size=1, max_size=4), cut=st.integers(0, 4000))
def test_tar_captions_and_members_never_raise(samples: list[dict[str, bytes]], cut: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        with tarfile.open(path, "w") as tar:
            for i, members in enumerate(samples):
                for ext, data in {"jpg": jpeg_bytes(i), **members}.items():
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = path.read_bytes()
        path.write_bytes(data[: max(0, len(data) - cut)])  # often cut short
        log = SkipLog()
        found = list(iter_samples(list_source_shards(path)[0], log))
        for sample in found:
            assert sample.caption and sample.caption == sample.caption.strip() and "\ufffd" not in sample.caption
        if cut == 0:  # a whole tar: every sample is kept or skipped with its key
            assert len(found) + len([s for s in log.skips if s.key]) == len(samples)


def _encoded(seed: int, fmt: str) -> bytes:
    modes = {"PNG": "RGBA", "GIF": "P", "TIFF": "I;16", "JPEG": "CMYK", "WEBP": "RGB", "BMP": "L"}
    image = Image.open(io.BytesIO(jpeg_bytes(seed, size=8))).convert("RGB")
    image = image.convert(modes[fmt]) if modes[fmt] != "I;16" else image.convert("L").convert("I;16")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@FUZZ
@given(
    fmt=st.sampled_from(["PNG", "GIF", "TIFF", "JPEG", "WEBP", "BMP"]),
    seed=st.integers(0, 5),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    keep=st.integers(0, 10_000),
    noise=st.binary(max_size=64),
)
def test_image_files_decode_or_fail_in_one_line(fmt: str, seed: int, flips, keep: int, noise: bytes) -> None:
    data = bytearray(_encoded(seed, fmt))
    for position, value in flips:
        data[position % len(data)] = value
    for candidate in (bytes(data[: max(1, keep)]), bytes(data), noise):
        try:
            image = open_rgb(candidate)
        except ValueError as error:
            _assert_one_line(error)
            assert str(error).startswith("cannot read image bytes: ")
        else:
            assert image.mode == "RGB"
        skips = SkipLog()
        sample = decode_image(RawSample("k", "s", candidate, "c"), skips)
        assert (sample is None) == (len(skips.skips) == 1)


@pytest.fixture(autouse=True)
def _small_image_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A flipped header byte can claim a huge canvas; a low limit keeps each case fast (the refusal,
    # DecompressionBombError, is one of the paths under test).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)


# ---- push: folders whose files are symlinks, special files, huge or missing ----------------------

PUSHED = ("README.md", "config.json", "diffusion_pytorch_model.safetensors", "thinkdiff.json")
FILE_KINDS = ("regular", "regular", "regular", "missing", "link-outside", "link-etc-passwd", "link-inside", "hard-link",
              "fifo", "folder", "huge-sparse")


@pytest.fixture(scope="module")
def pushable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_model_card import small_model

    return small_model(tmp_path_factory.mktemp("push") / "m")


def _make_push_file(path: Path, kind: str, source: Path) -> None:
    if kind == "regular":
        path.write_bytes(source.read_bytes())
    elif kind == "link-outside":
        path.symlink_to(source)  # another run's file: loads, but is not this folder's
    elif kind == "link-etc-passwd":
        path.symlink_to("/etc/passwd")
    elif kind == "hard-link":
        os.link(source, path)  # the same file as another run's
    elif kind == "link-inside":
        path.symlink_to(next(name for name in PUSHED if name != path.name))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge-sparse":
        with open(path, "wb") as f:
            f.write(source.read_bytes())
            f.truncate(2 << 30)


@settings(FUZZ, max_examples=40)
@given(kinds=st.tuples(*[st.sampled_from(FILE_KINDS)] * len(PUSHED)), dry_run=st.booleans())
def test_push_sends_only_files_inside_the_folder(pushable: Path, kinds: tuple[str, ...], dry_run: bool) -> None:
    from huggingface_hub import HfApi

    from thinkdiff.cli import main

    sent: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
        mp.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **k: sent.extend(
            (op.path_in_repo, op.path_or_fileobj) for op in operations))
        folder = Path(tmp) / "m"
        folder.mkdir()
        for name, kind in zip(PUSHED, kinds, strict=True):
            _make_push_file(folder / name, kind, pushable / name)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["push", str(folder), "me/x", *(["--dry-run"] if dry_run else [])])
        if set(kinds) == {"regular"}:
            assert status == 0 and (dry_run or len(sent) == len(PUSHED)), err.getvalue()
        else:
            assert status == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
            assert sent == [] and "root:" not in out.getvalue()
        # Exactly the bytes of the folder's own files (all regular here, or nothing was sent).
        assert all(data == (pushable / name).read_bytes() for name, data in sent)


# ---- numeric flags: bounded by the models' configs before any model loads -----------------------


@settings(FUZZ, max_examples=60)
@given(value=st.integers(-(2**70), 2**70) | st.sampled_from([1, 999, 1000, 1001, 4096, 4097]))
def test_numeric_bounds_pass_or_refuse_in_one_line(tiny_env: Path, value: int) -> None:
    from thinkdiff.limits import denoising_steps_bound, lvlm_context_bound

    for bound, name, largest in (
        (denoising_steps_bound("tiny:flux"), "--steps", 1000),
        (lvlm_context_bound("tiny:qwen2-vl"), "--num-tokens", 4096),  # the kit's max_position_embeddings
    ):
        assert bound.largest == largest
        if value <= largest:
            bound.check(name, value)
        else:
            with pytest.raises(ValueError) as caught:
                bound.check(name, value)
            _assert_one_line(caught.value)
            assert str(caught.value).startswith(f"{name} {value} is above {largest}")


def test_extract_features_bounds_new_tokens_before_loading(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thinkdiff.cli import main

    source = tmp_path / "src"
    source.mkdir()
    (source / "0.jpg").write_bytes(jpeg_bytes(0))
    (source / "0.txt").write_text("a picture")
    out = tmp_path / "features"
    args = ["extract-features", "--model", "tiny:qwen2-vl", "--source", str(source), "--out", str(out)]
    assert main([*args, "--max-new-tokens", "100000000"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "thinkdiff extract-features: error: --max-new-tokens 100000000 is above 4096, the most tokens LVLM "
        "tiny:qwen2-vl reads, its prompt included (max_position_embeddings)"
    )
    assert not out.exists()


# ---- float flags: finite or refused in one line, in every command --------------------------------


def _float_flags() -> list[tuple[tuple[str, ...], str]]:
    """Every float option of every (sub)command, with the words that reach its parser."""
    from thinkdiff.cli import build_parser

    found: list[tuple[tuple[str, ...], str]] = []
    todo: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), build_parser())]
    while todo:
        prefix, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [((*prefix, name), sub) for name, sub in action.choices.items()]
            elif action.type is float and action.option_strings:
                found.append((prefix, action.option_strings[-1]))
    return found


FLOAT_FLAGS = _float_flags()


def test_float_flags_are_found() -> None:
    flags = {(" ".join(prefix), flag) for prefix, flag in FLOAT_FLAGS}
    assert {("generate", "--guidance"), ("eval cobsat generate", "--guidance"), ("eval cobsat generate", "--qcd-alpha"),
            ("eval cobsat generate", "--temperature"), ("generate", "--qcd-alpha")} <= flags


@settings(FUZZ, max_examples=80)
@given(
    where=st.sampled_from(FLOAT_FLAGS),
    value=st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e400", " nan "]),
)
def test_float_flags_refuse_non_finite_values_in_one_line(where: tuple[tuple[str, ...], str], value: str) -> None:
    import math

    from thinkdiff.cli import build_parser

    prefix, flag = where
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        build_parser().parse_known_args([*prefix, f"{flag}={value}"])
    lines = err.getvalue().strip().splitlines()
    if math.isfinite(float(value)):
        assert "not a finite number" not in err.getvalue()
    else:
        assert lines == [
            f"thinkdiff {' '.join(prefix)}: error: argument {flag}: {value!r} is not a finite number "
            f"(see thinkdiff {' '.join(prefix)} --help)"
        ]


@pytest.mark.parametrize("flag", ["--temperature", "--top-p", "--guidance", "--qcd-alpha"])
def test_cobsat_dry_run_refuses_non_finite_settings(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Its one JSON object held NaN, which is not JSON."""
    from thinkdiff.cli import main

    args = ["eval", "cobsat", "generate", "--preset", "release", "--dry-run"]
    with pytest.raises(SystemExit) as caught:
        main([*args, flag, "nan"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().startswith(
        f"thinkdiff eval cobsat generate: error: argument {flag}: 'nan' is not a finite number"
    )
    with pytest.raises(SystemExit) as caught:
        main([*args, "--seed", str(2**64)])
    assert caught.value.code == 2 and "argument --seed: 18446744073709551616 is not a seed" in capsys.readouterr().err
    assert main([*args, flag, "0.5"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in the dry run"))
