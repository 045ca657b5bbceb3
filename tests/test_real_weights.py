"""Tests on the real checkpoints, run only when they are already in the local Hugging Face cache.

``pytest -m real_weights -s -rs`` on a machine with a CUDA GPU (the default run deselects them,
see ``addopts`` in pyproject.toml). Nothing is ever downloaded: the hub runs offline, and each test
first looks its repositories up in the local cache (``snapshot_download(local_files_only=True)``
plus every weight shard its ``*.index.json`` names) and skips, naming the missing repository,
when one is absent or incomplete. docs/gpu-check.md says what each test shows.

The unmarked tests at the end check the skip logic itself, on a temporary cache.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

T5_XXL = "google/flan-t5-xxl"
QWEN2_VL_7B = "Qwen/Qwen2-VL-7B-Instruct"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
BLIP2 = "Salesforce/blip2-flan-t5-xxl"
RELEASE = "Mifucius/ThinkDiff"

NEEDS: dict[str, list[str]] = {
    T5_XXL: ["config.json", "tokenizer_config.json", "spiece.model", "model.safetensors.index.json"],
    QWEN2_VL_7B: ["config.json", "preprocessor_config.json", "tokenizer_config.json", "model.safetensors.index.json"],
    FLUX_DEV: [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model*.safetensors*",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model*.safetensors*",
        "tokenizer/*",
        "tokenizer_2/*",
    ],
    BLIP2: ["config.json", "model*.safetensors*"],
}
"""Files (globs, relative to the snapshot) each repository must have in the cache."""

CAPTIONS = [
    "a red car parked on a quiet street",
    "two dogs running across a green field",
    "a bowl of fresh fruit on a wooden table",
    "a man riding a bicycle in the rain",
    "a small boat on a calm blue lake",
    "a cat sleeping on a stack of books",
    "a snowy mountain under a clear sky",
    "children playing football in a park",
    "a cup of coffee next to a laptop",
    "an old lighthouse on a rocky coast",
    "a woman reading a newspaper on a bench",
    "a plate of pasta with tomato sauce",
    "a yellow taxi waiting at a traffic light",
    "a horse standing in a wooden stable",
    "a bridge over a wide river at sunset",
    "a bird sitting on a tree branch",
    "a kitchen with white cabinets and a window",
    "a train crossing a snowy valley",
    "a child holding a red balloon",
    "a city skyline at night with bright lights",
]


# ---- the cache look-up ---------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The cache huggingface_hub reads, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(
    repo_id: str, needs: Sequence[str] | None = None, tensors: Callable[[str], bool] | None = None
) -> Path:
    """The cached snapshot of ``repo_id`` with every file of ``needs``; ``pytest.skip`` otherwise.

    Only the local cache is read (never the network). The weight index of each folder (safetensors
    preferred, as the loaders choose) must have every shard it names, or, with ``tensors``, every
    shard holding a tensor ``tensors`` accepts (what the project downloads for BLIP-2's vision
    tower). So a half-finished download skips instead of failing in the loader.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        pytest.skip(
            f"{repo_id} is not in the local Hugging Face cache ({cache}); these tests never download: "
            f"fetch it first (hf download {repo_id})"
        )
    missing = [p for p in (needs if needs is not None else NEEDS[repo_id]) if not _present(folder, p)]
    for index in _weight_indexes(folder):
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted({shard for key, shard in weight_map.items() if tensors is None or tensors(key)})
        missing += [str((index.parent / s).relative_to(folder)) for s in shards if not (index.parent / s).is_file()]  # fmt: skip
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        pytest.skip(f"{repo_id} is in the local Hugging Face cache ({cache}) but incomplete: missing {shown}")
    return folder


def _weight_indexes(folder: Path) -> list[Path]:
    """The index each loader reads: per folder, the safetensors one when there is one.

    A repository with both formats (Flan-T5-XXL) keeps the ``.bin`` index in the cache while the
    project downloads only the safetensors shards; that index's shards are not needed.
    """
    chosen: dict[Path, Path] = {}
    for index in sorted(folder.rglob("*.index.json")):
        if index.parent not in chosen or ".safetensors." in index.name:
            chosen[index.parent] = index
    return sorted(chosen.values())


