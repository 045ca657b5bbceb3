"""Bounds on numeric settings, checked before any model loads.

A typo such as ``--steps 99999999999`` or ``--num-tokens 100000000`` must be one line at once, not
a 745 GiB allocation after minutes of loading or a run that never ends. Each upper bound follows
from the component the setting drives, read from its config: denoising steps from the decoder's
scheduler, LVLM tokens from the LVLM's context. Two checks need no config: every float setting is
finite (a NaN guidance passes every ``<`` test and draws a black image), and a seed fits the 64-bit
seed of torch's generators. Other lower bounds stay where the settings are defined.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thinkdiff.pipelines import ThinkDiffPipeline
    from thinkdiff.pipelines.decoders.spec import DecoderSpec
    from thinkdiff.pipelines.requests import Request

logger = logging.getLogger(__name__)

# Where a config cannot be read (a hub id offline): bounds that no real setting reaches.
FALLBACK_STEPS = 1000
FALLBACK_CONTEXT = 131072
FLUX_T5_TOKENS = 512
# Video decoders without a frame table (CogVideoX's sincos or RoPE positions, LTX-Video's RoPE) take
# any frame count, each costing memory: 1025 frames at CogVideoX's stock 480 x 720 are 4.2 GB as the
# float32 video its VAE decodes, before the latents, the attention and the written file. 1025 is
# 4k+1 and 8k+1, a count CogVideoX and LTX-Video both take; about 6x LTX-Video's stock 161 frames.
LARGEST_FRAMES = 1025
# torch.manual_seed takes -2**63 .. 2**64-1 (a negative seed wraps around to a large one); the
# signed 64-bit range without negatives is a seed every consumer (torch, vLLM, JSON readers) takes.
LARGEST_SEED = 2**63 - 1


def finite_float(text: str) -> float:
    """The argparse type of every float flag (see :class:`thinkdiff.console.OneLineArgumentParser`):
    ``float`` that refuses ``nan`` and ``inf`` (and ``1e999``, which is ``inf``) in one line."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_finite(name: str, value: float | None, where: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` when a number read from a file is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} {value} is not a finite number")


