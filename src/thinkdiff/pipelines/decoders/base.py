"""The interface every decoder family implements (:class:`DiffusionDecoder`) and what they share.

ThinkDiff never modifies a decoder. Like ``FluxPriorReduxPipeline``, it computes ``prompt_embeds``
(and FLUX's ``pooled_prompt_embeds``) itself and hands them to an unmodified stock pipeline. The
parts of a decoder it needs are loaded in stages, each with only the components it uses:

- the *text* stage: the decoder's own text encoders (FLUX: CLIP for the pooled vector, T5 for text
  tokens; SD3: CLIP-L/G for its CLIP block and pooled vector, T5; the others: T5), called through
  the pipeline's own ``encode_prompt`` so that text embeddings equal what the decoder computes for
  a plain prompt;
- the *denoise* stage: transformer + VAE, given the finished embeddings.

Two partial implementations are shared by several families: :class:`MaskedT5Decoder` (T5 states
with an attention mask: Chroma, PixArt-Sigma, LTX-Video) and :class:`UnpackedLatents` (calibration
latents as the VAE gives them: PixArt-Sigma, SD3).

Shapes: B batch, S text tokens, L prompt tokens, D prompt width (T5 d_model), P pooled width,
N packed image tokens, C packed channels.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from thinkdiff.models.loading import diffusers_files, resolve_model_dir
from thinkdiff.models.quantization import (
    Quantize,
    check_gguf_file,
    check_quantize,
    gguf_mismatch,
    gguf_quantization,
    offload_conflict,
    pipeline_quantization,
)
from thinkdiff.pipelines.constants import DECODER_DESCRIPTOR, OFFLOAD_MODES, Offload
from thinkdiff.pipelines.decoders.spec import CONFIG_FILES, DecoderSpec

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def release(loaded: MutableMapping[str, Any], *keys: str) -> None:
    """Take ``keys`` out of ``loaded``, drop their offload hooks, and free their memory.

    The models are popped here, so that nothing of them is left when the CUDA cache is emptied:
    with a reference still held, their memory would stay in PyTorch's cache (reserved, seen by
    nvidia-smi) during the next stage. ``loaded`` must hold the last references; the caller must
    drop its own (local variables included) before calling.
    """
    for key in keys:
        obj = loaded.pop(key, None)
        remove_hooks = getattr(obj, "remove_all_hooks", None)
        if callable(remove_hooks):
            remove_hooks()
        # The bound method holds the model too: both names go before the collection.
        del obj, remove_hooks
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=16)
def call_defaults(pipeline_cls: type) -> Mapping[str, inspect.Parameter]:
    """The stock ``__call__``'s parameters (their defaults are the stock settings)."""
    return inspect.signature(pipeline_cls.__call__).parameters


@dataclass
class TextEncoding:
    """B texts encoded by a decoder's own text encoders, as its ``encode_prompt`` returns them."""

    embeds: torch.Tensor
    """[B, S, D]: T5 states, padded to S as the decoder pads its prompts."""
    mask: torch.Tensor | None = None
    """[B, S]: the attention mask the decoder takes with them, in its own dtype (Chroma, PixArt,
    LTX-Video); ``None`` for decoders that attend to every token (FLUX, SD3, CogVideoX)."""
    pooled: torch.Tensor | None = None
    """[B, P]: the pooled CLIP vector (FLUX: CLIP-L; SD3: CLIP-L and CLIP-G side by side)."""
    prefix: torch.Tensor | None = None
    """[B, K, D]: SD3's CLIP-L/G block (77 tokens, zero-padded to D) that goes before the T5 tokens."""

    def attended(self) -> torch.Tensor:
        """``mask`` as bool (True: attended), every token where the decoder takes no mask; same
        leading shape as ``embeds`` (a batch or one row)."""
        return torch.ones(self.embeds.shape[:-1], dtype=torch.bool) if self.mask is None else self.mask.bool()


