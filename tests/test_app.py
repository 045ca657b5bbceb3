"""``thinkdiff app`` through its HTTP API with a real ``gradio_client``, on the miniature world.

The app serves in this process on a free loopback port; every call goes through Gradio's queue and
upload routes exactly as a remote client's would.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402

from thinkdiff.app import AppConfig, Backend, Cancelled, GenerateOptions, launch  # noqa: E402
from thinkdiff.miniworld.models import default_weights_dir  # noqa: E402

WEIGHTS = default_weights_dir()
MINI_LVLM = "mini world: lvlm"
DEFAULT = "(the model's own)"
# Settings after items and images: model, mode, decoder, seed, width, height, steps, guidance,
# true CFG, LVLM tokens, QCD alpha, hint, also the text bridge.
SETTINGS_ORDER = (
    "model", "mode", "decoder", "seed", "width", "height", "steps", "guidance", "true_cfg", "num_tokens", "qcd_alpha",
    "hint", "bridge",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(out_dir: Path) -> tuple[str, Backend, object]:
    backend = Backend(AppConfig(out_dir=out_dir))
    port = free_port()
    demo = launch(backend, port=port, block=False)
    return f"http://127.0.0.1:{port}/", backend, demo


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    url, backend, demo = serve(tmp_path_factory.mktemp("app-out"))
    yield url, backend, demo
    demo.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app[0], verbose=False)


def api_inputs(items: list) -> tuple[list, list]:
    """An editor sequence (str | Path) as the API's JSON items and uploads."""
    json_items, files = [], []
    for item in items:
        if isinstance(item, str):
            json_items.append({"text": item})
        else:
            json_items.append({"image": len(files)})
            files.append(handle_file(str(item)))
    return json_items, files


def settings(**given) -> list:
    values = {
        "model": MINI_LVLM,
        "mode": "lvlm",
        "decoder": DEFAULT,
        "seed": 0,
        "width": None,
        "height": None,
        "steps": None,
        "guidance": None,
        "true_cfg": None,
        "num_tokens": None,
        "qcd_alpha": None,
        "hint": False,
        "bridge": False,
    }
    values.update(given)
    return [values[name] for name in SETTINGS_ORDER]


def test_api_output_and_sidecar_match_thinkdiff_generate(app, client, tmp_path, capsys) -> None:
    from thinkdiff.cli import main

    _, backend, _ = app
    example = backend.example("Color-II", 2, 0)
    items, seed = example["items"], example["seed"]
    assert sum(isinstance(i, Path) for i in items) == 2 and sum(isinstance(i, str) for i in items) == 3
    json_items, files = api_inputs(items)
    paths, result = client.predict(json_items, files, *settings(seed=seed), api_name="/generate")
    png, sidecar_file = (Path(p) for p in paths)
    sidecar = json.loads(sidecar_file.read_text())
    assert result["results"][0]["output"] == png.name == f"thinkdiff-lvlm-{seed}.png"

    # The same inputs and seed through the command line.
    args = ["--model", str(WEIGHTS / "thinkdiff" / "lvlm"), "--decoder", str(WEIGHTS / "flux")]
    args += ["--lvlm", str(WEIGHTS / "vlm"), "--stop-at-eos", "--greedy"]
    args += ["--num-tokens", str(backend.default_num_tokens())]
    for item in items:
        args += ["--text", item] if isinstance(item, str) else ["--image", str(item)]
    out = tmp_path / f"thinkdiff-lvlm-{seed}.png"
    assert main(["generate", *args, "--seed", str(seed), "--out", str(out)]) == 0
    capsys.readouterr()
    cli = json.loads(out.with_suffix(".json").read_text())

    same = ("output", "mode", "seed", "lvlm_text", "settings", "conditioning", "components", "device", "dtype")
    assert {k: sidecar[k] for k in same} == {k: cli[k] for k in same}
    assert sidecar["offload"] == cli["offload"] and sidecar["inputs"]["extra_text"] is None
    # Items: the same texts in the same places; images kept beside the sidecar, byte for byte.
    app_items, cli_items = sidecar["inputs"]["items"], cli["inputs"]["items"]
    assert [list(i) for i in app_items] == [list(i) for i in cli_items]
    for a, c in zip(app_items, cli_items):
        if "text" in a:
            assert a == c
        else:
            assert Path(a["image"]).read_bytes() == Path(c["image"]).read_bytes()
            assert Path(a["image"]).parent == Path(backend.out_dir) / Path(a["image"]).parent.name
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(out)))
    # The judge read the image the client got.
    verdict = result["results"][0]["judge"]
    assert set(verdict) == {"shape", "color", "background", "texture"}
    assert verdict == backend.world.judge.read([np.asarray(Image.open(png))])[0].to_dict()