def check_seed(name: str, value: int | None, where: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a seed from 0 to :data:`LARGEST_SEED`."""
    if value is not None and not 0 <= value <= LARGEST_SEED:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} {value} is not a seed: seeds run from 0 to {LARGEST_SEED}")


def seed_argument(text: str) -> int:
    """The argparse type of ``--seed``: a whole number from 0 to :data:`LARGEST_SEED`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    try:
        check_seed("", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return value


@dataclass(frozen=True)
class Bound:
    """The largest value a setting may take, and why (for the one-line refusal)."""

    largest: int
    why: str

    def check(self, name: str, value: int | None, where: str = "") -> None:
        """Raise ``ValueError`` naming ``name`` (as the user wrote it) when ``value`` exceeds the bound."""
        if value is not None and value > self.largest:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{name} {value} is above {self.largest}, the most {self.why}")


def denoising_steps_bound(decoder: str | Path) -> Bound:
    """Steps of a decoder: its scheduler's ``num_train_timesteps`` (1000 for FLUX.1, SD3, PixArt,
    CogVideoX), the finest schedule it was trained on; more steps only repeat its timesteps."""
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.pipelines.decoders.spec import CONFIG_FILES

    try:
        folder = resolve_model_dir(decoder, kind="diffusion decoder", files=CONFIG_FILES)
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        steps = int(config["num_train_timesteps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("no scheduler config for %s (%s): steps bounded by %d", decoder, exc, FALLBACK_STEPS)
        return Bound(
            FALLBACK_STEPS, f"denoising steps (decoder {decoder}'s scheduler config is not readable)"
        )
    return Bound(steps, f"denoising steps decoder {decoder} has (its scheduler's num_train_timesteps)")


def lvlm_context_bound(lvlm: str | Path) -> Bound:
    """Tokens an LVLM can generate: its language model's ``max_position_embeddings`` (Qwen2-VL:
    32768), the context that the prompt and the answer share."""
    from transformers import AutoConfig

    from thinkdiff.models.loading import resolve_model_dir

    try:
        config = AutoConfig.from_pretrained(resolve_model_dir(lvlm, kind="LVLM", files=["config.json"]))
        context = int(config.get_text_config().max_position_embeddings)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        logger.debug("no context length for LVLM %s (%s): bounded by %d", lvlm, exc, FALLBACK_CONTEXT)
        return Bound(FALLBACK_CONTEXT, f"tokens any LVLM reads (LVLM {lvlm}'s config is not readable)")
    return Bound(context, f"tokens LVLM {lvlm} reads, its prompt included (max_position_embeddings)")


def frames_bound(decoder: DecoderSpec) -> Bound:
    """Frames of a video decoder: ``sample_frames`` where its transformer has learned positional
    embeddings for that many (CogVideoX-5B-I2V; diffusers silently swaps the learned table for
    sincos positions at any other count), else :data:`LARGEST_FRAMES`, a cap set by memory."""
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.pipelines.decoders.spec import CONFIG_FILES

    try:
        folder = resolve_model_dir(decoder.name, kind="diffusion decoder", files=CONFIG_FILES)
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        logger.debug("no transformer config for %s (%s): frames bounded by %d", decoder.name, exc, LARGEST_FRAMES)
        config = {}
    if config.get("use_learned_positional_embeddings") and isinstance(config.get("sample_frames"), int):
        return Bound(
            config["sample_frames"],
            f"frames decoder {decoder.name} has learned positions for (its transformer's sample_frames)",
        )
    return Bound(
        LARGEST_FRAMES,
        f"frames a video is bounded by here (decoder {decoder.name}; {LARGEST_FRAMES} frames at 480 x 720 are "
        "4.2 GB as the float32 video its VAE decodes)",
    )


def text_length_bound(decoder: DecoderSpec) -> Bound:
    """T5 tokens of text for a decoder: the most its stock pipeline reads (``max_sequence_length``
    or CogVideoX's fixed length); FLUX.1 has no such field, and its stock pipeline refuses more
    than 512 (the length its T5 was trained with)."""
    if decoder.max_length or decoder.required_length:
        return Bound(
            int(decoder.max_length or decoder.required_length), f"T5 tokens decoder {decoder.name} reads"
        )
    return Bound(
        FLUX_T5_TOKENS, f"T5 tokens decoder {decoder.name} reads (FluxPipeline's max_sequence_length)"
    )


def check_pipeline_bounds(
    pipe: ThinkDiffPipeline,
    steps: Iterable[tuple[int | None, str]],
    *,
    frames: Iterable[tuple[int | None, str]] = (),
    flags: bool = True,
) -> None:
    """The pipeline's settings and each request's steps within what its models take: ``num_tokens``
    within the LVLM's context (lvlm and text-bridge modes), ``text_max_length`` within the decoder's
    T5 length, the sampling floats finite, and each ``(steps, where)`` within the decoder's schedule
    (``where`` names a job or request, "" for the command line), and each ``(frames, where)`` within
    :func:`frames_bound` (video decoders; others refuse frames themselves). ``flags``: name the settings as the
    command line spells them (``--num-tokens``), else as the Python API does (``num_tokens``).
    Reads configs only: :meth:`ThinkDiffPipeline.check` calls it before the first request, so the
    library and every command share it."""
    bound = denoising_steps_bound(pipe.decoder_spec.name)
    for value, where in steps:
        step_name = ("steps" if where else "--steps") if flags else "num_inference_steps"
        bound.check(step_name, value, where)
    if pipe.decoder_spec.kind == "video":
        frame_bound = frames_bound(pipe.decoder_spec)
        for value, where in frames:
            frame_name = ("num_frames" if where else "--num-frames") if flags else "num_frames"
            frame_bound.check(frame_name, value, where)
    if pipe.mode != "clip":
        lvlm_context_bound(pipe.source_model).check("--num-tokens" if flags else "num_tokens", pipe.settings.num_tokens)
    text_length = "--text-max-length" if flags else "text_max_length"
    text_length_bound(pipe.decoder_spec).check(text_length, pipe.settings.text_max_length)
    for name in ("temperature", "top_p", "qcd_alpha"):  # a model folder's thinkdiff.json may hold NaN
        check_finite(name, getattr(pipe.settings, name))


def check_request_numbers(request: Request, where: str) -> None:
    """A request's seed within :data:`LARGEST_SEED` and its float settings finite, named by ``where``."""
    check_seed("seed", request.seed, where)
    for name in ("guidance_scale", "true_cfg_scale", "qcd_alpha"):
        check_finite(name, getattr(request, name), where)
