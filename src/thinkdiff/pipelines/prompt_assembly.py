"""Stage 2 of the pipeline and the prompt it builds: which texts the decoder's own text encoders
must encode, and how each request's prompt embeddings are assembled from the aligned tokens and
those encodings ([SD3's CLIP block], aligned tokens, then T5 text tokens, fit to the decoder's
length), with the guidance negatives.

Shapes: L prompt tokens, D prompt width (the decoder's T5 d_model), P pooled width.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from thinkdiff.pipelines.decoders import DecoderSpec, DiffusionDecoder, TextEncoding
from thinkdiff.pipelines.requests import PreparedRequest
from thinkdiff.pipelines.results import ThinkDiffEmbeddings
from thinkdiff.pipelines.settings import InferenceSettings

__all__ = ["TextJob", "assemble_embeddings", "clip_text", "negative_lengths", "text_jobs"]

logger = logging.getLogger(__name__)

TextJob = tuple[int, str, int]
"""(request index, text, T5 length): one text for the decoder's own text encoders."""


def clip_text(p: PreparedRequest, instruction: str | None) -> str:
    """The text a clip-mode request conditions on: its texts (without the LVLM instruction, which
    means nothing to a CLIP-conditioned decoder) and its extra text."""
    texts = p.texts
    if texts and texts[0] == instruction:
        texts = texts[1:]
    parts = [t.strip() for t in texts if t.strip()]
    if p.request.extra_text:
        parts.append(p.request.extra_text.strip())
    return " ".join(parts)


def text_jobs(
    mode: str,
    prepared: Sequence[PreparedRequest],
    aligned: Sequence[torch.Tensor | None],
    lvlm_texts: Sequence[str | None],
    spec: DecoderSpec,
    decoder: DiffusionDecoder,
    s: InferenceSettings,
) -> list[TextJob]:
    """What the decoder's own text encoders must encode for each request, as (request, text, length).

    ``limit``: the most tokens after SD3's CLIP block the masked decoders and SD3 read.
    """
    required = spec.required_length
    # ``limit``: the most tokens after SD3's CLIP block the masked decoders and SD3 read.
    limit = spec.max_length
    jobs: list[tuple[int, str, int]] = []
    for i, p in enumerate(prepared):
        extra = (p.request.extra_text or "").strip()
        n_aligned = 0 if aligned[i] is None else aligned[i].shape[0]
        room = s.text_max_length if limit is None else min(s.text_max_length, limit - n_aligned)
        if mode == "text-bridge":
            text = " ".join(t for t in (lvlm_texts[i] or "", extra) if t)
            jobs.append((i, text, decoder.text_bridge_length()))
        elif mode == "clip":
            # check() refused image tokens that leave no room for text.
            jobs.append((i, clip_text(p, s.instruction), room if required is None else required - n_aligned))
        elif required is not None:
            # CogVideoX: its T5 fills the fixed length after the aligned tokens, encoding the
            # extra text (or "") exactly as it pads its own prompts.
            if n_aligned < required:
                jobs.append((i, extra, required - n_aligned))
        elif extra and room > 0:
            jobs.append((i, extra, room))
        elif extra:
            logger.warning(
                "request %d: extra text dropped: the %d aligned tokens fill the %d that %s takes",
                i,
                n_aligned,
                limit,
                spec.name,
            )
    return jobs


def negative_lengths(
    jobs: Sequence[TextJob], aligned: Sequence[torch.Tensor | None], spec: DecoderSpec, decoder: DiffusionDecoder
) -> list[int]:
    """Guidance with a negative prompt (FLUX's true CFG; the others' CFG): T5("") at each prompt's
    length (aligned + T5 tokens, after any CLIP block, within the limit); none when the decoder's
    negative is fixed (CogVideoX)."""
    limit = spec.max_length
    lengths: list[int] = []
    if decoder.cfg_setting is not None:
        t5_lengths = {i: length for i, _, length in jobs}
        lengths = [
            (0 if aligned[i] is None else aligned[i].shape[0]) + t5_lengths.get(i, 0)
            for i in range(len(aligned))
        ]
        if limit is not None:
            lengths = [min(length, limit) for length in lengths]
    return lengths