def test_api_text_bridge_beside_and_settings(app, client) -> None:
    _, backend, _ = app
    example = backend.example("Background-I", 2, 3)
    json_items, files = api_inputs(example["items"])
    paths, result = client.predict(
        json_items, files, *settings(seed=7, steps=5, true_cfg=1.0, qcd_alpha=0.5, hint=True, bridge=True),
        api_name="/generate",
    )
    assert [r["mode"] for r in result["results"]] == ["lvlm", "text-bridge"]
    assert [Path(p).name for p in paths] == [
        "thinkdiff-lvlm-7.png", "thinkdiff-lvlm-7.json", "thinkdiff-text-bridge-7.png", "thinkdiff-text-bridge-7.json",
    ]  # fmt: skip
    lvlm, bridge = (json.loads(Path(p).read_text()) for p in paths[1::2])
    assert lvlm["settings"]["num_inference_steps"] == 5 and lvlm["settings"]["true_cfg_scale"] == 1.0
    assert bridge["mode"] == "text-bridge" and bridge["seed"] == lvlm["seed"] == 7
    assert bridge["lvlm_text"] == lvlm["lvlm_text"]  # the same greedy answer, read once per mode
    # QCD and the hint reached the LVLM (the sidecar records how it read the request).
    assert lvlm["lvlm"]["qcd_alpha"] == 0.5 and lvlm["lvlm"]["hint"] in lvlm["lvlm"]["instruction"]


def test_api_clip_mode_with_the_bridge_beside(app, client) -> None:
    _, backend, _ = app
    json_items, files = api_inputs(backend.example("Texture-I", 2, 5)["items"])
    paths, result = client.predict(
        json_items, files, *settings(model="mini world: clip", mode="clip", seed=3, bridge=True), api_name="/generate"
    )
    clip, bridge = result["results"]
    assert (clip["mode"], bridge["mode"]) == ("clip", "text-bridge")
    assert clip["lvlm_text"] is None and bridge["lvlm_text"]  # clip mode uses no LVLM; the bridge reads with the VLM
    sidecar = json.loads(Path(paths[1]).read_text())
    assert sidecar["components"]["vision"] == str(WEIGHTS / "vision")
    assert set(clip["judge"]) == {"shape", "color", "background", "texture"}


