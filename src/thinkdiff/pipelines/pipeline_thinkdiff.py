"""ThinkDiff inference: interleaved images and text -> prompt embeddings -> a stock diffusion decoder.

The pattern is diffusers' ``FluxPriorReduxPipeline``: this pipeline computes ``prompt_embeds``
(+ a mask) and FLUX's ``pooled_prompt_embeds`` and hands them to an unmodified ``FluxPipeline``,
``ChromaPipeline``, ``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``CogVideoXPipeline`` or
``LTXPipeline`` (see :mod:`thinkdiff.pipelines.decoders` and docs/decoders.md). Three modes:

- ``lvlm`` (ThinkDiff-LVLM, paper 3.3): the LVLM reads the instruction and the interleaved items and
  generates exactly ``num_tokens`` tokens (EOS suppressed; or up to its EOS with
  ``stop_at_eos``); the final-norm states of those tokens go through the aligner and become the
  prompt embeddings. FLUX's pooled vector is its CLIP text encoder applied to ``""``. Extra text,
  if any, is encoded by the decoder's T5 and appended.
- ``clip`` (ThinkDiff-CLIP, paper 3.4): each image gives 65 aligned EVA-CLIP tokens, in order,
  followed by the decoder's own T5 embeddings of the text; the pooled vector is CLIP of the text.
- ``text-bridge`` (the baseline): the LVLM writes a prompt (same instruction, inputs and seed as
  ``lvlm``) and the decoder's own text encoders encode it.

With FLUX's true classifier-free guidance (``true_cfg_scale > 1``) the negative prompt is the
decoder's own T5 encoding of ``""`` padded to the prompt's length (how a FLUX trained with caption
dropout saw "no caption") and the negative pooled vector CLIP of ``""``.

Execution is staged so that peak memory is the largest stage, not the sum: (1) the LVLM or vision
tower + aligner, (2) the decoder's text encoders, (3) the decoder's transformer + VAE. Each stage's
models are released before the next loads unless ``keep_loaded=True`` (faster repeated calls when
everything fits).

This module holds the pipeline and its stages; beside it: :mod:`~thinkdiff.pipelines.settings`
(how the conditioning is computed), :mod:`~thinkdiff.pipelines.prompt_assembly` (what stage 2
encodes and how each prompt is put together), :mod:`~thinkdiff.pipelines.results` (what it returns)
and :mod:`~thinkdiff.pipelines.seeded` (``items, seed -> image`` for evaluation harnesses).

Shapes: B requests, N LVLM tokens, H LVLM / vision width, L prompt tokens, S T5 text tokens,
D prompt width (the decoder's T5 d_model), P pooled width.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from thinkdiff.limits import (
    check_finite,
    check_pipeline_bounds,
    check_request_numbers,
    denoising_steps_bound,
    frames_bound,
)
from thinkdiff.models.loading import default_dtype, resolve_model_dir
from thinkdiff.models.quantization import Quantize
from thinkdiff.pipelines.constants import (
    DEFAULT_DECODER,
    DEFAULT_LVLM,
    HINT_INSTRUCTION,
    MODES,
    Offload,
    hinted,
)
from thinkdiff.pipelines.decoders import (
    DecoderSpec,
    DiffusionDecoder,
    FluxDecoder,
    TextEncoding,
    call_defaults,
    load_decoder,
    release,
)
from thinkdiff.pipelines.prompt_assembly import assemble_embeddings, negative_lengths, text_jobs
from thinkdiff.pipelines.requests import Item, PreparedRequest, Request, prepare_requests
from thinkdiff.pipelines.results import ThinkDiffEmbeddings, ThinkDiffOutput
from thinkdiff.pipelines.settings import InferenceSettings

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import ThinkDiffInfo

__all__ = [
    "DEFAULT_LVLM",
    "InferenceSettings",
    "ThinkDiffEmbeddings",
    "ThinkDiffOutput",
    "ThinkDiffPipeline",
]

logger = logging.getLogger(__name__)

_SETTING_NAMES = ("height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale", "num_frames")


class ThinkDiffPipeline:
    """Interleaved images + text -> prompt embeddings for a stock decoder pipeline (FLUX.1, Chroma,
    PixArt-Sigma, SD3 / 3.5, CogVideoX, LTX-Video).

    Build it with :meth:`from_pretrained`. :meth:`encode` returns the embeddings only;
    calling the pipeline also runs the decoder and returns images or video frames.

    Args:
        mode: ``"lvlm"``, ``"clip"`` or ``"text-bridge"``.
        decoder: the decoder (see :class:`DecoderSpec`).
        aligner, info: the trained model (required for lvlm and clip).
        source_model: the LVLM (lvlm, text-bridge) or BLIP-2 vision model (clip).
        device: where the models run (default: CUDA when available).
        dtype: of the frozen models (default: bf16 on GPU, fp32 on CPU); the aligner stays fp32.
        offload: decoder offload mode (``none``, ``model``, ``sequential``, ``group``); needs a GPU.
        keep_loaded: keep every stage's models between calls instead of releasing them.
        settings: see :class:`InferenceSettings`.
        quantize: ``none``, ``nf4``, ``int8`` or ``fp8`` for the LVLM and the decoder's transformer
            (:mod:`thinkdiff.models.quantization`); refused in one line where it cannot run.
        transformer_file: a GGUF file of the decoder's transformer, loaded in place of its weights.
    """

    def __init__(
        self,
        mode: str,
        decoder: DecoderSpec,
        *,
        aligner: Aligner | None = None,
        info: ThinkDiffInfo | None = None,
        source_model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: Offload = "none",
        keep_loaded: bool = False,
        settings: InferenceSettings | None = None,
        model_path: str | Path | None = None,
        quantize: Quantize = "none",
        transformer_file: str | Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode in ("lvlm", "clip"):
            if aligner is None or info is None:
                raise ValueError(f"mode {mode} needs a trained ThinkDiff model folder (--model)")
            if info.variant != mode:
                where = f"model folder {model_path}" if model_path is not None else "the model"
                raise ValueError(
                    f"{where} is a ThinkDiff-{info.variant.upper()} model; mode {mode} needs a {mode} model "
                    f"(use mode {info.variant})"
                )
            if aligner.out_dim != decoder.prompt_width:
                raise ValueError(
                    f"the aligner writes {aligner.out_dim}-wide prompt embeddings but decoder {decoder.name} "
                    f"takes {decoder.prompt_width}-wide ones: the model was trained for another decoder "
                    f"({info.diffusion_decoder})"
                )
        self.mode = mode
        self.decoder_spec = decoder
        self.aligner = aligner
        self.info = info
        self.model_path = None if model_path is None else str(model_path)
        self.source_model = source_model or _default_source(mode, info)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.settings = settings or InferenceSettings()
        self.settings_sources: dict[str, str] | None = None
        """Where each of :attr:`settings` came from (library, model folder, given), when known."""
        self.keep_loaded = keep_loaded
        self.quantize = quantize
        self.decoder: DiffusionDecoder = load_decoder(
            decoder, self.device, self.dtype, offload, quantize, transformer_file
        )
        if keep_loaded and offload != "none":
            # Stage 1 always loads its LVLM or vision tower whole onto the device; kept, it would
            # sit beside the decoder that the offload is there to fit (Qwen2-VL-7B's 16.6 GB under
            # FLUX's 23.8 GB transformer on a 24 GB card).
            raise ValueError(
                f"keep_loaded keeps stage 1's model on the device, which --offload {offload} is meant to "
                "avoid: use one or the other"
            )
        if self.aligner is not None:
            # fp32 like the released code: the aligner is small and its norm needs the precision.
            # It sits on the CPU between calls and joins stage 1 on the device.
            self.aligner = self.aligner.float().eval().requires_grad_(False)
        self._loaded: dict[str, Any] = {}
        self._decoder_components: set[str] = set()  # what the kept decoder pipeline holds
        self._empty: dict[str, torch.Tensor] | None = None  # decoder conditioning for "" (constant)
        self._negatives: dict[int, torch.Tensor] = {}  # FLUX true CFG: T5("") [L, D] per length L

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        decoder: str | Path | None = None,
        mode: str | None = None,
        lvlm: str | Path | None = None,
        vision: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: Offload = "none",
        keep_loaded: bool = False,
        settings: InferenceSettings | None = None,
        quantize: Quantize = "none",
        transformer_file: str | Path | None = None,
    ) -> ThinkDiffPipeline:
        """Read a model folder and the decoder's configs; load only the aligner (small).

        ``mode`` defaults to the folder's variant (``text-bridge`` without a folder); ``decoder``
        to the decoder the model was trained for (FLUX.1-dev without a folder); ``lvlm`` /
        ``vision`` to the folder's source model (``Qwen/Qwen2-VL-7B-Instruct`` for text-bridge
        without a folder). The folder's recorded models are found as
        :func:`~thinkdiff.models.bundle.recorded_model` says. Every mismatch is a ``ValueError``
        raised here, before heavy loads.
        """
        from thinkdiff.models.bundle import load_model, recorded_model

        aligner = info = None
        if model is not None:
            aligner, info = load_model(model)
        mode = mode or (info.variant if info is not None else "text-bridge")
        sources = None
        if settings is None:  # the model folder says how it is meant to be run (thinkdiff.json)
            from thinkdiff.pipelines.inference_defaults import resolve_settings

            settings, sources = resolve_settings(InferenceSettings(), info)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "clip" and lvlm is not None:
            raise ValueError("mode clip uses no LVLM: --lvlm applies to lvlm and text-bridge (use --vision)")
        if mode != "clip" and vision is not None:
            raise ValueError(f"mode {mode} uses no vision tower: --vision applies to clip mode")
        source = lvlm if mode != "clip" else vision
        if model is not None and info is not None:  # the models the folder records, found from here
            if decoder is None:
                decoder = recorded_model(model, info, "diffusion_decoder")
            if source is None and info.variant == ("clip" if mode == "clip" else "lvlm"):
                # The folder's own source model; in text-bridge mode, the LVLM the aligner was
                # trained on (to compare the bridge with). A variant mismatch is refused by __init__.
                source = recorded_model(model, info, "source_model")
        spec = DecoderSpec.inspect(decoder or DEFAULT_DECODER)
        pipe = cls(
            mode,
            spec,
            aligner=aligner if mode != "text-bridge" else None,
            info=info if mode != "text-bridge" else None,
            source_model=None if source is None else str(source),
            device=device,
            dtype=dtype,
            offload=offload,
            keep_loaded=keep_loaded,
            settings=settings,
            model_path=model,
            quantize=quantize,
            transformer_file=transformer_file,
        )
        pipe._check_source_width()
        pipe.settings_sources = sources
        return pipe

    def _check_source_width(self) -> None:
        """The LVLM / vision width must equal the aligner input (read from its config only)."""
        if self.aligner is None:
            return
        folder = resolve_model_dir(self.source_model, kind="source model", files=["config.json"])
        config = json.loads((folder / "config.json").read_text())
        if self.mode == "clip":
            width = config.get("vision_config", config).get("hidden_size")
        else:
            width = config.get("text_config", config).get("hidden_size")
        if width is not None and width != self.aligner.in_dim:
            raise ValueError(
                f"{self.source_model} gives {width}-wide features but the aligner reads {self.aligner.in_dim}-wide "
                "ones: pass the model the aligner was trained on"
            )

    @property
    def components(self) -> dict[str, Any]:
        """The ids of everything this pipeline uses (for output metadata)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "model": self.model_path,
            "lvlm" if self.mode != "clip" else "vision": self.source_model,
            "decoder": self.decoder_spec.name,
            "decoder_class": self.decoder_spec.pipeline_class,
        }
        if self.info is not None:
            out["aligner"] = {
                "variant": self.info.variant,
                "in_dim": self.info.in_dim,
                "out_dim": self.info.out_dim,
                "proxy_t5": self.info.proxy_t5,
                "trained_for": self.info.diffusion_decoder,
            }
        return out

    # ---- checks ------------------------------------------------------------------------------

    def check(self, requests: Request | Sequence[Request], *, flags: bool = False) -> list[PreparedRequest]:
        """Load the images and check every request against this pipeline; no model loads.

        Raises ``FileNotFoundError`` / ``ValueError`` naming the bad request. The numbers are
        bounded first, by :mod:`thinkdiff.limits`: steps within the decoder's schedule,
        ``num_tokens`` within the LVLM's context, ``text_max_length`` within the decoder's T5
        length, finite floats and 64-bit seeds. ``flags``: name the bounded settings as the command
        line spells them, each request by its ``metadata["where"]`` (its job line), not its index.
        """
        requests = [requests] if isinstance(requests, Request) else list(requests)
        wheres = [r.metadata.get("where", "") if flags else f"request {i}" for i, r in enumerate(requests)]
        check_pipeline_bounds(
            self,
            [(r.num_inference_steps, where) for r, where in zip(requests, wheres)],
            frames=[(r.num_frames, where) for r, where in zip(requests, wheres)],
            flags=flags,
        )
        for index, request in enumerate(requests):
            check_request_numbers(request, f"request {index}")
        prepared = prepare_requests(requests, self.settings.max_images)
        # CogVideoX's fixed length or the masked decoders' and SD3's limit, text included.
        required = self.decoder_spec.required_length or self.decoder_spec.max_length
        if self.mode == "clip" and required is not None and self.aligner is not None:
            per_image = self._clip_tokens_per_image()
            for index, p in enumerate(prepared):
                if len(p.images) * per_image >= required:
                    raise ValueError(
                        f"request {index}: {len(p.images)} images give {len(p.images) * per_image} image tokens, "
                        f"more than decoder {self.decoder_spec.name} takes ({required}, text included)"
                    )
        if self.decoder_spec.family == "flux":
            self._warn_long_flux_prompts(prepared)
        for index, p in enumerate(prepared):
            request = p.request
            for name in ("height", "width", "num_inference_steps", "num_frames"):
                value = getattr(request, name)
                if value is not None and value < 1:
                    raise ValueError(f"request {index}: {name} must be >= 1, got {value}")
            if request.num_frames is not None and self.decoder_spec.kind != "video":
                raise ValueError(f"request {index}: num_frames applies to video decoders only")
            if request.true_cfg_scale is not None and self.decoder_spec.family != "flux":
                raise ValueError(f"request {index}: true_cfg_scale applies to FLUX decoders only")
            if request.qcd_alpha is not None and request.qcd_alpha < 0:
                raise ValueError(f"request {index}: qcd_alpha must be >= 0, got {request.qcd_alpha}")
            if self.mode == "clip" and (request.qcd_alpha or request.hint):
                raise ValueError(f"request {index}: qcd_alpha and hint apply to the LVLM; mode clip uses none")
            if request.hint and self.settings.instruction is None:
                raise ValueError(f"request {index}: a hint is appended to the instruction, and there is none")
            self.decoder.check_size(request.height, request.width, f"request {index}")
        return prepared

    def _warn_long_flux_prompts(self, prepared: Sequence[PreparedRequest]) -> None:
        """Warn when a request's prompt can exceed the T5 length FLUX.1 was trained with.

        FLUX takes any length (its text positions are all zero), so nothing fails, but the
        transformer then conditions on more tokens than it ever saw (clip mode: 65 per image, 16
        images and the text give 1168) and its attention cost grows.
        """
        limit = FluxDecoder.max_t5_tokens
        s = self.settings
        per_image = self._clip_tokens_per_image() if self.mode == "clip" and self.aligner is not None else 0
        for index, p in enumerate(prepared):
            if self.mode == "clip":
                tokens, how = len(p.images) * per_image + s.text_max_length, f"{len(p.images)} images"
            elif self.mode == "lvlm" and (p.request.extra_text or "").strip():
                tokens, how = s.num_tokens + s.text_max_length, "LVLM tokens and extra text"
            elif self.mode == "lvlm":
                tokens, how = s.num_tokens, "LVLM tokens"
            else:
                continue  # text-bridge: the decoder's own T5 length
            if tokens > limit:
                logger.warning(
                    "request %d: up to %d prompt tokens (%s), more than the %d T5 tokens FLUX.1 was trained "
                    "with; expect lower quality and slower steps (fewer images, num_tokens or text_max_length)",
                    index,
                    tokens,
                    how,
                    limit,
                )

    def _clip_tokens_per_image(self) -> int:
        folder = resolve_model_dir(self.source_model, kind="BLIP-2 vision model", files=["config.json"])
        config = json.loads((folder / "config.json").read_text())
        vision = config.get("vision_config", config)
        grid = vision.get("image_size", 224) // vision.get("patch_size", 14)
        return 1 + (grid // 2) ** 2  # CLS + the patch grid halved (see models.clip_vision)

    # ---- stage plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _stage(self, name: str, timings: dict[str, float], memory: dict[str, int]) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated(self.device))
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    def _get(self, key: str, load: Any, timings: dict[str, float], memory: dict[str, int]) -> Any:
        """A cached component, loaded (and timed as ``load_<key>``) on first use."""
        if key not in self._loaded:
            with self._stage(f"load_{key}", timings, memory):
                self._loaded[key] = load()
        return self._loaded[key]

    def _drop(self, *keys: str) -> None:
        """Release stage models unless ``keep_loaded``; the next stage then has their memory."""
        if self.keep_loaded:
            return
        if "aligner" in keys:
            self._aligner_to(torch.device("cpu"))  # 0.12 GiB at real size: not kept on the GPU
        release(self._loaded, *(key for key in keys if key != "aligner"))

    def _aligner_to(self, device: torch.device) -> None:
        if self.aligner is not None and self.aligner.fc1.weight.device != device:
            self.aligner.to(device)

    def release(self) -> None:
        """Release every cached model (also those kept with ``keep_loaded``)."""
        release(self._loaded, *list(self._loaded))

    def _load_lvlm(self) -> Any:
        from thinkdiff.models.lvlm import LVLMFeatureExtractor
        from thinkdiff.models.quantization import transformers_quantization

        return LVLMFeatureExtractor.from_pretrained(
            resolve_model_dir(self.source_model, kind="LVLM"),
            device=self.device,
            dtype=self.dtype,
            max_images=self.settings.max_images,
            max_pixels=self.settings.max_pixels,
            quantization_config=transformers_quantization(self.quantize, self.dtype),
        )

    def _load_vision(self) -> Any:
        from thinkdiff.models.clip_vision import CLIPVisionFeatures

        return CLIPVisionFeatures.from_pretrained(self.source_model, dtype=self.dtype, device=self.device)

    def _decoder_pipe(
        self, stage: str, roles: Sequence[str], timings: dict, memory: dict
    ) -> DiffusionPipeline:
        """The stock pipeline for ``stage`` ('text' or 'denoise').

        Staged: only that stage's components. With ``keep_loaded``: one pipeline with every
        component the mode uses, shared by both stages (no weights held twice).
        """
        if self.keep_loaded:
            needed = {*self.decoder.components_for(roles), *self.decoder.denoise_components}
            if not needed <= self._decoder_components:
                # A later call needs an encoder the kept pipeline lacks (e.g. T5 for extra text):
                # reload once with the union rather than hold two copies of the transformer.
                self._decoder_components |= needed
                release(self._loaded, "decoder")
            components = sorted(self._decoder_components)
            return self._get("decoder", lambda: self.decoder.load(components), timings, memory)
        if stage == "text":
            return self._get(
                "text_encoders",
                lambda: self.decoder.load(self.decoder.components_for(roles)),
                timings,
                memory,
            )
        return self._get(
            "decoder", lambda: self.decoder.load(self.decoder.denoise_components), timings, memory
        )

    # ---- encoding ----------------------------------------------------------------------------

    def lvlm_conditioning(self, request: Request) -> dict[str, Any]:
        """How the LVLM reads one request: its instruction (with the hint, if any), the hint, and the
        QCD weight (the request's overrides over :attr:`settings`); what the sidecars record."""
        s = self.settings
        use_hint = s.hint is not None if request.hint is None else request.hint
        hint = (s.hint or HINT_INSTRUCTION) if use_hint else None
        if hint is not None and s.instruction is None:
            raise ValueError("a hint is appended to the instruction, and this pipeline has none")
        instruction = s.instruction if s.instruction is None else hinted(s.instruction, hint)
        alpha = s.qcd_alpha if request.qcd_alpha is None else request.qcd_alpha
        return {"instruction": instruction, "hint": hint, "qcd_alpha": alpha}

    def _lvlm_items(self, items: list[str | Image.Image], instruction: str | None) -> list[Item]:
        """``instruction`` (hinted or not) first: in place of the plain one when the items start with it."""
        if items and items[0] in (self.settings.instruction, instruction):
            items = items[1:]
        return list(items) if instruction is None else [instruction, *items]

    @torch.no_grad()
    def _run_lvlm(
        self, prepared: list[PreparedRequest], timings: dict, memory: dict
    ) -> tuple[list[torch.Tensor | None], list[str]]:
        """Stage 1 for lvlm / text-bridge: aligned tokens [N_i, D] per request (lvlm) and texts."""
        from thinkdiff.models.lvlm import SamplingSettings

        extractor = self._get("lvlm", self._load_lvlm, timings, memory)
        self._aligner_to(self.device)
        use_prompt = self.info is not None and self.info.features == "prompt"
        aligned: list[torch.Tensor | None] = [None] * len(prepared)
        texts: list[str] = [""] * len(prepared)
        s = self.settings
        decoding: dict[str, Any] = (
            {"do_sample": False} if s.greedy else {"temperature": s.temperature, "top_p": s.top_p}
        )
        # One generate call draws one RNG stream for its whole batch: when sampling, only requests
        # with the same seed may share a call, and a call is seeded with that seed. Greedy decoding
        # draws nothing, so every request may share a call (seed None). A call also has one
        # instruction and one QCD weight.
        groups: dict[tuple[int | None, str | None, float], list[int]] = {}
        for index, p in enumerate(prepared):
            lvlm = self.lvlm_conditioning(p.request)
            key = (None if s.greedy else p.request.seed, lvlm["instruction"], lvlm["qcd_alpha"])
            groups.setdefault(key, []).append(index)
        size = s.encoder_batch_size
        for (seed, instruction, qcd_alpha), indices in groups.items():
            if self.mode == "lvlm" and not s.stop_at_eos:
                sampling = SamplingSettings.exactly(s.num_tokens, seed=seed, qcd_alpha=qcd_alpha, **decoding)
            else:  # the LVLM writes its answer and stops at its end-of-sequence token
                sampling = SamplingSettings(max_new_tokens=s.num_tokens, seed=seed, qcd_alpha=qcd_alpha, **decoding)
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                prompts = [self._lvlm_items(prepared[i].items, instruction) for i in chunk]
                with self._stage("lvlm", timings, memory):
                    # generate keeps no hidden states: lvlm mode recomputes the features in one
                    # teacher-forced pass (as the extraction's default made the training features;
                    # generate's own would keep every layer's states of the whole prompt), and
                    # text-bridge mode needs the text only.
                    out = extractor.generate(
                        prompts,
                        sampling,
                        teacher_forced=True,
                        with_states=self.mode == "lvlm",
                        return_prompt_features=use_prompt,
                    )
                for row, i in enumerate(chunk):
                    texts[i] = out.texts[row]
                if self.mode != "lvlm":
                    continue
                features_BNH, mask_BN = (
                    (out.prompt_features, out.prompt_mask) if use_prompt else (out.features, out.feature_mask)
                )
                with self._stage("aligner", timings, memory):
                    tokens_BND = self.aligner(features_BNH.to(self.device)).to("cpu", self.dtype)
                for row, i in enumerate(chunk):
                    aligned[i] = tokens_BND[row, : int(mask_BN[row].sum())]
        # The last references to the LVLM and its GPU tensors go before the cache is emptied.
        extractor = out = features_BNH = None
        self._drop("lvlm", "aligner")
        return aligned, texts

    @torch.no_grad()
    def _run_vision(self, prepared: list[PreparedRequest], timings: dict, memory: dict) -> list[torch.Tensor]:
        """Stage 1 for clip: [65 * images_i, D] aligned image tokens per request, images in order."""
        from thinkdiff.data.image_caption import blip2_preprocess

        vision = self._get("vision", self._load_vision, timings, memory)
        self._aligner_to(self.device)
        images = [(i, image) for i, p in enumerate(prepared) for image in p.images]
        per_request: list[list[torch.Tensor]] = [[] for _ in prepared]
        size = self.settings.encoder_batch_size
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            pixels_B3HW = torch.stack([blip2_preprocess(image, size=vision.image_size) for _, image in chunk])
            with self._stage("vision", timings, memory):
                tokens_BTH = vision(pixels_B3HW)
            with self._stage("aligner", timings, memory):
                tokens_BTD = self.aligner(tokens_BTH.to(self.device)).to("cpu", self.dtype)
            for row, (i, _) in enumerate(chunk):
                per_request[i].append(tokens_BTD[row])
        vision = tokens_BTH = None  # the last references, before the cache is emptied
        self._drop("vision", "aligner")
        width = self.decoder_spec.prompt_width
        return [torch.cat(t) if t else torch.zeros(0, width, dtype=self.dtype) for t in per_request]

    @torch.no_grad()
    def _encode_texts(
        self,
        jobs: list[tuple[int, str, int]],
        roles: list[str],
        timings: dict,
        memory: dict,
        missing_negatives: Sequence[int] = (),
    ) -> dict[int, TextEncoding]:
        """Stage 2: the decoder's own text encoders. ``jobs`` are (request, text, T5 length);
        ``missing_negatives`` the lengths at which the guidance negative T5("") is needed and not
        yet cached. Returns one CPU row (no batch axis) per job's request."""
        need_empty = self._empty is None
        if need_empty and not self.decoder.empty_roles:
            self._empty, need_empty = {}, False  # nothing to encode for "" (Chroma, PixArt, LTX)
        results: dict[int, TextEncoding] = {}
        if not jobs and not need_empty and not missing_negatives:
            return results
        pipe = self._decoder_pipe("text", roles, timings, memory)
        with self._stage("text_encoders", timings, memory):
            if need_empty:
                self._empty = {
                    k: v.to("cpu", self.dtype) for k, v in self.decoder.empty_conditioning(pipe).items()
                }
            for length in missing_negatives:
                # T5 attends to its pad tokens, so "" at length L is not a prefix of "" at L + 1.
                self._negatives[length] = self._cpu_row(self.decoder.encode_text(pipe, [""], length), 0)
            # Texts padded to the same length batch without changing any row (T5 and CLIP both
            # pad to a fixed max_length as the decoder does itself).
            by_length: dict[int, list[tuple[int, str]]] = {}
            for index, text, length in jobs:
                by_length.setdefault(length, []).append((index, text))
            for length, group in by_length.items():
                for start in range(0, len(group), 16):
                    chunk = group[start : start + 16]
                    encoded = self.decoder.encode_text(pipe, [text for _, text in chunk], length)
                    for row, (index, _) in enumerate(chunk):
                        results[index] = self._cpu_row(encoded, row)
        pipe = encoded = None  # the last references, before the cache is emptied
        self._drop("text_encoders")
        return results

    def _cpu_row(self, encoded: TextEncoding, row: int) -> TextEncoding:
        """Row ``row`` of a batch encoding, on the CPU; masks keep their dtype."""

        def pick(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[row].to("cpu", dtype)

        return TextEncoding(
            embeds=pick(encoded.embeds, self.dtype),
            mask=pick(encoded.mask, None),
            pooled=pick(encoded.pooled, self.dtype),
            prefix=pick(encoded.prefix, self.dtype),
        )

    def encode(
        self, requests: Request | Sequence[Request], *, true_cfg_scale: float | None = None
    ) -> ThinkDiffEmbeddings:
        """Compute the decoder's prompt embeddings for a batch of requests (stages 1 and 2).

        Returns :class:`ThinkDiffEmbeddings`: ``prompt_embeds`` [B, L, D] with its mask,
        ``pooled_prompt_embeds`` [B, P] (FLUX), ``negative_prompt_embeds`` (CogVideoX; FLUX when a
        request's true CFG scale, resolved as in :meth:`__call__`, is above 1), and the LVLM's
        texts. ``embeddings.decoder_kwargs(i)`` feeds a stock pipeline directly.
        """
        prepared = self.check(requests)
        defaults = self._call_settings({"true_cfg_scale": true_cfg_scale})
        return self._encode(prepared, {}, {}, negatives=self._needs_negatives(prepared, defaults))

    def _encode(
        self,
        prepared: list[PreparedRequest],
        timings: dict[str, float],
        memory: dict[str, int],
        negatives: bool = False,
    ) -> ThinkDiffEmbeddings:
        spec, s = self.decoder_spec, self.settings

        # Stage 1: the LVLM or the vision tower, then the aligner.
        aligned: list[torch.Tensor | None] = [None] * len(prepared)
        lvlm_texts: list[str | None] = [None] * len(prepared)
        if self.mode in ("lvlm", "text-bridge"):
            aligned, generated = self._run_lvlm(prepared, timings, memory)
            lvlm_texts = list(generated)
        else:
            aligned = list(self._run_vision(prepared, timings, memory))

        # Stage 2: the decoder's own text encoders, then the prompt assembled.
        jobs = text_jobs(self.mode, prepared, aligned, lvlm_texts, spec, self.decoder, s)
        lengths = negative_lengths(jobs, aligned, spec, self.decoder) if negatives else []
        missing_negatives = sorted({length for length in lengths if length not in self._negatives})
        # lvlm mode without extra text or guidance needs no T5-XXL: FLUX and SD3 only CLIP (for
        # the pooled vector of ""), Chroma, PixArt-Sigma and LTX-Video nothing.
        roles = self.decoder.text_roles(needs_t5=bool(jobs or missing_negatives))
        text_out = self._encode_texts(jobs, roles, timings, memory, missing_negatives)
        assert self._empty is not None
        return assemble_embeddings(
            self.mode,
            aligned,
            text_out,
            lvlm_texts,
            lengths,
            empty=self._empty,
            negatives=self._negatives,
            spec=spec,
            decoder=self.decoder,
            dtype=self.dtype,
            device=self.device,
        )

    # ---- generation --------------------------------------------------------------------------

    def __call__(
        self,
        requests: Request | Sequence[Request],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        num_frames: int | None = None,
    ) -> ThinkDiffOutput:
        """Generate one image (image decoders) or video (CogVideoX, LTX-Video) per request.

        Settings left ``None`` here and in the request fall back to the decoder folder's
        descriptor, then to the stock pipeline's defaults (FLUX.1-dev: 1024 px, 28 steps, guidance
        3.5, no true CFG; schnell: 4 steps, no guidance; CogVideoX: its configured size and
        frames, 50 steps, guidance 6). ``true_cfg_scale`` > 1 turns on FLUX's true
        classifier-free guidance (a second transformer pass per step on the negative). The same
        request and seed always give the same result.
        """
        timings: dict[str, float] = {}
        memory: dict[str, int] = {}
        # 1. Check inputs: images opened, counts and settings checked, before any model loads.
        if num_frames is not None and self.decoder_spec.kind != "video":
            raise ValueError("num_frames applies to video decoders only")
        if true_cfg_scale is not None and self.decoder_spec.family != "flux":
            raise ValueError(
                "true_cfg_scale applies to FLUX decoders only (CogVideoX's guidance is already CFG)"
            )
        self.decoder.check_size(height, width, "call")
        denoising_steps_bound(self.decoder_spec.name).check("num_inference_steps", num_inference_steps, "call")
        if num_frames is not None:
            frames_bound(self.decoder_spec).check("num_frames", num_frames, "call")
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            check_finite(name, value, "call")
        prepared = self.check(requests)
        defaults = self._call_settings(
            {
                "height": height,
                "width": width,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "true_cfg_scale": true_cfg_scale,
                "num_frames": num_frames,
            }
        )

        # 2.-3. Conditioning (LVLM / vision tower + aligner), then the decoder's text encoders
        #       (with the true-CFG negative when a request needs it).
        negatives = self._needs_negatives(prepared, defaults)
        embeddings = self._encode(prepared, timings, memory, negatives=negatives)

        # 4. Denoise: requests with equal settings and prompt length share a stock pipeline call;
        #    one CPU generator per request makes its noise independent of batching and device.
        pipe = self._decoder_pipe("denoise", [], timings, memory)
        resolved = [self._resolve(pipe, p.request, defaults) for p in prepared]
        lengths = embeddings.prompt_attention_mask.sum(1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, settings in enumerate(resolved):
            groups.setdefault((tuple(sorted(settings.items())), lengths[i]), []).append(i)
        results: list[Any] = [None] * len(prepared)
        size = self.settings.decoder_batch_size
        for (_, length), indices in groups.items():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                batch = embeddings.rows(chunk, length)
                generators = [torch.Generator("cpu").manual_seed(prepared[i].request.seed) for i in chunk]
                with self._stage("decoder", timings, memory):
                    outputs = self.decoder.generate(pipe, batch, generators, resolved[chunk[0]])
                for i, output in zip(chunk, outputs):
                    results[i] = output
        pipe = None  # the last reference, before the cache is emptied
        self._drop("decoder")

        video = self.decoder_spec.kind == "video"
        return ThinkDiffOutput(
            images=[] if video else results,
            videos=results if video else [],
            embeddings=embeddings,
            settings=resolved,
            timings=timings,
            peak_memory=memory,
        )

    def _call_settings(self, call: Mapping[str, Any]) -> dict[str, Any]:
        """The call's settings over the decoder's defaults (``None`` in ``call``: not given)."""
        return {**self.decoder.default_settings(), **{k: v for k, v in call.items() if v is not None}}

    def _needs_negatives(self, prepared: Sequence[PreparedRequest], defaults: Mapping[str, Any]) -> bool:
        """Whether a request uses FLUX's true CFG (decided before any model loads)."""
        name = self.decoder.cfg_setting
        if name is None:
            return False
        return any(self._setting(p.request, name, defaults) > 1 for p in prepared)

    def _resolve(self, pipe: DiffusionPipeline, request: Request, defaults: dict[str, Any]) -> dict[str, Any]:
        """Concrete decoder settings for a request (see :meth:`_setting`)."""
        settings: dict[str, Any] = {}
        for name in _SETTING_NAMES:
            if name == "num_frames" and self.decoder_spec.kind != "video":
                continue
            if name == "true_cfg_scale" and self.decoder_spec.family != "flux":
                continue
            settings[name] = self._setting(request, name, defaults, pipe)
        return settings

    def _setting(
        self,
        request: Request,
        name: str,
        defaults: Mapping[str, Any],
        pipe: DiffusionPipeline | None = None,
    ) -> Any:
        """One decoder setting for a request: request > call > decoder default > stock default.

        ``defaults`` holds the call's settings over the decoder's (:meth:`_call_settings`). Only the
        stock height, width and frames need the loaded ``pipe``: they come from its configs.
        """
        for value in (getattr(request, name), defaults.get(name)):
            if value is not None:
                return value
        # Sizes the stock __call__ derives from its configs when given None (see its first lines).
        if name in self.decoder.sized_settings:
            assert pipe is not None, f"the stock {name} needs the loaded pipeline"
            return self.decoder.stock_setting(pipe, name)
        parameter = call_defaults(self.decoder.pipeline_cls).get(name)
        return None if parameter is None else parameter.default


def _default_source(mode: str, info: ThinkDiffInfo | None) -> str:
    if info is not None:
        return info.source_model
    if mode == "clip":
        raise ValueError("mode clip needs a trained ThinkDiff-CLIP model folder (--model)")
    return DEFAULT_LVLM
