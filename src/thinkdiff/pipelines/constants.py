"""Names and defaults of the inference pipeline, importable without torch (the CLI's --help uses them)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["lvlm", "clip", "text-bridge"]
MODES: tuple[str, ...] = ("lvlm", "clip", "text-bridge")
"""ThinkDiff-LVLM, ThinkDiff-CLIP, and the baseline where the LVLM writes a text prompt."""

Offload = Literal["none", "model", "sequential", "group"]
OFFLOAD_MODES: tuple[str, ...] = ("none", "model", "sequential", "group")
"""``none``: every loaded component on the device; ``model``: diffusers' ``enable_model_cpu_offload``
(one whole model on the device at a time); ``sequential``: ``enable_sequential_cpu_offload``
(one submodule at a time: least memory, slowest); ``group``: ``enable_group_offload`` (one block
at a time, the next copied on a CUDA stream while it computes; for video transformers)."""

QUANTIZE_MODES: tuple[str, ...] = ("none", "nf4", "int8", "fp8")
"""``--quantize`` for the LVLM and the decoder's transformer (see :mod:`thinkdiff.models.quantization`):
bitsandbytes NF4 (CUDA), torchao int8 weight-only (also the CPU), torchao fp8 (compute capability 8.9+)."""

DEFAULT_DECODER = "black-forest-labs/FLUX.1-dev"
"""The decoder of the paper, used when neither the model folder nor the caller names one."""

DEFAULT_LVLM = "Qwen/Qwen2-VL-7B-Instruct"
"""The LVLM of the paper's release; text-bridge uses it when no model folder names another."""

DEFAULT_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. "
    "Then give me a detailed diffusion prompt to describe the next picture. Please only provide "
    "me the detailed prompt and start the answer with 'Create an image'.\n\n"
)
"""The instruction the released code puts before CoBSAT-style inputs (lvlm and text-bridge modes),
byte for byte: it ends with a blank line, so the first ``Word 1: ...`` item starts a paragraph of
its own in the same user message (the release's multi-image test script; the 2026 follow-up copies it).

:data:`thinkdiff.evaluation.cobsat.protocol.COBSAT_INSTRUCTION` is this string. An LVLM trained on
another instruction records it in its folder (:data:`thinkdiff.models.lvlm.PROMPT_FILE`), and its
prompts are rendered with that one instead.
"""

HINT_INSTRUCTION = (
    "Hint: the last word is the key clue for the next picture; what all the pictures have in common "
    "comes from the pictures, not from the words."
)
"""The optional sentence appended to the instruction (``--hint``; our own wording): the query-contrastive
baseline's instruction change, telling the LVLM which part of a CoBSAT-style input is the query
(the last ``Word k: x, ``) and where the latent attribute comes from."""


def hinted(instruction: str, hint: str | None) -> str:
    """The instruction with the hint sentence appended (``hint`` ``None``: unchanged).

    The hint joins the instruction's last sentence, before its closing blank line if it has one
    (where the 2026 follow-up's early hint sat): ``"... 'Create an image'. Hint: ...\n\n"``.
    """
    if hint is None:
        return instruction
    body = instruction.rstrip()
    return f"{body} {hint}{instruction[len(body):]}"


DEFAULT_QCD_ALPHA = 0.5
"""Query-contrastive decoding weight used when ``--qcd-alpha`` is given without a value."""

DECODER_DESCRIPTOR = "thinkdiff_decoder.json"
"""Optional file in a decoder folder saying what its configs cannot: e.g. a FLUX trained in pixel
space without a VAE, its native size and its sampling defaults. See :class:`~thinkdiff.pipelines.DecoderSpec`."""