def broken_png(folder: Path) -> Path:
    path = folder / "broken.png"
    good = folder / "good.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good)
    path.write_bytes(good.read_bytes()[:40])  # a PNG header and nothing after it
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("broken image", "not a readable image"),
        ("empty sequence", "the sequence is empty"),
        ("too many images", "at most 8"),
        ("unknown model", "unknown model '/etc'"),
        ("bad item", 'each item must be {"text": STR} or {"image": INDEX}'),
        ("wrong mode for the model", "is a ThinkDiff-LVLM model: mode clip needs a clip model"),
        ("huge image", "pixels, more than"),
        ("steps not a number", "steps must be a number, got 'many'"),
    ],
)
def test_api_bad_input_is_one_readable_line(app, client, tmp_path, case, message, capfd) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (10, 10, 200)).save(good)
    items, files, given = [{"text": "Word 1: red, "}, {"image": 0}], [handle_file(str(good))], {}
    if case == "broken image":
        files = [handle_file(str(broken_png(tmp_path)))]
    elif case == "empty sequence":
        items, files = [{"text": "  "}], []
    elif case == "too many images":
        items, files = [{"image": 0}] * 9, [handle_file(str(good))]
    elif case == "unknown model":
        given = {"model": "/etc"}
    elif case == "bad item":
        items = [{"image": "/etc/hostname"}]
    elif case == "wrong mode for the model":
        given = {"mode": "clip"}
    elif case == "steps not a number":
        given = {"steps": "many"}
    elif case == "huge image":
        huge = tmp_path / "huge.png"
        Image.new("1", (5000, 4000)).save(huge)  # 20 MP, a few kB
        files = [handle_file(str(huge))]
    with pytest.raises(Exception) as caught:
        client.predict(items, files, *settings(**given), api_name="/generate")
    text = str(caught.value)
    assert message in text, text
    assert "Traceback" not in text and "File \"" not in text and len(text.splitlines()) == 1
    assert "Traceback" not in capfd.readouterr().err  # a user's mistake is no bug: the server's log stays quiet
    # The server keeps serving.
    _, result = client.predict(
        [{"text": "Word 1: red, "}, {"image": 0}], [handle_file(str(good))], *settings(), api_name="/generate"
    )
    assert result["results"][0]["mode"] == "lvlm"


def test_a_bug_reaches_the_page_as_one_line_without_its_details(app, client, monkeypatch) -> None:
    _, backend, _ = app

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail\nTraceback (most recent call last): ...")

    monkeypatch.setattr(backend, "generate", broken)
    with pytest.raises(Exception) as caught:
        client.predict([{"text": "Word 1: red, "}], [], *settings(), api_name="/generate")
    text = str(caught.value)
    assert "internal error; the server log has the details" in text
    assert "secret detail" not in text and "Traceback" not in text


def test_an_oversized_upload_is_refused_before_it_arrives(app, client, tmp_path) -> None:
    _, backend, _ = app
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(int(backend.config.max_upload_mb * 2**20) + 1024))
    with pytest.raises(Exception) as caught:
        client.predict([{"image": 0}], [handle_file(str(big))], *settings(), api_name="/generate")
    assert "size" in str(caught.value).lower(), str(caught.value)
    assert all(p.stat().st_size != big.stat().st_size for p in Path(backend.out_dir).rglob("input-*"))


def test_the_server_never_reads_a_path_the_client_names(app, tmp_path) -> None:
    """A file object naming a server path (not an upload) is refused before the app sees it."""
    import httpx

    url, backend, _ = app
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    named = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": "secret.png"}
    data = [[{"text": "x"}, {"image": 0}], [named], *settings()]
    with httpx.Client(base_url=url, timeout=60) as http:
        event = http.post("gradio_api/call/generate", json={"data": data}).json()["event_id"]
        stream = http.get(f"gradio_api/call/generate/{event}").text
    assert "event: error" in stream and "complete" not in stream
    assert not any(p.name.startswith("input-") and p.read_bytes() == secret.read_bytes()
                   for p in Path(backend.out_dir).rglob("input-*"))  # fmt: skip
    # Nor does the file route serve an arbitrary server file.
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get(f"gradio_api/file={secret}").status_code in (403, 404)
        assert http.get("gradio_api/file=/etc/hostname").status_code in (403, 404)