def _present(folder: Path, pattern: str) -> bool:
    # is_file follows the cache's symlinks: a link to a blob that never finished is absent.
    return any(path.is_file() for path in folder.glob(pattern))


def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the checkpoints run in bf16 at 7-12 B parameters")
    return torch.device("cuda", torch.cuda.current_device())


def gpu_gib() -> float:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is off: any attempt to reach it fails instead of downloading."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def agreement_tools():
    """``feature_agreement`` and its tolerance, shared with benchmarks/gpu_check.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    return gpu_check.feature_agreement, gpu_check.AGREEMENT_TOLERANCE


def shapes_image(colour: str, size: int = 448):
    """A plain picture: one coloured disc on grey (something an LVLM can describe)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return image


def check_image(image, size: int) -> None:
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape == (size, size, 3)
    assert np.isfinite(pixels).all() and pixels.std() > 5, "a blank or constant image"


# ---- real checkpoints --------------------------------------------------------------------------------


def word_f1(a: str, b: str) -> float:
    x, y = a.lower().split(), b.lower().split()
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    return 0.0 if common == 0 else 2 * common / (len(x) + len(y))


def readback(proxy, captions: Sequence[str], max_new_tokens: int = 40) -> dict[str, Any]:
    """How well the proxy decoder reads captions back from its own encoder's states.

    Greedy decoding gives the exact-match rate and the word F1; the teacher-forced loss of each
    caption is taken on its own states and on another caption's (the same captions, lengths and
    masks, only paired wrongly: what the decoder guesses without the information).
    """
    batch = proxy.tokenizer(list(captions), padding=True, return_tensors="pt")
    mask = batch.attention_mask.bool().to(proxy.device)
    labels = batch.input_ids.clone()
    labels[labels == proxy.tokenizer.pad_token_id] = -100
    other = torch.roll(torch.arange(len(captions)), 1)
    with torch.no_grad():
        states = proxy.encode(batch.input_ids, batch.attention_mask)
        decoded = proxy.generate_text(states, mask, max_new_tokens=max_new_tokens)
        own = float(proxy.loss(states, mask, labels))
        swapped = float(proxy.loss(states[other.to(states.device)], mask[other.to(mask.device)], labels))
    return {
        "exact_match_rate": sum(d.strip().lower() == c.lower() for d, c in zip(decoded, captions)) / len(captions),
        "word_f1": sum(word_f1(d, c) for d, c in zip(decoded, captions)) / len(captions),
        "loss_own": own,
        "loss_swapped": swapped,
        "decoded": decoded,
    }


def reads_back(result: dict[str, Any]) -> bool:
    """The states carry the caption: the decoder is far surer of it given its own states, and its
    greedy text shares most words with it. A loader that drops or mis-casts the cross-attention or
    the LM head makes the two losses alike (a random T5: 17.09 vs 17.08 nats)."""
    return result["loss_own"] < result["loss_swapped"] - 1.0 and result["word_f1"] > 0.5


@pytest.mark.real_weights
def test_flan_t5_xxl_proxy_reads_back_its_own_encoder_states(offline, record_property) -> None:
    """The proxy decoder, loaded by the project's loader, reads captions back from T5 encoder states."""
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

    folder = cached_snapshot(T5_XXL)
    device = cuda_device()
    proxy = ProxyT5Decoder.from_pretrained(folder, with_encoder=True, dtype=torch.bfloat16, device=device)
    result = readback(proxy, CAPTIONS)
    for name in ("exact_match_rate", "word_f1", "loss_own", "loss_swapped"):
        record_property(name, result[name])
    print(f"\nFlan-T5-XXL read-back of {len(CAPTIONS)} captions: exact match {result['exact_match_rate']:.0%}, "
          f"word F1 {result['word_f1']:.2f}, loss {result['loss_own']:.3f} on its own states vs "
          f"{result['loss_swapped']:.3f} on another caption's")  # fmt: skip
    for c, d in list(zip(CAPTIONS, result["decoded"]))[:5]:
        print(f"  {c!r} -> {d!r}")
    assert reads_back(result), result