class DiffusionDecoder:
    """Stage-wise loading and calling of one stock decoder pipeline.

    Subclasses say which components each stage needs, how text is encoded with the pipeline's own
    encoders, and which keyword arguments carry the embeddings into the stock ``__call__``.
    """

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Encoder role ('pooled' or 'clip', 't5') -> the pipeline components it needs."""
    empty_roles: ClassVar[tuple[str, ...]] = ()
    """Encoder roles :meth:`empty_conditioning` needs (none: it loads nothing)."""
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    """The stock ``__call__`` arguments that carry a prompt; each has a ``negative_`` twin."""
    cfg_setting: ClassVar[str | None] = None
    """The setting that turns on guidance by a negative prompt when above 1 (FLUX's
    ``true_cfg_scale``; ``guidance_scale`` for Chroma, PixArt-Sigma, SD3 and LTX-Video); the
    negative is then the decoder's T5 of ``""`` at the prompt's length. ``None``: CogVideoX, whose
    fixed-length negative is part of :meth:`empty_conditioning`."""
    sized_settings: ClassVar[tuple[str, ...]] = ("height", "width")
    """Settings whose stock default the loaded pipeline derives from its configs (:meth:`stock_setting`)."""

    def __init__(
        self,
        spec: DecoderSpec,
        device: torch.device,
        dtype: torch.dtype,
        offload: Offload = "none",
        quantize: Quantize = "none",
        transformer_file: str | Path | None = None,
    ) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        conflict = offload_conflict(quantize, offload, gguf=transformer_file is not None)
        if conflict is not None:  # before the device checks: no device makes it run
            raise ValueError(conflict)
        if offload != "none" and device.type == "cpu":
            raise ValueError(
                f"--offload {offload} moves weights between CPU and a GPU; it needs a GPU device"
            )
        check_quantize(quantize, device)
        if transformer_file is not None:
            transformer_file = Path(transformer_file)
            if transformer_file.suffix != ".gguf":
                raise ValueError(f"--transformer-file {transformer_file}: expected a .gguf file")
            if not transformer_file.is_file():
                raise FileNotFoundError(f"--transformer-file {transformer_file}: no such file")
            check_gguf_file(transformer_file)  # its header and tables, before diffusers reads it
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.quantize = quantize
        """The quantization of the transformer and the T5 encoder (:mod:`thinkdiff.models.quantization`)."""
        self.transformer_file = transformer_file
        """A GGUF transformer file loaded in place of the folder's transformer weights (``quantize``
        then applies to the T5 encoder only)."""

    # ---- loading -------------------------------------------------------------------------------

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        raise NotImplementedError

    @property
    def denoise_components(self) -> tuple[str, ...]:
        """Components of the denoise stage."""
        return ("transformer", "vae")

    @property
    def absent_components(self) -> tuple[str, ...]:
        """Components the folder does not have (``None`` in ``model_index.json``); always passed as ``None``."""
        return ()

    @property
    def all_components(self) -> tuple[str, ...]:
        roles = [c for parts in self.text_encoder_components.values() for c in parts]
        return (*dict.fromkeys(roles), *self.denoise_components)

    def load(self, components: Sequence[str]) -> DiffusionPipeline:
        """Load the stock pipeline with only ``components`` (plus its scheduler), placed per ``offload``."""
        pipe = self.build(components)
        pipe.set_progress_bar_config(disable=True)
        self.place(pipe)
        return pipe

    def build(self, components: Sequence[str]) -> DiffusionPipeline:
        """The stock pipeline with only ``components`` loaded (on the CPU), in ``dtype``."""
        skipped = {name: None for name in self.all_components if name not in components}
        skipped.update(dict.fromkeys(self.absent_components))
        # From the hub, only the loaded components' subfolders (not FLUX.1-dev's root copies).
        files = diffusers_files(self._config_folder, skipped=skipped, extra=[DECODER_DESCRIPTOR])
        folder = resolve_model_dir(self.spec.name, kind="diffusion decoder", files=files)
        kwargs: dict[str, Any] = {_dtype_kwarg(): self.dtype}
        kwargs.update(self._quantization_kwargs(folder, components))
        return self.pipeline_cls.from_pretrained(folder, **kwargs, **skipped)

    def _quantization_kwargs(self, folder: Path, components: Sequence[str]) -> dict[str, Any]:
        """``from_pretrained`` arguments that quantize the loaded transformer and T5 encoder: a
        ``PipelineQuantizationConfig`` (``--quantize``) and, with a GGUF file, the transformer itself
        loaded from it (the file is quantized already); none otherwise."""
        kwargs: dict[str, Any] = {}
        transformer = "transformer" in components
        if transformer and self.transformer_file is not None:
            import diffusers

            name = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
            model_cls = getattr(diffusers, name)
            try:
                kwargs["transformer"] = model_cls.from_single_file(
                    str(self.transformer_file),
                    config=str(folder),
                    subfolder="transformer",
                    quantization_config=gguf_quantization(self.dtype),
                    **{_dtype_kwarg(): self.dtype},
                )
            except (IndexError, KeyError, ValueError, RuntimeError) as exc:
                # A whole GGUF (checked before loading) that diffusers cannot map: another model's.
                raise ValueError(self._gguf_mismatch(model_cls, folder)) from exc
        t5 = [c for c in self.text_encoder_components.get("t5", ())[:1] if c in components]
        config = pipeline_quantization(
            self.quantize,
            self.dtype,
            diffusers_components=("transformer",) if transformer and self.transformer_file is None else (),
            transformers_components=tuple(t5),
        )
        if config is not None:
            kwargs["quantization_config"] = config
        return kwargs

    def _gguf_mismatch(self, model_cls: type, folder: Path) -> str:
        """How :attr:`transformer_file` differs from the transformer the folder's config builds
        (built without weights, on the meta device)."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = model_cls.from_config(model_cls.load_config(folder, subfolder="transformer"))
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        return gguf_mismatch(self.transformer_file, expected, f"decoder {self.spec.name}'s transformer ({model_cls.__name__})")

    def place(self, pipe: DiffusionPipeline) -> None:
        """Put the pipeline on the device, or install diffusers' offload hooks."""
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif self.offload == "group":
            # Blocks stream to the GPU as they run, the next one copied while one computes: the
            # offload diffusers recommends for video transformers.
            pipe.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
        else:
            pipe.to(self.device)

    def components_for(self, roles: Sequence[str]) -> list[str]:
        """Pipeline components needed to encode text in the given roles ('pooled', 'clip', 't5')."""
        return list(dict.fromkeys(c for role in roles for c in self.text_encoder_components[role]))

    def text_roles(self, needs_t5: bool) -> list[str]:
        """Encoder roles a call loads: those of :meth:`empty_conditioning`, and T5 when text is encoded."""
        return list(dict.fromkeys([*self.empty_roles, *(["t5"] if needs_t5 else [])]))

    # ---- settings ------------------------------------------------------------------------------

    def default_settings(self) -> dict[str, Any]:
        """Decoder settings that differ from the stock ``__call__`` defaults for this checkpoint."""
        return {}

    def stock_setting(self, pipe: DiffusionPipeline, name: str) -> Any:
        """The stock default of a :attr:`sized_settings` entry, as the stock ``__call__`` derives it."""
        # FluxPipeline, ChromaPipeline and StableDiffusion3Pipeline: the first lines of __call__.
        return pipe.default_sample_size * pipe.vae_scale_factor

    max_side: ClassVar[int] = 4096
    """The largest height or width :meth:`check_size` takes: 4x the 1024 px most of these decoders
    were trained at. The stock pipelines set none; past it a typo (``--width 100000``) would run
    out of memory only after minutes of loading."""

    def size_step(self) -> tuple[int, str]:
        """The multiple every height and width must be, and why (the stock pipeline fails, or makes
        another size, otherwise); ``(1, "")``: any size."""
        return 1, ""

    def largest_side(self) -> tuple[int, str]:
        """The largest height or width the decoder makes, and why."""
        return self.max_side, "a sanity bound, 4x the 1024 px these decoders were trained at"

    def check_size(
        self, height: int | None, width: int | None, where: str, names: tuple[str, str] = ("height", "width")
    ) -> None:
        """Raise ``ValueError`` for an image size the decoder cannot make: below or not a multiple of
        :meth:`size_step`, or above :meth:`largest_side`. ``where`` names the input (may be empty),
        ``names`` the two sizes as the user wrote them (``--height``, ``--width``)."""
        step, why = self.size_step()
        largest, limit = self.largest_side()
        prefix, reason = f"{where}: " if where else "", f" ({why})" if why else ""
        for name, value in zip(names, (height, width), strict=True):
            if value is None:
                continue
            if value < step:
                raise ValueError(
                    f"{prefix}{name} {value} is below {step}, the smallest size decoder {self.spec.name} makes{reason}"
                )
            if value % step:
                raise ValueError(f"{prefix}{name} {value} is not a multiple of {step} (decoder {self.spec.name}: {why})")
            if value > largest:
                raise ValueError(
                    f"{prefix}{name} {value} is above {largest}, the largest size decoder {self.spec.name} makes ({limit})"
                )

    @functools.cached_property
    def _config_folder(self) -> Path:
        """The decoder's folder with its configs (from the hub: the config files only), resolved once."""
        return resolve_model_dir(self.spec.name, kind="diffusion decoder", files=CONFIG_FILES)

    def _component_config(self, component: str) -> dict[str, Any]:
        """``<component>/config.json`` of the decoder folder; ``{}`` where there is none."""
        path = self._config_folder / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _vae_step(self, patch: int, then: str) -> tuple[int, str]:
        """:meth:`size_step` of a latent decoder: the VAE's downscaling (as the stock pipelines
        compute it, 8 without a VAE config) times the transformer's ``patch`` x ``patch`` tokens."""
        blocks = self._component_config("vae").get("block_out_channels")
        scale = 2 ** (len(blocks) - 1) if blocks else 8
        return scale * patch, f"its autoencoder downscales by {scale}, then {then}"

    def _patched_vae_step(self) -> tuple[int, str]:
        """:meth:`_vae_step` of a transformer that takes ``patch_size`` x ``patch_size`` latent patches."""
        patch = int(self._component_config("transformer").get("patch_size", 2))
        return self._vae_step(patch, f"the transformer takes {patch}x{patch} patches")

    def text_bridge_length(self) -> int:
        """T5 tokens for a prompt the LVLM wrote (the decoder's own default)."""
        if self.spec.max_length is None:
            raise NotImplementedError
        return self.spec.max_length

    @property
    def attention_mask_dtype(self) -> torch.dtype | None:
        """The dtype of the attention mask the stock ``encode_prompt`` returns; ``None``: no mask."""
        return None

    # ---- encoding (text stage) -----------------------------------------------------------------

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        """The decoder's own encoding of ``texts``: T5 states ``[B, max_length, D]`` and what goes with them."""
        raise NotImplementedError

    def empty_conditioning(self, pipe: DiffusionPipeline | None) -> dict[str, torch.Tensor]:
        """What the decoder needs besides ``prompt_embeds`` when there is no prompt text:
        FLUX's pooled CLIP vector of ``""``; SD3's CLIP block and pooled vector of ``""`` (``prefix``,
        ``pooled_prompt_embeds``); CogVideoX's negative embeddings (T5 of ``""``); nothing for
        Chroma, PixArt-Sigma and LTX-Video (``pipe`` is then ``None``)."""
        return {}

    # ---- denoising -----------------------------------------------------------------------------

    def guided(self, settings: Mapping[str, Any]) -> bool:
        """Whether these settings guide with a negative prompt (see :attr:`cfg_setting`)."""
        if self.cfg_setting is None:
            return True
        scale = settings.get(self.cfg_setting)
        if scale is None:
            scale = call_defaults(self.pipeline_cls)[self.cfg_setting].default
        return scale > 1

    def call_kwargs(
        self, pipe: DiffusionPipeline, embeds: Mapping[str, torch.Tensor], settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments of the stock ``__call__``: the settings and the embeddings on the device.

        ``embeds`` holds :attr:`conditioning_names` and, for guidance, their ``negative_`` twins
        (dropped when the settings do not guide).
        """
        kwargs = {k: v for k, v in settings.items() if v is not None}
        if self.guided(kwargs):
            missing = [f"negative_{n}" for n in self.conditioning_names if f"negative_{n}" not in embeds]
            if missing:
                what = f"{self.cfg_setting} > 1" if self.cfg_setting else f"{self.spec.pipeline_class}"
                raise ValueError(f"{what} needs {', '.join(missing)}")
        else:
            embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        for name, tensor in embeds.items():
            # Masks keep the dtype the stock encode_prompt gives them; embeddings take the transformer's.
            kwargs[name] = tensor.to(self.device) if name.endswith("mask") else self._to_pipe(pipe, tensor)
        return kwargs

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[Any]:
        """Run the stock pipeline on a batch of embeddings; one output (image, or list of frames) per row."""
        out = pipe(**self.call_kwargs(pipe, embeds, settings), generator=generators)
        return out.frames if self.spec.kind == "video" else out.images

    def _to_pipe(self, pipe: DiffusionPipeline, tensor: torch.Tensor) -> torch.Tensor:
        # With or without offload hooks the pipeline executes on self.device; asking the pipeline
        # (``_execution_device``) walks every module and costs milliseconds per call.
        return tensor.to(self.device, pipe.transformer.dtype)

    # ---- calibration: the decoder in the training loop ----------------------------------------
    # Calibration (thinkdiff.training.calibration) trains the aligner through the frozen denoiser:
    # it needs one differentiable model call and the noise process, nothing of the sampler. The
    # defaults below are rectified flow (FLUX, SD3, Chroma, LTX); a decoder with another process
    # (e.g. epsilon prediction) overrides add_noise / euler_step.

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        """One sample's conditioning as :meth:`velocity` takes it (batch dimension 1): the
        teacher's ``prompt_embeds`` of ``text`` with the decoder's other keys, or, with
        ``text=None``, only the other keys, those that go with aligned features at inference
        (FLUX: the pooled CLIP vector of ``""``). ``max_length=None``: the text at its own token
        count (no padding); else padded or cut to ``max_length`` as the text bridge does."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents (FLUX: packed tokens x channels) at a pixel size."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        """Clean latents ``[B, *latent_shape]`` of uint8 images (the 'source' noisy inputs)."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def velocity(
        self,
        pipe: DiffusionPipeline,
        latents: torch.Tensor,
        sigmas_B: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
        height: int,
        width: int,
    ) -> torch.Tensor:
        """The denoiser's output on ``latents`` at noise levels ``sigmas_B`` in [0, 1] (1 = pure
        noise), conditioned on ``conditioning`` (``prompt_embeds [B, L, D]`` plus the decoder's other
        keys); same shape as ``latents``. One transformer call, differentiable in the conditioning
        (the transformer's own weights stay frozen). Guidance-distilled models get their default
        guidance; no classifier-free guidance (one pass)."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, sigmas_B: torch.Tensor) -> torch.Tensor:
        """``x_sigma`` of the forward process: rectified flow ``(1 - sigma) x0 + sigma noise``."""
        s = sigmas_B.reshape(-1, *[1] * (clean.ndim - 1)).to(clean.dtype)
        return (1 - s) * clean + s * noise

    def euler_step(
        self, latents: torch.Tensor, output: torch.Tensor, sigma: float, sigma_next: float
    ) -> torch.Tensor:
        """One sampler step from ``sigma`` to ``sigma_next`` given :meth:`velocity`'s output."""
        return latents + (sigma_next - sigma) * output

    def flow_target(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What :meth:`velocity` should output on :meth:`add_noise`'s result (flow matching)."""
        return noise - clean

    def _calibration_length(self, pipe: DiffusionPipeline, text: str, max_length: int | None) -> int:
        """T5 tokens of a teacher text: ``max_length``, or the text's own count within the limit."""
        if max_length is not None:
            return max_length
        tokenizer = getattr(pipe, self.text_encoder_components["t5"][1])
        count = len(tokenizer(text).input_ids)
        return count if self.spec.max_length is None else min(count, self.spec.max_length)

    def _encode_images(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray, *, video: bool = False) -> torch.Tensor:
        """The VAE's latents (a posterior sample) of uint8 images, unscaled; ``video``: each image as a
        one-frame clip ``[B, 3, 1, H, W]``."""
        if getattr(pipe, "vae", None) is None:
            raise ValueError("'source' noisy inputs need the decoder's VAE loaded")
        x = torch.as_tensor(np.asarray(images_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if video:
            x = x[:, :, None]
        with torch.no_grad():
            return pipe.vae.encode(x.to(self.device, pipe.vae.dtype)).latent_dist.sample()

    def _vae_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        """Scaled VAE latents ``[B, C, h, w]`` of uint8 images (SD3, PixArt-Sigma, Chroma before packing)."""
        z = self._encode_images(pipe, images_BHWC)
        return (z - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor


class MaskedT5Decoder(DiffusionDecoder):
    """A decoder that reads T5 states with an attention mask and nothing else (Chroma, PixArt-Sigma,
    LTX-Video). Its guidance is classifier-free guidance on ``guidance_scale`` with a negative
    prompt: ThinkDiff passes T5 of ``""`` at the prompt's length, with the decoder's own mask."""

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {"t5": ("text_encoder", "tokenizer")}
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_attention_mask")
    cfg_setting: ClassVar[str | None] = "guidance_scale"

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        # Aligned features need nothing else: every token is attended (the mask defaults to ones).
        if text is None:
            return {}
        encoded = self.encode_text(pipe, [text], self._calibration_length(pipe, text, max_length))
        assert encoded.mask is not None
        return {"prompt_embeds": encoded.embeds, "prompt_attention_mask": encoded.mask}

    def _calibration_mask(self, conditioning: Mapping[str, torch.Tensor], prompt_BLD: torch.Tensor) -> torch.Tensor:
        """The conditioning's mask on the device, or all ones (aligned features) in the stock dtype."""
        mask = conditioning.get("prompt_attention_mask")
        if mask is None:
            dtype = self.attention_mask_dtype
            mask = torch.ones(prompt_BLD.shape[:2], dtype=dtype if dtype is not None else torch.bool)
        return mask.expand(prompt_BLD.shape[0], -1).to(self.device)


class UnpackedLatents(DiffusionDecoder):
    """Calibration latents as the VAE gives them, ``[C, H / f, W / f]`` (SD3, PixArt-Sigma)."""

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        scale = pipe.vae_scale_factor
        return (int(pipe.transformer.config.in_channels), height // scale, width // scale)

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        return self._vae_latents(pipe, images_BHWC)