def test_queue_position_progress_and_cancel(app) -> None:
    """One job at a time: a second waits in the queue with its position and can be cancelled;
    the running one reports its stages (the LVLM, then the denoising steps)."""
    from gradio_client.utils import Status

    url, _, _ = app
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    text = [{"text": "Word 1: red, Word 2: blue, Word 3: green, "}]
    running = first.submit(text, [], *settings(steps=250), api_name="/generate")  # a few seconds
    progress: list[str] = []

    def poll_running() -> Status:
        status = running.status()
        progress.extend(f"{u.desc} {u.unit}" for u in status.progress_data or [])
        return status.code

    deadline = time.time() + 60
    while poll_running() not in (Status.PROGRESS, Status.FINISHED):
        assert time.time() < deadline
        time.sleep(0.02)
    waiting = second.submit(text, [], *settings(steps=3), api_name="/generate")
    seen = None
    while time.time() < deadline and seen is None:
        poll_running()
        status = waiting.status()
        if status.code == Status.IN_QUEUE and status.rank is not None:
            seen = status
        time.sleep(0.02)
    assert seen is not None and seen.rank == 0 and seen.queue_size >= 1
    assert not running.done()  # the first was still running while the second waited
    assert waiting.cancel()
    while not running.done():
        poll_running()
        time.sleep(0.02)
    _, result = running.result()
    assert result["results"][0]["mode"] == "lvlm"
    assert any("the LVLM reads the sequence" in p for p in progress), progress
    assert any("steps" in p for p in progress), progress  # diffusers' denoising bar, tracked
    time.sleep(0.5)
    assert waiting.status().code == Status.CANCELLED


def test_backend_cancel_and_a_model_that_does_not_load(tmp_path) -> None:
    backend = Backend(AppConfig(out_dir=tmp_path / "out"))
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        backend.generate(["Word 1: red, "], GenerateOptions(), cancelled=event)
    assert backend.generate(["Word 1: red, "], GenerateOptions(steps=2))[0].mode == "lvlm"  # the lock is free

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "thinkdiff.json").write_text("{not json")
    real = Backend(AppConfig(models=[str(broken)], out_dir=tmp_path / "out2", device="cpu"))
    with pytest.raises((ValueError, OSError)) as caught:
        real.generate(["a red star"], GenerateOptions(mode="lvlm"))
    assert str(caught.value) and "\n" not in str(caught.value).strip()


def test_backend_on_models_given_by_flags(tmp_path) -> None:
    """The --model path (real models on a GPU), run here on the mini world's folders as if they were."""
    model = str(WEIGHTS / "thinkdiff" / "lvlm")
    backend = Backend(
        AppConfig(
            models=[model], decoders=[str(WEIGHTS / "flux")], lvlm=str(WEIGHTS / "vlm"), device="cpu",
            out_dir=tmp_path / "out",
        )
    )  # fmt: skip
    # The page names the folders, never their server paths.
    assert backend.world is None and backend.model_choices() == ["lvlm"] and backend.variant("lvlm") == "lvlm"
    assert backend.decoder_choices() == [DEFAULT, "flux"]
    options = GenerateOptions(model="lvlm", decoder="flux", steps=2, num_tokens=4, seed=1, text_bridge=True)
    lvlm, bridge = backend.generate(["Word 1: red, ", "Word 2: blue, "], options)
    assert (lvlm.mode, bridge.mode) == ("lvlm", "text-bridge") and lvlm.verdict is None  # no judge here
    assert lvlm.sidecar["components"]["model"] == model and lvlm.sidecar["settings"]["num_inference_steps"] == 2
    # The page's token count wins; the rest is the folder's own (thinkdiff.json: greedy, up to EOS).
    assert lvlm.sidecar["conditioning"]["num_tokens"] == 4 and lvlm.sidecar["conditioning"]["greedy"]
    assert Image.open(lvlm.path).size == (32, 32) and lvlm.sidecar_path.is_file()