@pytest.mark.real_weights
def test_qwen2_vl_7b_generate_and_teacher_forced_features_agree_in_bf16(offline, record_property) -> None:
    """Features read out of ``generate`` and recomputed by one teacher-forced pass, same tokens."""
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    feature_agreement, tolerance = agreement_tools()
    folder = cached_snapshot(QWEN2_VL_7B)
    device = cuda_device()
    extractor = LVLMFeatureExtractor.from_pretrained(folder, device=device, dtype=torch.bfloat16)
    prompts = [[shapes_image(c), "Describe the image in detail."] for c in ("red", "blue", "white", "green")]
    generated = extractor.generate(prompts, SamplingSettings(max_new_tokens=48, seed=0), teacher_forced=False)
    forced = extractor.features_from_tokens(extractor.prepare_inputs(prompts), generated.token_ids)
    result = feature_agreement(generated.features, forced.features, generated.feature_mask & forced.feature_mask)
    for name, value in result.items():
        record_property(name, value)
    print(f"\nQwen2-VL-7B bf16, generate vs teacher-forced on {result['tokens']} tokens: {result}; "
          f"tolerance {tolerance}; texts: {generated.texts}")  # fmt: skip
    assert all(text.strip() for text in generated.texts)
    assert result["tokens"] >= 16  # enough positions to compare, even if some answers end early
    assert result["within_tolerance"], f"{result} outside {tolerance}"


@pytest.mark.real_weights
@pytest.mark.parametrize("variant", ["lvlm", "clip"])
def test_released_thinkdiff_checkpoint_converts_and_draws_a_cobsat_prompt(offline, variant: str, tmp_path: Path) -> None:
    """The authors' checkpoint converts, and draws one 512 px CoBSAT colour prompt end to end."""
    from thinkdiff.pipelines import Request, ThinkDiffPipeline, cobsat_items
    from thinkdiff.pipelines.official import convert_official_checkpoint

    name = f"thinkdiff_{variant}.pth"
    local = os.environ.get("THINKDIFF_RELEASE_DIR")  # the .pth files downloaded by hand, if not via the hub
    release = Path(local) if local else cached_snapshot(RELEASE, [f"**/{name}"])
    found = sorted(release.glob(f"**/{name}"))
    if not found:
        pytest.skip(f"{name} is not in {release}")
    if variant == "lvlm":
        source = str(cached_snapshot(QWEN2_VL_7B))
    else:
        # By hub id, offline: the project reads only the shards of BLIP-2's vision tower from the cache.
        cached_snapshot(BLIP2, tensors=lambda name: name.startswith("vision_model."))
        source = BLIP2
    flux = cached_snapshot(FLUX_DEV)
    device = cuda_device()
    model = convert_official_checkpoint(found[0], tmp_path / "model", variant, source_model=source, diffusion_decoder=str(flux))  # fmt: skip
    pipe = ThinkDiffPipeline.from_pretrained(
        model, device=device, dtype=torch.bfloat16, offload="none" if gpu_gib() >= 48 else "model"
    )
    items = cobsat_items(["white", "blue", "red"], [shapes_image("white"), shapes_image("blue")])
    out = pipe(Request(items, seed=0), height=512, width=512)
    out.images[0].save(tmp_path / f"cobsat-{variant}.png")
    print(f"\n{variant}: {tmp_path / f'cobsat-{variant}.png'}; LVLM text {out.lvlm_texts[0]!r}; timings {out.timings}")
    check_image(out.images[0], 512)


@pytest.mark.real_weights
def test_flux_dev_takes_prompt_embeddings_of_128_and_256_tokens(offline, tmp_path: Path) -> None:
    """FLUX.1-dev draws from T5-space prompt embeddings at ThinkDiff's two lengths (lvlm; + text)."""
    from diffusers import FluxPipeline

    folder = cached_snapshot(FLUX_DEV)
    device = cuda_device()
    flux = FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    if gpu_gib() >= 48:
        flux.to(device)
    else:
        flux.enable_model_cpu_offload(device=device)
    caption = "a red apple on a white plate, studio photo"
    for tokens in (128, 256):
        # The embeddings are FLUX's own T5 states of a caption, padded to the length ThinkDiff gives.
        embeds, pooled, _ = flux.encode_prompt(prompt=caption, prompt_2=caption, max_sequence_length=tokens, device=device)
        assert embeds.shape == (1, tokens, 4096)
        image = flux(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=512, width=512, num_inference_steps=8,
            generator=torch.Generator().manual_seed(0),
        ).images[0]  # fmt: skip
        image.save(tmp_path / f"flux-{tokens}.png")
        print(f"\nFLUX.1-dev, {tokens}-token prompt embeddings: {tmp_path / f'flux-{tokens}.png'}")
        check_image(image, 512)


