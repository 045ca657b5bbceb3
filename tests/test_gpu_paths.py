"""The fixes of the GPU-path review (docs/gpu-paths.md), checked on the CPU where a check can run there.

Each test names its finding (F1 ... F16 of ``shared/reference/review/gpu-paths.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from thinkdiff.pipelines import (
    DEFAULT_INSTRUCTION,
    DecoderSpec,
    InferenceSettings,
    Request,
    ThinkDiffPipeline,
)
from thinkdiff.pipelines.decoders import base as decoders_base

from .test_pipeline import FLUX_FAST, image, make_model


@pytest.fixture(scope="module")
def models(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-path-models")
    return {"lvlm": make_model(root / "lvlm", "lvlm"), "clip": make_model(root / "clip", "clip", seed=1)}


ITEMS: list[Any] = ["Word 1: white, ", image((230, 230, 230)), "\n\nWord 2: blue, "]


# ---- F1: decoder_kwargs on the pipeline's device ------------------------------------------------


@torch.no_grad()
def test_decoder_kwargs_move_to_the_pipelines_device_and_dtype(models) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["clip"], device="cpu")
    emb = pipe.encode(Request(ITEMS, seed=0), true_cfg_scale=2.0)
    assert emb.device == pipe.device
    assert emb.prompt_embeds.device.type == "cpu"  # kept on the CPU, moved when handed out

    # A CUDA pipeline's embeddings would say "cuda"; the meta device shows the move without one.
    on_meta = dataclasses.replace(emb, device=torch.device("meta")).decoder_kwargs(0)
    names = {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert set(on_meta) == names
    assert {t.device.type for t in on_meta.values()} == {"meta"}

    given = emb.decoder_kwargs(0, device="meta", dtype=torch.float16)
    assert {(t.device.type, t.dtype) for t in given.values()} == {("meta", torch.float16)}
    plain = emb.decoder_kwargs(0)
    length = int(emb.prompt_attention_mask[0].sum())
    torch.testing.assert_close(plain["prompt_embeds"], emb.prompt_embeds[:1, :length], rtol=0, atol=0)


# ---- F9: no layer's hidden states kept by generate in inference ---------------------------------


@torch.no_grad()
def test_inference_generate_keeps_no_hidden_states(models, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Qwen2VLForConditionalGeneration

    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    kept: list[Any] = []
    original = Qwen2VLForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        kept.append(out.hidden_states)
        return out

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "generate", spy)
    lvlm = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    embeds = lvlm.encode(Request(ITEMS, seed=3))
    bridge = ThinkDiffPipeline.from_pretrained(None, mode="text-bridge", lvlm="tiny:qwen2-vl", decoder="tiny:flux")
    bridged = bridge.encode(Request(ITEMS, seed=3))
    assert kept == [None, None]  # the spy works: a plain generate with states records them below

    # lvlm mode: the teacher-forced features of the same tokens, exactly.
    extractor = LVLMFeatureExtractor.from_pretrained(resolve_model_dir("tiny:qwen2-vl"), device="cpu")
    sampling = SamplingSettings.exactly(128, temperature=0.6, top_p=0.9, seed=3)
    forced = extractor.generate([[DEFAULT_INSTRUCTION, *ITEMS]], sampling, teacher_forced=True)
    torch.testing.assert_close(embeds.prompt_embeds[0], lvlm.aligner(forced.features)[0], rtol=0, atol=0)
    with_states = extractor.generate([[DEFAULT_INSTRUCTION, *ITEMS]], sampling)
    assert kept[-1] is not None and len(kept[-1]) == 128  # one tuple of layer states per step

    # text-bridge: the same text as a generate that kept its states, and no features computed.
    sampling = SamplingSettings(max_new_tokens=128, temperature=0.6, top_p=0.9, seed=3)
    texts_only = extractor.generate([[DEFAULT_INSTRUCTION, *ITEMS]], sampling, with_states=False)
    full = extractor.generate([[DEFAULT_INSTRUCTION, *ITEMS]], sampling)
    assert texts_only.texts == full.texts == bridged.lvlm_texts
    assert texts_only.features.shape == (*texts_only.token_ids.shape, 0)
    torch.testing.assert_close(texts_only.token_ids, full.token_ids, rtol=0, atol=0)
    assert with_states.features.shape[-1] == extractor.hidden_size


# ---- F10: models freed before the CUDA cache is emptied -----------------------------------------


@torch.no_grad()
def test_stage_models_are_unreferenced_when_the_cache_is_emptied(models, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    refs: dict[str, weakref.ref] = {}
    alive_at_collect: list[list[str]] = []

    class Recording:
        """``gc`` as release() sees it: records which loaded models survive each collection."""

        @staticmethod
        def collect() -> int:
            found = gc.collect()
            alive_at_collect.append(sorted(name for name, ref in refs.items() if ref() is not None))
            return found

    original_get = ThinkDiffPipeline._get

    def recording_get(self, key, load, timings, memory):
        model = original_get(self, key, load, timings, memory)
        refs.setdefault(key, weakref.ref(model))
        return model

    monkeypatch.setattr(decoders_base, "gc", Recording)
    monkeypatch.setattr(ThinkDiffPipeline, "_get", recording_get)
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    pipe(Request(ITEMS, seed=0, extra_text="a red car"), **FLUX_FAST)
    # One release per stage, each after its stage's model went: LVLM, text encoders, decoder.
    assert alive_at_collect == [[], [], []]
    assert set(refs) == {"lvlm", "text_encoders", "decoder"}


# ---- F11: keep_loaded with offload --------------------------------------------------------------


def test_keep_loaded_with_offload_is_refused(tiny_env) -> None:
    spec = DecoderSpec.inspect("tiny:flux")
    # A CUDA device object needs no GPU; the refusal comes before anything loads.
    with pytest.raises(ValueError, match="keep_loaded keeps stage 1's model on the device, which --offload model"):
        ThinkDiffPipeline("text-bridge", spec, device="cuda", offload="model", keep_loaded=True)
    ThinkDiffPipeline("text-bridge", spec, device="cuda", offload="model")  # offload alone is fine


# ---- F14: FLUX prompts above its 512-token regime -----------------------------------------------


def test_flux_prompts_above_512_tokens_are_warned(models, caplog: pytest.LogCaptureFixture) -> None:
    clip = ThinkDiffPipeline.from_pretrained(models["clip"], device="cpu", settings=InferenceSettings(max_images=16))
    per_image = clip._clip_tokens_per_image()
    many = max(1, (512 - 128) // per_image + 1)  # just enough images to pass 512 with the text
    with caplog.at_level(logging.WARNING, logger="thinkdiff.pipelines.pipeline_thinkdiff"):
        clip.check([Request([image((9, 9, 9))] * (many - 1)), Request([image((9, 9, 9))] * many)])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith(f"request 1: up to {many * per_image + 128} prompt tokens")

    caplog.clear()
    lvlm = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu", settings=InferenceSettings(num_tokens=400))
    with caplog.at_level(logging.WARNING, logger="thinkdiff.pipelines.pipeline_thinkdiff"):
        lvlm.check([Request(ITEMS), Request(ITEMS, extra_text="a red car")])
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["request 1: up to 528 prompt tokens"]


# ---- F2: vLLM always takes the first visible GPU ------------------------------------------------


def test_vllm_device_other_than_the_first_visible_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from thinkdiff.data.lvlm_engines import _vllm_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _vllm_device("cuda:0") == _vllm_device("cuda") == "cuda:0"
    assert _vllm_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"--device cuda:3 cannot apply to vLLM.*CUDA_VISIBLE_DEVICES=3"):
        _vllm_device("cuda:3")

    # torchrun: rank 2 sees every GPU, so its engine would sit on GPU 0 beside rank 0's.
    monkeypatch.setenv("LOCAL_RANK", "2")
    for visible in (None, "0,1,2,3"):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(ValueError, match=r"LOCAL_RANK=2 with --engine vllm.*CUDA_VISIBLE_DEVICES=\$LOCAL_RANK"):
            _vllm_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # each rank sees only its own GPU: fine
    assert _vllm_device(None if torch.cuda.is_available() else "cuda") == "cuda:0"


# ---- F3: a vLLM that runs beside transformers 5 --------------------------------------------------


def test_vllm_version_and_its_transformers_requirement_are_checked() -> None:
    from thinkdiff.data.extraction import VLLM_MIN_VERSION, vllm_install_problem

    # The transformers lines as vLLM 0.16 / 0.19.1 / 0.33.0 declare them (their wheels' metadata).
    old = ["transformers<5,>=4.56.0"]
    first = ["transformers!=5.0.*,!=5.1.*,!=5.2.*,!=5.3.*,!=5.4.*,!=5.5.0,>=4.56.0", "torch==2.10.0"]
    newest = ["transformers<5.21.0,>=5.16.1", "torch==2.14.0", 'pytest; extra == "test"']
    problem = vllm_install_problem("0.16.0", old, "5.24.0")
    assert problem is not None and problem.startswith("vLLM 0.16.0 is too old") and "\n" not in problem
    assert f">= {VLLM_MIN_VERSION}" in problem
    assert vllm_install_problem(VLLM_MIN_VERSION, first, "5.24.0") is None
    assert vllm_install_problem("0.33.0", newest, "5.20.1") is None
    forced = vllm_install_problem("0.33.0", newest, "5.24.0")
    assert forced == (
        "vLLM 0.33.0 requires transformers<5.21.0,>=5.16.1 but transformers 5.24.0 is installed; install a "
        "vLLM that admits it (pip install 'thinkdiff[vllm]' picks one) or use --engine hf"
    )
    assert vllm_install_problem("0.33.0", newest, None) is None  # nothing declared to check against


def test_pyproject_vllm_extra_admits_transformers_5() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    from thinkdiff.data.extraction import VLLM_MIN_VERSION

    assert project["optional-dependencies"]["vllm"] == [f"vllm>={VLLM_MIN_VERSION}"]


# ---- F8: the proxy loss in fp32 whatever the precision ------------------------------------------


def test_proxy_loss_is_fp32_with_bf16_weights_and_no_autocast(tiny_env) -> None:
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

    proxy = ProxyT5Decoder.from_pretrained("tiny:t5", dtype=torch.bfloat16, device="cpu")
    generator = torch.Generator().manual_seed(0)
    memory_BMD = torch.randn(3, 5, proxy.d_model, generator=generator, requires_grad=True)
    mask_BM = torch.ones(3, 5, dtype=torch.bool)
    labels_BT = torch.randint(0, proxy.t5.config.vocab_size, (3, 7), generator=generator)
    labels_BT[1, 4:] = -100  # padding

    loss = proxy.loss(memory_BMD, mask_BM, labels_BT)  # bf16 weights, no autocast (--mixed-precision no)
    assert loss.dtype == torch.float32
    # T5's own loss of the same pass is bf16: the loss the trainer logged before the fix.
    stock = proxy.t5(
        encoder_outputs=(memory_BMD.bfloat16(),), attention_mask=mask_BM, labels=labels_BT, use_cache=False
    )
    assert stock.loss.dtype == torch.bfloat16
    reference = torch.nn.functional.cross_entropy(
        stock.logits.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
    loss.backward()
    assert memory_BMD.grad is not None and memory_BMD.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert proxy.loss(memory_BMD, mask_BM, labels_BT).dtype == torch.float32


# ---- F12: per-component downloads, computed from the snapshot's own layout ----------------------


def _write_index(folder: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_download_patterns_from_index_files_laid_out_like_the_hub(tmp_path: Path) -> None:
    """Hand-made layouts in the shape of flan-t5-xxl, BLIP-2 and FLUX.1-dev (names, not sizes)."""
    import json

    from huggingface_hub.utils import filter_repo_objects

    from thinkdiff.models.loading import diffusers_files, shards_holding
    from thinkdiff.pipelines.decoders import FluxDecoder

    t5 = tmp_path / "flan-t5-xxl"
    shard = "model-0000{}-of-00005.safetensors".format
    t5_map = {"shared.weight": shard(1), "encoder.final_layer_norm.weight": shard(2), "lm_head.weight": shard(5)}
    t5_map |= {f"encoder.block.{i}.layer.0.SelfAttention.q.weight": shard(1 + i // 12) for i in range(24)}
    t5_map |= {f"decoder.block.{i}.layer.0.SelfAttention.q.weight": shard(3 + i // 12) for i in range(24)}
    _write_index(t5, t5_map)
    _write_index(t5, {k: v.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for k, v in t5_map.items()},
                 "pytorch_model.bin.index.json")  # fmt: skip
    # The LVLM variant needs no encoder block: shard 1 holds only encoder blocks and `shared`.
    no_blocks = shards_holding(t5, lambda name: not name.startswith("encoder.block."))
    assert no_blocks == [shard(1), shard(2), shard(3), shard(4), shard(5)]
    t5_map["shared.weight"] = shard(3)
    _write_index(t5, t5_map)
    assert shards_holding(t5, lambda name: not name.startswith("encoder.block.")) == [shard(2), shard(3), shard(4), shard(5)]
    assert shards_holding(t5, lambda name: True) == [shard(i) for i in range(1, 6)]  # safetensors, not .bin

    blip2 = tmp_path / "blip2-flan-t5-xxl"
    part = "model-0000{}-of-00006.safetensors".format
    blip_map = {"vision_model.embeddings.patch_embedding.weight": part(1), "vision_model.post_layernorm.weight": part(1),
                "qformer.layernorm.weight": part(1), "query_tokens": part(1), "language_projection.weight": part(1)}  # fmt: skip
    blip_map |= {f"language_model.encoder.block.{i}.layer.0.SelfAttention.q.weight": part(2 + i % 5) for i in range(24)}
    _write_index(blip2, blip_map)
    assert shards_holding(blip2, lambda name: name.startswith("vision_model.")) == [part(1)]
    assert shards_holding(blip2, lambda name: name.startswith("vision.")) is None  # no such tensors: all
    assert shards_holding(tmp_path / "no-index", lambda name: True) is None  # one file: needed whole

    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    components = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                  "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
                  "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", **components}))
    repo_files = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
                  "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                  "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
                  "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
                  "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model",
                  "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                  "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
                  "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip
    decoder = FluxDecoder(DecoderSpec("x", "flux", "FluxPipeline", 4096, 768, None, True), torch.device("cpu"), torch.float32)

    def downloaded(components: list[str]) -> set[str]:
        skipped = [name for name in decoder.all_components if name not in components]  # as build() skips
        return set(filter_repo_objects(repo_files, allow_patterns=diffusers_files(flux, skipped=skipped)))

    denoise = downloaded(list(decoder.denoise_components))
    assert denoise == {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                       "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                       "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
                       "vae/diffusion_pytorch_model.safetensors"}  # fmt: skip
    pooled_only = downloaded(decoder.components_for(["pooled"]))  # lvlm mode: CLIP("") only, no T5-XXL
    assert {f.split("/")[0] for f in pooled_only} == {"model_index.json", "scheduler", "text_encoder", "tokenizer"}


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Path], list[str]]:
    """``huggingface_hub.snapshot_download`` served from local "repositories", with the hub's own
    pattern filter; records every file fetched. Nothing else of the loading path is replaced."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repos: dict[str, Path] = {}
    fetched: list[str] = []

    def snapshot_download(repo_id: str, allow_patterns=None, ignore_patterns=None, **_: Any) -> str:
        repo, snapshot = repos[repo_id], tmp_path / "cache" / repo_id.replace("/", "--")
        files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            if not (snapshot / name).exists():
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repo / name, snapshot / name)
                fetched.append(f"{repo_id}:{name}")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, fetched


