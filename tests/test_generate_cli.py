"""``thinkdiff generate``: outputs, sidecars, job files, video, and bad input that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thinkdiff.cli import main
from thinkdiff.pipelines import DEFAULT_INSTRUCTION

FAST = ["--height", "64", "--width", "64", "--steps", "2"]


def make_model(
    folder: Path, variant: str, out_dim: int = 32, decoder: str = "tiny:flux", seed: int = 0
) -> Path:
    """A model folder holding a random aligner between tiny components (as ``thinkdiff train`` writes)."""
    import torch

    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import ThinkDiffInfo, save_model

    in_dim, source = (64, "tiny:qwen2-vl") if variant == "lvlm" else (48, "tiny:blip2-vision")
    torch.manual_seed(seed)
    info = ThinkDiffInfo(variant, source, "tiny:t5", decoder, in_dim=in_dim, out_dim=out_dim)
    return save_model(folder, Aligner(in_dim, out_dim), info)


@pytest.fixture(scope="module")
def files(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    paths = {"lvlm": make_model(root / "lvlm", "lvlm"), "clip": make_model(root / "clip", "clip", seed=1)}
    for name, color in (("white", (230, 230, 230)), ("blue", (20, 20, 220)), ("green", (20, 200, 20))):
        paths[name] = root / f"{name}.png"
        Image.new("RGB", (56, 56), color).save(paths[name])
    return paths


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_single_lvlm_run_writes_png_and_sidecar(files, tmp_path, capsys) -> None:
    out = tmp_path / "red.png"
    args = ["--model", str(files["lvlm"]), "--text", "Word 1: white, ", "--image", str(files["white"])]
    args += ["--text", "\n\nWord 2: blue, ", "--image", str(files["blue"]), "--text", "\n\nWord 3: red, "]
    code, stdout, _ = run_cli([*args, "--seed", "3", "--out", str(out), *FAST], capsys)
    assert code == 0 and str(out) in stdout
    assert Image.open(out).size == (64, 64)

    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["inputs"]["items"] == [
        {"text": "Word 1: white, "},
        {"image": str(files["white"])},
        {"text": "\n\nWord 2: blue, "},
        {"image": str(files["blue"])},
        {"text": "\n\nWord 3: red, "},
    ]
    assert (sidecar["mode"], sidecar["seed"], sidecar["output"]) == ("lvlm", 3, "red.png")
    assert isinstance(sidecar["lvlm_text"], str) and sidecar["lvlm_text"]
    assert sidecar["settings"] == {
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "true_cfg_scale": 1.0,
    }
    assert sidecar["components"]["lvlm"] == "tiny:qwen2-vl"
    assert sidecar["components"]["decoder"] == "tiny:flux"
    assert sidecar["components"]["aligner"]["variant"] == "lvlm"
    assert sidecar["conditioning"]["instruction"] == DEFAULT_INSTRUCTION
    assert sidecar["conditioning"]["num_tokens"] == 128
    assert {"load_lvlm", "lvlm", "aligner", "text_encoders", "load_decoder", "decoder"} <= set(
        sidecar["timings"]
    )

    # Same inputs and seed through the CLI again: the same image.
    again = tmp_path / "again.png"
    assert run_cli([*args, "--seed", "3", "--out", str(again), *FAST], capsys)[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_jobs_file_batches_and_names_outputs(files, tmp_path, capsys) -> None:
    jobs = tmp_path / "jobs" / "jobs.jsonl"
    jobs.parent.mkdir()
    (jobs.parent / "img").mkdir()
    Image.open(files["green"]).save(jobs.parent / "img" / "green.png")
    lines = [
        {"items": [{"image": "img/green.png"}, {"text": "a green square"}], "seed": 1, "out": "green.png"},
        {"items": ["a blue square", {"image": str(files["blue"])}], "seed": 2, "steps": 1, "meta": {"theta": "b"}},
        {"items": [{"text": "just text"}], "height": 32, "width": 32},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    args = ["--model", str(files["clip"]), "--jobs", str(jobs), "--out", str(out), "--batch-size", "4", *FAST]
    code, _, _ = run_cli(args, capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00001.json",
        "00001.png",
        "00002.json",
        "00002.png",
        "green.json",
        "green.png",
    ]
    first = json.loads((out / "green.json").read_text())
    assert first["inputs"]["items"][0] == {"image": str(jobs.parent / "img" / "green.png")}
    assert (first["mode"], first["seed"], first["lvlm_text"]) == ("clip", 1, None)
    assert first["timings_cover_requests"] == 3
    second = json.loads((out / "00001.json").read_text())
    assert second["settings"]["num_inference_steps"] == 1 and second["job"] == {"theta": "b"}
    assert Image.open(out / "00002.png").size == (32, 32)


def test_text_bridge_needs_no_model_folder(files, tmp_path, capsys) -> None:
    out = tmp_path / "bridge.png"
    args = ["--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:flux"]
    code, _, _ = run_cli(
        [*args, "--image", str(files["white"]), "--text", "next?", "--out", str(out), *FAST], capsys
    )
    assert code == 0 and out.is_file()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["components"]["model"] is None and sidecar["components"]["lvlm"] == "tiny:qwen2-vl"


def test_video_decoder_writes_mp4(files, tmp_path, capsys) -> None:
    model = make_model(tmp_path / "clip-cog", "clip", decoder="tiny:cogvideox")
    out = tmp_path / "clip.mp4"
    args = ["--model", str(model), "--image", str(files["white"]), "--text", "a white cat", "--out", str(out)]
    code, _, _ = run_cli(
        [*args, "--height", "16", "--width", "16", "--num-frames", "9", "--steps", "2"], capsys
    )
    assert code == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["num_frames"] == 9
    if "video_fallback" in sidecar:  # no working video writer: frames + GIF instead
        assert Path(sidecar["video_fallback"]["gif"]).is_file()
    else:
        assert out.stat().st_size > 0 and out.read_bytes()[4:8] == b"ftyp"


# ---- bad input: a message, exit status 2, nothing written, no model loaded ----------------------


@pytest.fixture
def no_heavy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiffusionPipeline

    from thinkdiff.models.clip_vision import CLIPVisionFeatures
    from thinkdiff.models.lvlm import LVLMFeatureExtractor

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for cls in (LVLMFeatureExtractor, CLIPVisionFeatures, DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing image", "image file not found"),
        ("unreadable image", "cannot read image"),
        ("no inputs", "no inputs"),
        ("empty text only", "no inputs: give at least one image or non-empty text"),
        ("too many images", "2 images, more than the 1 accepted"),
        ("width mismatch", "16-wide prompt embeddings but decoder tiny:flux takes 32-wide"),
        ("variant mismatch", "ThinkDiff-LVLM model; mode clip needs a clip model"),
        ("lvlm without model", "mode lvlm needs a trained ThinkDiff model folder"),
        ("wrong suffix", "an image decoder writes .png or .jpg or .jpeg or .webp files"),
        ("offload on cpu", "it needs a GPU"),
        ("bad job", 'each item must be {"text": STR} or {"image": PATH}'),
        ("bad json", "is not valid JSON"),
        ("two input kinds", "give only one of --image/--text, --jobs"),
        ("stop at eos in clip mode", "--stop-at-eos applies to lvlm mode; mode clip uses no LVLM"),
        ("greedy in clip mode", "--greedy applies to lvlm and text-bridge modes; mode clip uses no LVLM"),
        ("out under a file", "is a file, not a folder"),
        ("out is a folder", "is an existing folder; name a file"),
        ("smaller than a latent", "--height 8 is below 16, the smallest size decoder tiny:flux makes"),
        ("too wide", "--width 100000 is above 4096, the largest size decoder tiny:flux makes"),
        ("width off the latent grid", "--width 1000 is not a multiple of 16 (decoder tiny:flux: its autoencoder"),
        ("video height off the patch grid", "--height 24 is not a multiple of 16 (decoder tiny:cogvideox"),
        ("beyond sd3's position table", "--height 1024 is above 512, the largest size decoder tiny:sd3 makes"),
        ("steps past the schedule", "--steps 99999999999 is above 1000, the most denoising steps decoder tiny:flux"),
        ("steps in a job", 'line 1: steps 5000 is above 1000, the most denoising steps decoder tiny:flux'),
        ("tokens past the context", "--num-tokens 100000000 is above 4096, the most tokens LVLM tiny:qwen2-vl reads"),
        ("text-bridge tokens", "--num-tokens 5000 is above 4096, the most tokens LVLM tiny:qwen2-vl reads"),
        ("T5 text past FLUX's length", "--text-max-length 100000000 is above 512, the most T5 tokens decoder tiny:flux"),
        ("T5 text past SD3's length", "--text-max-length 300 is above 256, the most T5 tokens decoder tiny:sd3 reads"),
        ("frames past the cap", "--num-frames 100000 is above 1025, the most frames a video is bounded by here"),
        ("frames in a job", "line 1: num_frames 2000 is above 1025, the most frames"),
        ("a text file as GGUF", "--transformer-file"),
        ("a cut-off GGUF", "is damaged or cut off"),
        ("an LVLM of another family", "--lvlm tiny:qwen2.5-vl is a qwen2_5_vl model, but this aligner was trained"),
    ],
)
def test_bad_input_is_reported_before_loading(case, message, files, tmp_path, capsys, no_heavy_loads) -> None:
    out_dir = tmp_path / "out"
    out = out_dir / "x.png"
    model, image = str(files["lvlm"]), str(files["white"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        {"bad job": '{"items": [{"video": "a.mp4"}]}\n', "steps in a job": '{"items": ["a"], "steps": 5000}\n',
         "frames in a job": '{"items": ["a"], "num_frames": 2000}\n'}.get(
            case, "{not json\n"
        )
    )
    not_gguf, cut_gguf = tmp_path / "notes.gguf", tmp_path / "cut.gguf"
    not_gguf.write_text("a text file\n")
    if case == "a cut-off GGUF":
        whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
        cut_gguf.write_bytes(whole[: len(whole) - 100])
    cog = str(make_model(tmp_path / "cog", "clip", decoder="tiny:cogvideox"))
    args = {
        "missing image": ["--model", model, "--image", str(tmp_path / "nope.png")],
        "unreadable image": ["--model", model, "--text", "a", "--image", str(broken)],
        "no inputs": ["--model", model],
        "empty text only": ["--model", model, "--text", " "],
        "too many images": ["--model", model, "--image", image, "--image", image, "--max-images", "1"],
        "width mismatch": [
            "--model",
            str(make_model(tmp_path / "narrow", "lvlm", out_dim=16)),
            "--image",
            image,
        ],
        "variant mismatch": ["--model", model, "--mode", "clip", "--image", image],
        "lvlm without model": ["--mode", "lvlm", "--decoder", "tiny:flux", "--image", image],
        "wrong suffix": ["--model", model, "--image", image, "--out", str(out_dir / "x.mp4")],
        "offload on cpu": ["--model", model, "--image", image, "--device", "cpu", "--offload", "model"],
        "bad job": ["--model", model, "--jobs", str(jobs)],
        "bad json": ["--model", model, "--jobs", str(jobs)],
        "two input kinds": ["--model", model, "--image", image, "--jobs", str(jobs)],
        "stop at eos in clip mode": ["--model", str(files["clip"]), "--image", image, "--stop-at-eos"],
        "greedy in clip mode": ["--model", str(files["clip"]), "--image", image, "--greedy"],
        "out under a file": ["--model", model, "--image", image, "--out", str(tmp_path / "a-file" / "x.png")],
        "out is a folder": ["--model", model, "--image", image, "--out", str(tmp_path / "folder.png")],
        "smaller than a latent": ["--model", model, "--image", image, "--height", "8"],
        "too wide": ["--model", model, "--image", image, "--width", "100000"],
        "width off the latent grid": ["--model", model, "--image", image, "--width", "1000"],
        "video height off the patch grid": ["--model", cog,
                                            "--image", image, "--height", "24", "--out", str(out_dir / "x.mp4")],
        "beyond sd3's position table": ["--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:sd3",
                                        "--image", image, "--height", "1024"],
        "steps past the schedule": ["--model", model, "--image", image, "--steps", "99999999999"],
        "steps in a job": ["--model", model, "--jobs", str(jobs)],
        "tokens past the context": ["--model", model, "--image", image, "--num-tokens", "100000000"],
        "text-bridge tokens": ["--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:flux", "--image", image,
                               "--num-tokens", "5000"],
        "T5 text past FLUX's length": ["--model", model, "--image", image, "--text-max-length", "100000000"],
        "T5 text past SD3's length": ["--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:sd3",
                                      "--image", image, "--text-max-length", "300"],
        "frames past the cap": ["--model", cog,
                                "--image", image, "--num-frames", "100000", "--out", str(out_dir / "x.mp4")],
        "frames in a job": ["--model", cog, "--jobs", str(jobs)],
        "a text file as GGUF": ["--model", model, "--image", image, "--transformer-file", str(not_gguf)],
        "a cut-off GGUF": ["--model", model, "--image", image, "--transformer-file", str(cut_gguf)],
        "an LVLM of another family": ["--model", model, "--image", image, "--lvlm", "tiny:qwen2.5-vl"],
    }[case]
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    if "--out" not in args:
        args += ["--out", str(out_dir if "--jobs" in args else out)]
    code, _, stderr = run_cli([*FAST, *args], capsys)  # a case may override FAST
    assert code == 2
    assert stderr.startswith("thinkdiff generate: error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not out_dir.exists()


def write_gguf(path: Path) -> Path:
    """A small, whole GGUF file of two float tensors (the header and tables are what is checked)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor("a", np.ones((4, 64), np.float32))
    writer.add_tensor("b", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_checks(tmp_path: Path) -> None:
    import struct

    from thinkdiff.models.quantization import check_gguf_file

    whole = write_gguf(tmp_path / "whole.gguf")
    check_gguf_file(whole)  # a whole file passes
    data = whole.read_bytes()
    cases = {
        b"hello": "is not a GGUF file (it starts with b'hell', not b'GGUF')",
        b"GGUF": "is cut off: 4 bytes, shorter than a GGUF header",
        b"GGUF" + struct.pack("<IQQ", 9, 1, 1): "is GGUF version 9; diffusers reads versions 2 and 3",
        data[:40]: "which a 40-byte file cannot hold",
        data[: len(data) - 1]: "is damaged or cut off",
        data[:-300]: "is damaged or cut off",
    }
    for content, message in cases.items():
        (tmp_path / "x.gguf").write_bytes(content)
        with pytest.raises(ValueError, match=r"^--transformer-file .*x\.gguf") as caught:
            check_gguf_file(tmp_path / "x.gguf")
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_another_lvlm_of_the_same_family_warns_and_another_family_needs_the_flag(
    files, tmp_path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from thinkdiff.models.loading import resolve_model_dir

    copy = shutil.copytree(resolve_model_dir("tiny:qwen2-vl"), tmp_path / "my-qwen2-vl")
    base = ["--model", str(files["lvlm"]), "--text", "a red car", *FAST]
    with caplog.at_level("WARNING"):
        code, _, _ = run_cli([*base, "--lvlm", str(copy), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0 and (tmp_path / "a.png").is_file()
    assert f"--lvlm {copy} is not the model this aligner was trained on (tiny:qwen2-vl, qwen2_vl)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        code, _, _ = run_cli(
            [*base, "--lvlm", "tiny:qwen2.5-vl", "--allow-other-source", "--out", str(tmp_path / "b.png")], capsys
        )
    assert code == 0 and "--lvlm tiny:qwen2.5-vl is not the model this aligner was trained on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same model by its folder: nothing to say
        code, _, _ = run_cli([*base, "--lvlm", str(resolve_model_dir("tiny:qwen2-vl")), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0 and "not the model this aligner was trained on" not in caplog.text


def test_unknown_mode_is_a_usage_error(files, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(files["lvlm"]), "--mode", "dream", "--text", "a"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("thinkdiff generate: error: argument --mode: invalid choice 'dream'; choose from lvlm")
    assert len(err.strip().splitlines()) == 1


def test_single_job_file_and_instruction_flags(files, tmp_path, capsys) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"items": [{"image": str(files["blue"])}, "a blue square"], "seed": 4}))
    out = tmp_path / "job.webp"
    args = ["--model", str(files["clip"]), "--job", str(job), "--out", str(out), "--no-instruction", *FAST]
    assert run_cli(args, capsys)[0] == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert (sidecar["seed"], sidecar["conditioning"]["instruction"]) == (4, None)
    assert Image.open(out).format == "WEBP"


def test_video_is_written_under_the_temporary_name_of_the_atomic_writers(files, tmp_path, capsys, monkeypatch) -> None:
    import diffusers.utils

    from tests.test_training_reliability import dead_pid
    from thinkdiff.utils import _host_tag, temporary_path

    real_writer, written = diffusers.utils.export_to_video, []

    def spy(frames, output_video_path, **kwargs):  # the real writer, its path noted
        written.append(Path(output_video_path))
        return real_writer(frames, output_video_path, **kwargs)

    monkeypatch.setattr(diffusers.utils, "export_to_video", spy)
    out = tmp_path / "out" / "clip.mp4"
    killed = out.with_name(f".clip.mp4.{_host_tag()}-{dead_pid()}.tmp")  # what a killed run leaves
    killed.mkdir(parents=True)
    (killed / "clip.mp4").write_bytes(b"half a video")
    # The shorter .NAME.PID.tmp form may be another program's in a user's folder: left alone.
    foreign = out.with_name(f".notes.txt.{dead_pid()}.tmp")
    foreign.write_text("another program's")
    model = make_model(tmp_path / "clip-cog", "clip", decoder="tiny:cogvideox")
    args = ["--model", str(model), "--image", str(files["white"]), "--out", str(out), "--num-frames", "9"]
    code, _, stderr = run_cli([*args, "--height", "16", "--width", "16", "--steps", "1"], capsys)
    assert code == 0, stderr
    # .NAME.HOST-PID.tmp (a folder: the writer needs the .mp4 suffix), the name remove_debris knows.
    assert written == [temporary_path(out) / "clip.mp4"]
    assert out.read_bytes()[4:8] == b"ftyp"
    assert sorted(p.name for p in out.parent.iterdir()) == [foreign.name, "clip.json", "clip.mp4"]  # killed run's gone


# export_to_video raises AttributeError when imageio is installed without an ffmpeg.
@pytest.mark.parametrize("error", [RuntimeError, AttributeError])
def test_video_falls_back_to_frames_and_gif(error, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.utils

    from thinkdiff.pipelines.outputs import _write_video

    def broken_writer(*args, **kwargs):
        raise error("no ffmpeg here")

    monkeypatch.setattr(diffusers.utils, "export_to_video", broken_writer)
    frames = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(3)]
    extra = _write_video(frames, tmp_path / "v.mp4", fps=8)
    assert "no ffmpeg here" in extra["video_fallback"]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v_frames"]  # no video, no temporary folder
    assert sorted(p.name for p in (tmp_path / "v_frames").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(tmp_path / "v.gif").n_frames == 3


def test_video_on_a_full_disk_is_not_a_fallback(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import diffusers.utils

    from thinkdiff.pipelines.outputs import _write_video

    def full_disk(frames, name, fps):
        Path(name).write_bytes(b"\0" * 10)  # half a video in the temporary folder
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffusers.utils, "export_to_video", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        _write_video([Image.new("RGB", (16, 16))] * 2, tmp_path / "v.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []  # no frames folder, no GIF, no temporary folder


# ---- job files: strict keys, the right line, outputs inside --out ------------------------------


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


GOOD_JOB = {"items": ["a green square"]}


@pytest.mark.parametrize(
    ("case", "lines", "message"),
    [
        ("misspelt key", [GOOD_JOB, {"items": ["a"], "sed": 3}], 'line 2: unknown job key "sed" (did you mean "seed"?)'),
        ("bad json line 3", [GOOD_JOB, "", "{oops"], "line 3 is not valid JSON: Expecting property name"),
        ("not utf-8", [GOOD_JOB, b'{"items": ["caf\xe9"]}'], "line 2 is not UTF-8 text (byte 15)"),
        ("meta not an object", [{"items": ["a"], "meta": 3}], 'line 1: "meta" must be a JSON object, got 3'),
        ("out not a name", [{"items": ["a"], "out": 5}], 'line 1: "out" must be a file name, got 5'),
        ("deep nesting", ["[" * 100000], "line 1 is not valid JSON: nested too deeply"),
        ("parent", [GOOD_JOB, {"items": ["a"], "out": "../x.png"}], "line 2: \"out\" '../x.png' leads outside --out"),
        ("through a subfolder", [{"items": ["a"], "out": "sub/../../y.png"}], "leads outside --out"),
        ("absolute", [{"items": ["a"], "out": "ABS"}], "leads outside --out"),
        ("symlink out", [{"items": ["a"], "out": "link/z.png"}], "'link/z.png' leads outside --out"),
        ("symlink file", [{"items": ["a"], "out": "x.png"}], "'x.png' leads outside --out"),
        ("same file twice", [{"items": ["a"], "out": "a.png"}, {"items": ["b"], "out": "./a.png"}], "same file"),
        ("shared sidecar", [{"items": ["a"], "out": "a.png"}, {"items": ["b"], "out": "a.jpg"}], "a.json"),
    ],
)
def test_bad_job_files_are_refused_before_anything_runs(
    case, lines, message, files, tmp_path, capsys, no_heavy_loads
) -> None:
    root = tmp_path / "root"
    out_dir, elsewhere = root / "out", root / "elsewhere"
    elsewhere.mkdir(parents=True)
    if case == "symlink out":
        out_dir.mkdir()
        (out_dir / "link").symlink_to(elsewhere, target_is_directory=True)
    if case == "symlink file":  # an existing output that is a link to a file elsewhere
        out_dir.mkdir()
        (out_dir / "x.png").symlink_to(elsewhere / "target.png")
    absolute = str(elsewhere / "abs.png")
    jobs = root / "jobs.jsonl"
    jobs.write_bytes(
        b"\n".join(
            line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            for line in lines
        ).replace(b"ABS", absolute.encode())
        + b"\n"
    )
    before = _tree(root)
    code, _, stderr = run_cli(["--model", str(files["clip"]), "--jobs", str(jobs), "--out", str(out_dir), *FAST], capsys)
    assert code == 2
    assert stderr.startswith("thinkdiff generate: error: ") and message in stderr, stderr
    assert str(jobs) in stderr or case in ("same file twice", "shared sidecar")
    assert len(stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert _tree(root) == before  # nothing written, inside --out or outside it


def test_a_single_job_may_not_write_outside_the_current_folder(
    files, tmp_path, capsys, monkeypatch, no_heavy_loads
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"items": ["a"], "out": "../escaped.png"}, indent=2))
    code, _, stderr = run_cli(["--model", str(files["clip"]), "--job", str(job), *FAST], capsys)
    assert code == 2 and f"{job}: \"out\" '../escaped.png' leads outside the current folder" in stderr
    assert not (tmp_path.parent / "escaped.png").exists()
    job.write_text('{"items": ["a"],\n "seed": }')
    code, _, stderr = run_cli(["--model", str(files["clip"]), "--job", str(job), *FAST], capsys)
    assert code == 2 and f"{job} is not valid JSON: Expecting value (line 2 column 10)" in stderr


@pytest.mark.parametrize(
    ("flags", "job", "message"),
    [
        (["--guidance", "nan"], None, "argument --guidance: 'nan' is not a finite number"),
        (["--true-cfg", "inf"], None, "argument --true-cfg: 'inf' is not a finite number"),
        (["--temperature=-Infinity"], None, "argument --temperature: '-Infinity' is not a finite number"),
        (["--qcd-alpha", "1e999"], None, "argument --qcd-alpha: '1e999' is not a finite number"),
        (["--seed", str(10**23)], None, f"argument --seed: {10**23} is not a seed: seeds run from 0 to {2**63 - 1}"),
        (["--seed", "-1"], None, f"argument --seed: -1 is not a seed: seeds run from 0 to {2**63 - 1}"),
        ([], '{"items": ["a"], "guidance": NaN}', "line 1: guidance nan is not a finite number"),
        ([], '{"items": ["a"], "qcd_alpha": -Infinity}', "line 1: qcd_alpha -inf is not a finite number"),
        ([], '{"items": ["a"], "seed": 18446744073709551616}', "line 1: seed 18446744073709551616 is not a seed"),
    ],
)
def test_non_finite_numbers_and_bad_seeds_are_refused_before_loading(
    flags, job, message, files, tmp_path, capsys, no_heavy_loads
) -> None:
    """NaN guidance drew a black image with exit 0; a huge seed failed after the models loaded with
    an overflow that did not name --seed."""
    inputs = ["--image", str(files["white"])]
    if job is not None:
        (tmp_path / "jobs.jsonl").write_text(job + "\n")
        inputs = ["--jobs", str(tmp_path / "jobs.jsonl")]
    try:
        code = main(["generate", "--model", str(files["lvlm"]), *inputs, *flags, "--out", str(tmp_path / "x.png")])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_the_largest_seed_is_one_torch_takes() -> None:
    import torch

    from thinkdiff.limits import LARGEST_SEED

    torch.Generator().manual_seed(LARGEST_SEED)
    torch.manual_seed(LARGEST_SEED)


def test_the_aligners_lvlm_named_by_another_path_is_the_same_model(
    tiny_env, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """train records a relative folder (relative to where it ran); from another folder, the same
    LVLM named by its absolute path is that model, not 'another name' to warn about."""
    import shutil

    from thinkdiff.commands.generate import check_aligner_source
    from thinkdiff.models.bundle import ThinkDiffInfo
    from thinkdiff.models.loading import resolve_model_dir

    repo = tmp_path / "repo"
    vlm = shutil.copytree(resolve_model_dir("tiny:qwen2-vl"), repo / "weights" / "vlm")
    other = shutil.copytree(vlm, tmp_path / "my-vlm")
    (tmp_path / "elsewhere").mkdir()
    info = ThinkDiffInfo("lvlm", "weights/vlm", "tiny:t5", "tiny:flux", 32, 32)
    for cwd, given in ((repo, "weights/vlm"), (repo, str(vlm)), (tmp_path / "elsewhere", str(vlm)),
                       (tmp_path / "elsewhere", "../repo/weights/vlm"), (repo / "weights", "vlm")):
        monkeypatch.chdir(cwd)
        with caplog.at_level("WARNING"):
            check_aligner_source(info, given, flag="--lvlm", allow_other=False)
        assert "not the model this aligner was trained on" not in caplog.text, (cwd, given)
    for cwd in (repo, tmp_path / "elsewhere"):  # another folder is still another name
        monkeypatch.chdir(cwd)
        caplog.clear()
        with caplog.at_level("WARNING"):
            check_aligner_source(info, str(other), flag="--lvlm", allow_other=False)
        assert f"--lvlm {other} is not the model this aligner was trained on" in caplog.text
    hub = ThinkDiffInfo("lvlm", "Qwen/Qwen2-VL-7B-Instruct", "tiny:t5", "tiny:flux", 32, 32)
    caplog.clear()
    with caplog.at_level("WARNING"):  # a hub id is compared as an id
        check_aligner_source(hub, "Qwen/Qwen2-VL-7B-Instruct", flag="--lvlm", allow_other=False)
    assert caplog.text == ""
