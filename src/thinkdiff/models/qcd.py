"""Query-contrastive decoding (QCD): sample the LVLM against the same prompt without its query.

At every generation step the next-token logits are

    logits = (1 + alpha) * logits(full prompt) - alpha * logits(prompt without its last text item)

For a CoBSAT-style prompt the last text item is the query (``"\\n\\nWord 3: red, "``, the word the
image must show): the contrast pushes the answer towards what the query adds over the in-context
examples alone. Temperature, top-p and greedy selection apply after the contrast (transformers
runs custom logits processors before its sampling warpers); constraints applied before it (EOS
suppressed until ``min_new_tokens``) set logits to ``-inf``, which the contrast keeps.

:class:`QueryContrastiveLogits` is a stock transformers ``LogitsProcessor``: ``generate`` runs
the full prompt with its own KV cache as usual, and the processor runs the contrast prompt with a
second cache of its own, batched like the full one, one token per step (the token ``generate``
just chose). Positions are built as ``generate`` builds them (a text row and M-RoPE), so nothing
of the library is patched and the model's own ``generate`` state (its stored ``rope_deltas``) is
never touched. The features of a QCD answer stay those of the full prompt: the contrast only
changes which tokens are chosen.

Shapes: B batch, P prompt length (left padded), V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel

__all__ = ["ContrastModel", "QueryContrastiveLogits", "contrast_items", "query_contrastive_processor"]

T = TypeVar("T")


class ContrastModel(Protocol):
    """What QCD needs of the LVLM wrapper (:class:`thinkdiff.models.lvlm.LVLMFeatureExtractor`
    provides it): the model, its prompt tokenizer, and ``generate``'s position ids."""

    model: PreTrainedModel

    def prepare_inputs(self, prompts: Sequence[Sequence[Any]]) -> Mapping[str, torch.Tensor]: ...

    def position_ids(
        self,
        input_ids_BL: torch.Tensor,
        mask_BL: torch.Tensor,
        mm_types_BL: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
    ) -> torch.Tensor: ...


def contrast_items(items: Sequence[T]) -> list[T]:
    """The prompt without its last text item (the query), images and order kept.

    ``["I give ...", "Word 1: red, ", img, "\\n\\nWord 2: blue, "]`` gives
    ``["I give ...", "Word 1: red, ", img]``. Raises ``ValueError`` when the prompt has no text
    item, or nothing would be left without it.
    """
    last_text = max((i for i, item in enumerate(items) if isinstance(item, str)), default=None)
    if last_text is None:
        raise ValueError("query-contrastive decoding removes the prompt's last text item; this prompt has none")
    rest = [item for i, item in enumerate(items) if i != last_text]
    if not rest:
        raise ValueError(
            "query-contrastive decoding needs more than the query: without its last text item the prompt is empty"
        )
    return rest


class QueryContrastiveLogits(LogitsProcessor):
    """``(1 + alpha) * scores - alpha * contrast``, the contrast run with its own KV cache.

    Build it with :func:`query_contrastive_processor` (one instance per ``generate`` call: it keeps
    the contrast cache of that call). ``contrast_inputs`` come from
    :meth:`ContrastModel.prepare_inputs` of the contrast prompts, in the same batch order
    as the generated rows. ``steps`` counts the calls (one per generated token).
    """

    def __init__(
        self, extractor: ContrastModel, contrast_inputs: Mapping[str, torch.Tensor], alpha: float
    ) -> None:
        if alpha < 0:
            raise ValueError(f"the QCD weight alpha must be >= 0, got {alpha}")
        self.extractor = extractor
        self.model = extractor.model
        self.alpha = float(alpha)
        self.inputs = contrast_inputs
        self.steps = 0
        self._cache: DynamicCache | None = None
        self._mask_BL: torch.Tensor | None = None
        self._next_text_B: torch.Tensor | None = None  # position of the next token, text row
        self._next_rope_B: torch.Tensor | None = None  # and its (t, h, w) M-RoPE position
        # transformers 5.x names the cache argument ``cache`` (``past_key_values`` before).
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch = self.inputs["input_ids"].shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"QCD: {input_ids.shape[0]} generated rows but {batch} contrast prompts")
        contrast_BV = self._prefill() if self._cache is None else self._step(input_ids[:, -1:])
        self.steps += 1
        return (1 + self.alpha) * scores - self.alpha * contrast_BV.to(scores.dtype)

    def _forward(self, **kwargs) -> torch.Tensor:
        out = self.model(**kwargs, **{self._cache_arg: self._cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefill(self) -> torch.Tensor:
        inputs = self.inputs
        ids_BP, mask_BP, mm_BP = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        position_ids = self.extractor.position_ids(ids_BP, mask_BP, mm_BP, vision.get("image_grid_thw"))
        # generate continues every row from its last column (the prompts are left padded).
        self._next_text_B = position_ids[0, :, -1] + 1
        self._next_rope_B = position_ids[1, :, -1] + 1
        self._mask_BL = mask_BP
        self._cache = DynamicCache(config=self.model.config)
        return self._forward(
            input_ids=ids_BP, attention_mask=mask_BP, position_ids=position_ids, mm_token_type_ids=mm_BP, **vision
        )

    def _step(self, token_B1: torch.Tensor) -> torch.Tensor:
        assert self._mask_BL is not None and self._next_text_B is not None and self._next_rope_B is not None
        self._mask_BL = torch.cat([self._mask_BL, torch.ones_like(token_B1)], dim=1)
        rope_B = self._next_rope_B
        position_ids = torch.stack([self._next_text_B, rope_B, rope_B, rope_B])[..., None]  # [4, B, 1]
        self._next_text_B = self._next_text_B + 1
        self._next_rope_B = rope_B + 1
        return self._forward(
            input_ids=token_B1,
            attention_mask=self._mask_BL,
            position_ids=position_ids,
            mm_token_type_ids=torch.zeros_like(token_B1),
        )


def query_contrastive_processor(
    extractor: ContrastModel, prompts: Sequence[Sequence[Any]], alpha: float
) -> QueryContrastiveLogits:
    """The QCD processor for one ``generate`` call over ``prompts`` (the full prompts, in order)."""
    contrast = []
    for index, items in enumerate(prompts):
        try:
            contrast.append(contrast_items(items))
        except ValueError as error:
            raise ValueError(f"prompt {index}: {error}") from None
    return QueryContrastiveLogits(extractor, extractor.prepare_inputs(contrast), alpha)