def assemble_embeddings(
    mode: str,
    aligned: Sequence[torch.Tensor | None],
    text_out: Mapping[int, TextEncoding],
    lvlm_texts: list[str | None],
    negative_lengths: Sequence[int],
    *,
    empty: Mapping[str, torch.Tensor],
    negatives: Mapping[int, TextEncoding],
    spec: DecoderSpec,
    decoder: DiffusionDecoder,
    dtype: torch.dtype,
    device: torch.device,
) -> ThinkDiffEmbeddings:
    """Each request's prompt: [SD3's CLIP block], aligned tokens, then T5 text tokens (``text_out``),
    fit to CogVideoX's length or the decoder's limit, right-padded into one batch; with the guidance
    negatives (``empty``: the decoder's conditioning of ``""``; ``negatives``: T5("") per length)."""
    required, limit = spec.required_length, spec.max_length
    # Masks are bool here (True: attended).
    empty_prefix = empty["prefix"][0] if "prefix" in empty else None
    empty_pooled = empty["pooled_prompt_embeds"][0] if "pooled_prompt_embeds" in empty else None
    cap = required if required is not None else limit
    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    pooled_rows: list[torch.Tensor] = []
    num_aligned: list[int] = []
    body_lengths: list[int] = []
    for i in range(len(aligned)):
        encoded = text_out.get(i)
        parts = [] if aligned[i] is None else [aligned[i]]
        part_masks = [] if aligned[i] is None else [torch.ones(aligned[i].shape[0], dtype=torch.bool)]
        if encoded is not None:
            parts.append(encoded.embeds)
            part_masks.append(encoded.attended())
        body_LD = torch.cat(parts) if parts else torch.zeros(0, spec.prompt_width, dtype=dtype)
        mask_L = torch.cat(part_masks) if part_masks else torch.zeros(0, dtype=torch.bool)
        if cap is not None and body_LD.shape[0] > cap:
            logger.warning(
                "request %d: %d prompt tokens cut to the %d that %s takes",
                i,
                body_LD.shape[0],
                cap,
                spec.name,
            )
            body_LD, mask_L = body_LD[:cap], mask_L[:cap]
        num_aligned.append(min(0 if aligned[i] is None else aligned[i].shape[0], body_LD.shape[0]))
        body_lengths.append(body_LD.shape[0])
        # lvlm: CLIP("") as released, even with extra text (the aligned tokens carry the
        # content); clip and text-bridge: CLIP of the text they encode (FLUX's pooled vector,
        # SD3's CLIP block and pooled vector).
        source = encoded if encoded is not None and mode != "lvlm" else None
        prefix = source.prefix if source is not None else empty_prefix
        pooled = source.pooled if source is not None else empty_pooled
        if prefix is not None:
            body_LD = torch.cat([prefix, body_LD])
            mask_L = torch.cat([torch.ones(prefix.shape[0], dtype=torch.bool), mask_L])
        rows.append(body_LD)
        masks.append(mask_L)
        if pooled is not None:
            pooled_rows.append(pooled)
    num_prefix = 0 if empty_prefix is None else empty_prefix.shape[0]

    length = max(r.shape[0] for r in rows)
    prompt_BLD = torch.zeros(len(rows), length, spec.prompt_width, dtype=dtype)
    mask_BL = torch.zeros(len(rows), length, dtype=torch.bool)
    decoder_mask_BL = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        prompt_BLD[i, : r.shape[0]] = r
        mask_BL[i, : r.shape[0]] = True
        decoder_mask_BL[i, : r.shape[0]] = masks[i]
    negative = negative_pooled = negative_mask_BL = None
    if "negative_prompt_embeds" in empty:  # CogVideoX
        negative = empty["negative_prompt_embeds"].expand(len(rows), -1, -1)[:, :length].clone()
    elif negative_lengths:  # guidance with T5("") at each prompt's length
        negative = torch.zeros_like(prompt_BLD)
        negative_mask_BL = torch.zeros_like(decoder_mask_BL)
        for i, r in enumerate(rows):
            assert body_lengths[i] == negative_lengths[i], "the negative must have the prompt's length"
            blank = negatives[body_lengths[i]]
            blank_mask = blank.attended()
            if empty_prefix is not None:
                negative[i, :num_prefix] = empty_prefix
                negative_mask_BL[i, :num_prefix] = True
            negative[i, num_prefix : r.shape[0]] = blank.embeds
            negative_mask_BL[i, num_prefix : r.shape[0]] = blank_mask
        if empty_pooled is not None:
            negative_pooled = empty_pooled.expand(len(rows), -1).clone()
    mask_dtype = decoder.attention_mask_dtype
    return ThinkDiffEmbeddings(
        prompt_embeds=prompt_BLD,
        prompt_attention_mask=mask_BL,
        pooled_prompt_embeds=torch.stack(pooled_rows) if pooled_rows else None,
        negative_prompt_embeds=negative,
        num_aligned_tokens=num_aligned,
        lvlm_texts=lvlm_texts,
        negative_pooled_prompt_embeds=negative_pooled,
        device=device,
        decoder_attention_mask=None if mask_dtype is None else decoder_mask_BL.to(mask_dtype),
        negative_decoder_attention_mask=(
            None if mask_dtype is None or negative_mask_BL is None else negative_mask_BL.to(mask_dtype)
        ),
        num_prefix_tokens=num_prefix,
    )