def test_a_models_decoder_defaults_show_from_any_working_folder(tmp_path, monkeypatch) -> None:
    """A model folder records its decoder as train was given it (relative to the repository here):
    run from elsewhere, the page still finds it (as generate does) and shows its own defaults."""
    monkeypatch.chdir(tmp_path)
    recorded = json.loads((WEIGHTS / "thinkdiff" / "lvlm" / "thinkdiff.json").read_text())["diffusion_decoder"]
    assert not Path(recorded).is_absolute() and not Path(recorded).exists()  # not found as given here
    backend = Backend(AppConfig(models=[str(WEIGHTS / "thinkdiff" / "lvlm")], device="cpu", out_dir=tmp_path / "out"))
    defaults = backend.decoder_defaults("lvlm")
    flux = json.loads((WEIGHTS / "flux" / "thinkdiff_decoder.json").read_text())["defaults"]
    assert (defaults["steps"], defaults["true_cfg"]) == (flux["num_inference_steps"], flux["true_cfg_scale"])


def test_the_clip_example_runs_thinkdiff_clip_on_one_image_and_says_what_was_measured(tmp_path) -> None:
    from thinkdiff.miniworld.demo import clip_example_scene, run_clip_example

    backend = Backend(AppConfig(out_dir=tmp_path / "out"))
    example = backend.clip_example()
    assert example["model"] in backend.model_choices() and backend.variant(example["model"]) == "clip"
    (image,) = example["items"]
    assert Path(backend.served(image)).is_file()  # written inside --out, served from there
    scene = clip_example_scene()
    assert example["target"] == {k: getattr(scene, k) for k in ("shape", "color", "background", "texture")}
    report = json.loads((WEIGHTS.parent / "measured" / "report.json").read_text())["clip_calibrated"]
    assert f"all four attributes kept {report['image']['all']:.3f}" in example["caption"]
    options = GenerateOptions(model=example["model"], seed=example["seed"], target=example["target"], text_bridge=True)
    clip, bridge = backend.generate(example["items"], options)
    assert (clip.mode, bridge.mode) == ("clip", "text-bridge")
    # The page's job is the demo's example: the same picture, the same reading.
    threads = torch.get_num_threads()
    try:
        shown = run_clip_example(out_dir=tmp_path / "demo")
    finally:
        torch.set_num_threads(threads)  # the demo sets its own thread count
    assert clip.verdict == shown["verdict"].to_dict() and clip.correct == all(shown["kept"].values())
    assert Backend(AppConfig(models=[str(WEIGHTS / "thinkdiff" / "clip")], out_dir=tmp_path / "o2")).clip_example() is None


def test_the_worlds_calibrated_aligner_comes_first_when_it_has_one(tmp_path) -> None:
    from thinkdiff.miniworld.build import DEMO_CALIBRATED, calibrated_dir

    world = tmp_path / "world"
    (world / "thinkdiff").mkdir(parents=True)
    for part in ("t5", "flux", "vlm", "vision", "judge"):
        (world / part).symlink_to(WEIGHTS / part)
    for name in ("lvlm", "clip"):
        (world / "thinkdiff" / name).symlink_to(WEIGHTS / "thinkdiff" / name)
    plain = Backend(AppConfig(miniworld=world, out_dir=tmp_path / "out"))
    assert plain.model_choices() == ["mini world: lvlm", "mini world: clip"]
    calibrated = calibrated_dir(world, DEMO_CALIBRATED)
    calibrated.symlink_to(WEIGHTS / "thinkdiff" / "lvlm")  # stands in for a calibrated lvlm aligner
    backend = Backend(AppConfig(miniworld=world, out_dir=tmp_path / "out"))
    assert backend.model_choices()[:2] == [f"mini world: {calibrated.name}", "mini world: lvlm"]
    assert backend.variant(backend.model_choices()[0]) == "lvlm"


def test_cli_refuses_bad_flags_in_one_line(capsys) -> None:
    from thinkdiff.cli import main

    assert main(["app", "--model", "/no/such/model", "--port", str(free_port())]) == 2
    assert "--model /no/such/model: no such folder" in capsys.readouterr().err
    assert main(["app", "--max-images", "0"]) == 2
    assert "--max-images must be >= 1" in capsys.readouterr().err
    assert main(["app", "--quantize", "int8"]) == 2
    assert "apply to real models (--model)" in capsys.readouterr().err