# ---- the skip logic itself (default run) ------------------------------------------------------------


def _fake_repo(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


def test_skip_names_the_repo_missing_from_an_empty_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(pytest.skip.Exception) as skipped:
        cached_snapshot(T5_XXL)
    assert T5_XXL in str(skipped.value) and "not in the local Hugging Face cache" in str(skipped.value)
    assert str(tmp_path / "empty") in str(skipped.value)
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())  # nothing fetched


def test_skip_names_missing_files_and_shards_then_finds_a_complete_snapshot(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snapshot = _fake_repo(cache, "org/model", {
        "config.json": "{}", "model.safetensors.index.json": json.dumps(index),
        "model-00001-of-00002.safetensors": "x",
    })  # fmt: skip
    needs = ["config.json", "tokenizer_config.json", "model.safetensors.index.json"]
    with pytest.raises(pytest.skip.Exception) as skipped:
        cached_snapshot("org/model", needs)
    message = str(skipped.value)
    assert "org/model" in message and "incomplete" in message
    assert "tokenizer_config.json" in message and "model-00002-of-00002.safetensors" in message
    assert "model-00001" not in message
    (snapshot / "tokenizer_config.json").write_text("{}")
    (snapshot / "model-00002-of-00002.safetensors").write_text("x")
    assert cached_snapshot("org/model", needs) == snapshot
    # A pickled-weights index beside the safetensors one is not the loaders' choice: its shards
    # may be absent (the project skips *.bin when safetensors exist).
    (snapshot / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    assert cached_snapshot("org/model", needs) == snapshot
    # Only the shards holding the wanted tensors are needed with a tensor filter.
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(pytest.skip.Exception, match="model-00001-of-00002"):
        cached_snapshot("org/model", needs)
    assert cached_snapshot("org/model", needs, tensors=lambda name: name == "b") == snapshot
    (snapshot / "model-00001-of-00002.safetensors").write_text("x")
    # A dangling link (an unfinished blob) counts as missing.
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    (snapshot / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "no-such-blob")
    with pytest.raises(pytest.skip.Exception, match="model-00002-of-00002"):
        cached_snapshot("org/model", needs)


def test_real_weight_tests_are_deselected_by_default(pytestconfig) -> None:
    """The default run must not start a 12 B model because a checkpoint happens to be cached."""
    addopts = pytestconfig.getini("addopts")
    assert "not real_weights" in addopts[addopts.index("-m") + 1]
    marked = [name for name, obj in globals().items() if name.startswith("test_") and hasattr(obj, "pytestmark")
              and any(m.name == "real_weights" for m in obj.pytestmark)]  # fmt: skip
    assert len(marked) == 4


def test_the_read_back_check_tells_a_trained_t5_from_a_random_one(tiny_env: Path) -> None:
    """The same measurement and bar on the CPU: the mini world's trained T5 reads its captions back,
    the tiny kit's random T5 does not (so the real-weight test can fail)."""
    import itertools

    from thinkdiff.miniworld.world import COLORS, SHAPES, TEXTURES, caption
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

    captions = [caption(*parts) for parts in itertools.islice(itertools.product(SHAPES, COLORS, TEXTURES, COLORS), 0, None, 97)][:20]  # fmt: skip
    import thinkdiff.miniworld

    trained = Path(thinkdiff.miniworld.__file__).parent / "weights" / "t5"  # the committed weights
    result = readback(ProxyT5Decoder.from_pretrained(trained, with_encoder=True, device="cpu"), captions)
    assert reads_back(result) and result["exact_match_rate"] >= 0.8, result
    random_t5 = readback(ProxyT5Decoder.from_pretrained(tiny_env / "t5", with_encoder=True, device="cpu"), captions)
    assert not reads_back(random_t5), random_t5