@torch.no_grad()
def test_hub_loads_fetch_only_the_shards_and_components_they_use(tiny_env, tmp_path: Path, fake_hub) -> None:
    import json

    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5ForConditionalGeneration

    from thinkdiff.models.clip_vision import CLIPVisionFeatures
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.pipelines.decoders import FluxDecoder

    repos, fetched = fake_hub
    # A sharded T5 (shards in state-dict order: the encoder blocks fill the first ones).
    t5_dir = resolve_model_dir("tiny:t5")
    T5ForConditionalGeneration.from_pretrained(t5_dir).save_pretrained(tmp_path / "t5-repo", max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        if (t5_dir / name).is_file():
            (tmp_path / "t5-repo" / name).write_bytes((t5_dir / name).read_bytes())
    repos["org/t5"] = tmp_path / "t5-repo"
    weight_map = json.loads((tmp_path / "t5-repo" / "model.safetensors.index.json").read_text())["weight_map"]
    encoder_only = {s for s in weight_map.values()} - {s for k, s in weight_map.items() if not k.startswith("encoder.block.")}
    assert encoder_only, "the test needs a shard of encoder blocks only"

    proxy = ProxyT5Decoder.from_pretrained("org/t5", device="cpu")
    got = {f.split(":")[1] for f in fetched if f.startswith("org/t5:")}
    assert not got & encoder_only and got & set(weight_map.values())
    local = ProxyT5Decoder.from_pretrained(t5_dir, device="cpu")
    for name, tensor in local.state_dict().items():
        torch.testing.assert_close(proxy.state_dict()[name], tensor, rtol=0, atol=0)

    # A whole BLIP-2 (vision tower + Q-Former + T5 language model): only the vision shards come.
    vision = json.loads((resolve_model_dir("tiny:blip2-vision") / "config.json").read_text())
    text = json.loads((t5_dir / "config.json").read_text())
    config = Blip2Config(vision_config=vision, text_config=text,
                         qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 64, "encoder_hidden_size": vision["hidden_size"]})  # fmt: skip
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(config)
    blip2.save_pretrained(tmp_path / "blip2-repo", max_shard_size="60KB")
    repos["org/blip2"] = tmp_path / "blip2-repo"
    weight_map = json.loads((tmp_path / "blip2-repo" / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {s for k, s in weight_map.items() if k.startswith("vision_model.")}
    assert vision_shards != set(weight_map.values())
    tower = CLIPVisionFeatures.from_pretrained("org/blip2", device="cpu", dtype=torch.float32)
    got = {f.split(":")[1] for f in fetched if f.startswith("org/blip2:") and f.endswith(".safetensors")}
    assert got == vision_shards
    for name, tensor in blip2.vision_model.state_dict().items():
        torch.testing.assert_close(tower.vision.state_dict()[name], tensor, rtol=0, atol=0)

    # FLUX: the denoise stage fetches the transformer and VAE, not the root single-file copies.
    flux_repo = tmp_path / "flux-repo"
    import shutil

    shutil.copytree(resolve_model_dir("tiny:flux"), flux_repo)
    (flux_repo / "flux1-dev.safetensors").write_bytes(b"a single-file copy of the transformer")
    (flux_repo / "ae.safetensors").write_bytes(b"a single-file copy of the VAE")
    repos["org/flux"] = flux_repo
    spec = DecoderSpec.inspect("org/flux")
    pipe = FluxDecoder(spec, torch.device("cpu"), torch.float32).load(["transformer", "vae"])
    assert pipe.transformer is not None and pipe.text_encoder_2 is None
    got = {f.split(":")[1] for f in fetched if f.startswith("org/flux:")}
    assert not {"flux1-dev.safetensors", "ae.safetensors"} & got
    # (DecoderSpec.inspect read the components' configs; nothing else of the text encoders.)
    assert not any(f.startswith(("text_encoder", "tokenizer")) and not f.endswith(".json") for f in got)
    assert any(f.startswith("transformer/") and f.endswith(".safetensors") for f in got)


@pytest.mark.parametrize("listing_cached", [False, True])
def test_cached_hub_id_resolves_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listing_cached: bool) -> None:
    """A whole-repo hub id (an LVLM by name) already in the cache loads with HF_HUB_OFFLINE=1.

    The listing of the repo's files (to leave its .bin weights out beside safetensors) cannot come
    from the hub then; the one the download cached gives the same patterns, which the hub client
    checks the cached snapshot against (a .bin it lists but that was never fetched is fine).
    """
    from huggingface_hub import constants
    from huggingface_hub._tree_cache import TreeCacheEntry, read_tree_cache, write_tree_cache

    from thinkdiff.models.loading import resolve_model_dir

    commit, repo = "a" * 40, tmp_path / "models--org--lvlm"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    if listing_cached:
        listed = ["config.json", "model.safetensors", "pytorch_model.bin"]  # the .bin was never fetched
        write_tree_cache(str(repo), commit, {name: TreeCacheEntry(size=7, blob_id="b" * 40) for name in listed})
        assert read_tree_cache(str(repo), commit) is not None
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("org/lvlm", kind="LVLM") == snapshot
    with pytest.raises(FileNotFoundError, match="could not find LVLM 'org/absent' locally or on the hub"):
        resolve_model_dir("org/absent", kind="LVLM")


# ---- F6 / F7: bench_training's GPU step is the project's own, in bf16 ---------------------------


def test_bench_training_gpu_step_runs_the_projects_code_in_bf16() -> None:
    """The GPU function on the CPU (1/64 width, 2 decoder layers), in a process of its own:
    accelerate keeps one state per process."""
    import json
    import subprocess
    import sys

    code = "import json, bench_training as b; print(json.dumps(b.gpu_run(2, True, 'cpu', 64, 2, 1)))"
    bench = Path(__file__).parents[1] / "benchmarks"
    done = subprocess.run([sys.executable, "-c", code], cwd=bench, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["device"] == "cpu" and row["loss_dtype_fp32"] is True
    # A random untied head at std d_model^-0.5 starts near ln(vocab) = 10.4, not at ~3000.
    assert 9 < row["loss_first"] < 12 and row["samples_per_s"] > 0


# ---- F16: the benchmark's offload branch runs in the smoke run ----------------------------------


@torch.no_grad()
def test_bench_inference_offload_branch_runs_on_the_cpu(tiny_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The random FLUX of ``bench_inference gpu`` with model offload: built on the device, moved to
    the CPU, diffusers' hooks installed (the CPU as execution device), same image as without."""
    import sys

    import numpy as np

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    bench = __import__("bench_inference")
    modules = bench.flux_dev_modules(1, narrow=True)
    prompt_width = modules["transformer"][1].get("joint_attention_dim", bench.T5_XXL["d_model"])
    pooled_width = modules["text_encoder"][1].hidden_size
    spec = DecoderSpec("random:FLUX.1-dev", "flux", "FluxPipeline", prompt_width, pooled_width, None, True)
    decoder_cls = bench.random_flux_decoder_class()
    decoder_cls.depth, decoder_cls.narrow = 1, True
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 8, prompt_width, generator=generator),
              "pooled_prompt_embeds": torch.randn(1, pooled_width, generator=generator)}  # fmt: skip
    images = {}
    for offload in ("none", "model"):
        torch.manual_seed(0)  # the same random weights for both
        decoder = decoder_cls(spec, cpu, torch.float32, offload)
        pipe = decoder.load(list(decoder.denoise_components))
        hooked = getattr(pipe.transformer, "_hf_hook", None) is not None
        assert hooked == (offload == "model")
        settings = {"height": 32, "width": 32, "num_inference_steps": 1, "guidance_scale": 3.5}
        images[offload] = np.asarray(decoder.generate(pipe, embeds, [torch.Generator().manual_seed(1)], settings)[0])
    np.testing.assert_array_equal(images["none"], images["model"])
    with pytest.raises(ValueError, match="sequential offload needs a GPU"):
        decoder_cls(spec, cpu, torch.float32, "sequential")
    sys.modules.pop("bench_inference", None)


# ---- F4: bench_features' vLLM model has a head size vLLM's kernels take -------------------------


@torch.no_grad()
def test_bench_features_vllm_model_and_its_failure_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    from thinkdiff.data.extraction import ExtractionSettings
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    bench = __import__("bench_features")
    folder = bench.save_vllm_sized_qwen(tmp_path / "qwen")
    extractor = LVLMFeatureExtractor.from_pretrained(folder, device="cpu")
    text, vision = extractor.model.config.text_config, extractor.model.config.vision_config
    assert text.hidden_size // text.num_attention_heads == bench.VLLM_HEAD_SIZE
    assert vision.embed_dim // vision.num_heads == bench.VLLM_HEAD_SIZE
    out = extractor.generate([[image((200, 30, 30)), "Describe the image."]], SamplingSettings(max_new_tokens=4, seed=0))
    assert out.features.shape[-1] == 2 * bench.VLLM_HEAD_SIZE

    if importlib.util.find_spec("vllm") is None:  # the engine fails: reported, not raised
        results: dict[str, Any] = {}
        bench.bench_vllm(tmp_path, ExtractionSettings(max_new_tokens=4), results)
        assert results["extract_vllm_error"].startswith("ValueError: the vllm engine needs vLLM")
        assert "extract_vllm" not in results
    sys.modules.pop("bench_features", None)