def test_app_binds_loopback_by_default(app) -> None:
    from thinkdiff.cli import build_parser

    assert build_parser().parse_args(["app"]).host == "127.0.0.1"
    assert app[2].server_name == "127.0.0.1"


def test_another_client_cannot_guess_a_jobs_folder(app, client) -> None:
    """Each job's folder (its uploads and outputs, served to its owner) carries a random part: a
    second client that learns its own folder from its answer cannot derive the first one's."""
    import httpx

    url, backend, _ = app
    example = backend.example("Color-II", 2, 1)
    json_items, files = api_inputs(example["items"])
    client.predict(json_items, files, *settings(), api_name="/generate")
    Client(url, verbose=False).predict([{"text": "Word 1: red, "}], [], *settings(), api_name="/generate")
    # The second client's answer names its folder on the server (in its download URLs).
    jobs = sorted((p for p in Path(backend.out_dir).iterdir() if p.name != "examples"), key=lambda p: p.stat().st_mtime)
    theirs, mine = jobs[-2:]
    assert (theirs / "input-1.png").is_file()
    from datetime import datetime, timedelta

    day, clock, number = mine.name.split("-")[:3]
    now = datetime.strptime(f"{day}-{clock}", "%Y%m%d-%H%M%S")
    # Guesses from the second client's own folder: its clock (a few seconds back) and the previous
    # job numbers, as the folder names would be without a random part.
    guesses = {
        f"{(now - timedelta(seconds=back)):%Y%m%d-%H%M%S}-{int(number) - n:04d}"
        for back in range(5)
        for n in range(1, 4)
    }
    assert theirs.name not in guesses
    with httpx.Client(base_url=url, timeout=60) as http:
        for name in guesses:
            assert http.get(f"gradio_api/file={backend.out_dir / name / 'input-1.png'}").status_code in (403, 404)


def test_out_folder_with_foreign_files_is_refused(tmp_path: Path, capsys) -> None:
    """Everything under --out is served to the page's clients: a folder of the user's own files is refused."""
    (tmp_path / "notes.txt").write_text("private")
    with pytest.raises(ValueError, match="holds files the app did not write"):
        Backend(AppConfig(out_dir=tmp_path))
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "examples").mkdir()
    (tmp_path / "20261201-211546-0000-0123456789abcdef").mkdir()
    Backend(AppConfig(out_dir=tmp_path))  # the app's own folders are fine


def test_a_symlink_in_out_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A symlink named like the app's own entries would carry its writes outside --out: it is
    refused when the backend starts, before the page writes its example images."""
    from thinkdiff.paths import UnsafePathError

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("examples", "20250101-000000-0001-0123456789abcdef"):
        (out / name).symlink_to(elsewhere)
        with pytest.raises(UnsafePathError, match=f"{name} is a symlink"):
            Backend(AppConfig(out_dir=out))
        (out / name).unlink()
    (out / "examples").write_text("not a folder")
    with pytest.raises(UnsafePathError, match="examples is not a folder"):
        Backend(AppConfig(out_dir=out))
    (out / "examples").unlink()
    backend = Backend(AppConfig(out_dir=out))
    # Swapped in after the start: the folder is checked again before each write into it.
    (out / "examples").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="examples is a symlink"):
        backend.example("Color-I", 2, 0)
    (out / "examples").unlink()
    assert backend.example("Color-I", 2, 0)["items"]
    assert not (out / "examples").is_symlink() and any((out / "examples").iterdir())
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 2**64, 10**30])
def test_the_seed_box_takes_the_command_lines_seeds_only(tmp_path, seed) -> None:
    backend = Backend(AppConfig(out_dir=tmp_path / "out"))
    with pytest.raises(ValueError, match=rf"^seed {seed} is not a seed: seeds run from 0 to 9223372036854775807$"):
        backend.generate(["Word 1: red, "], GenerateOptions(seed=seed, steps=2))
    assert not (tmp_path / "out").exists()  # refused before a job folder was made
