"""``items, seed -> image`` over a :class:`~thinkdiff.pipelines.ThinkDiffPipeline`: what evaluation
harnesses call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from thinkdiff.pipelines.requests import Item, Request

if TYPE_CHECKING:
    from PIL import Image

    from thinkdiff.pipelines.pipeline_thinkdiff import ThinkDiffPipeline
    from thinkdiff.pipelines.results import ThinkDiffOutput

__all__ = ["SeededImageGenerator"]


class SeededImageGenerator:
    """``items, seed -> image`` on top of a :class:`ThinkDiffPipeline` (what evaluation harnesses call).

    ``generate_batch`` gives each sequence the decoder noise it would get alone; see
    :attr:`InferenceSettings.encoder_batch_size` for the LVLM. ``call_kwargs`` (height, steps, ...)
    are passed to every pipeline call.
    """

    def __init__(self, pipeline: ThinkDiffPipeline, **call_kwargs: Any) -> None:
        self.pipeline = pipeline
        self.call_kwargs = call_kwargs
        self.last_output: ThinkDiffOutput | None = None
        self.last_requests: list[Request] = []

    def __call__(self, items: Sequence[Item], seed: int) -> Image.Image:
        return self.generate_batch([items], [seed])[0]

    def generate_batch(self, batch: Sequence[Sequence[Item]], seeds: Sequence[int]) -> list[Image.Image]:
        if len(batch) != len(seeds):
            raise ValueError(f"{len(batch)} inputs but {len(seeds)} seeds")
        if self.pipeline.decoder_spec.kind != "image":
            raise ValueError(f"{self.pipeline.decoder_spec.name} makes videos; an image generator needs an image decoder")
        # Harnesses pass image paths as ``pathlib.Path`` (os.PathLike) and texts as ``str``.
        requests = [Request(items=list(items), seed=seed) for items, seed in zip(batch, seeds)]
        self.last_requests = requests
        self.last_output = self.pipeline(requests, **self.call_kwargs)
        return self.last_output.images

    def details(self) -> list[dict[str, Any]]:
        """Per image of the last call: what a sidecar should record (the LVLM's text, the settings)."""
        if self.last_output is None:
            return []
        out = self.last_output
        lvlm = [
            self.pipeline.lvlm_conditioning(r) if self.pipeline.mode != "clip" else None for r in self.last_requests
        ]
        return [
            {"lvlm_text": text, **settings, "lvlm": conditioning}
            for text, settings, conditioning in zip(out.lvlm_texts, out.settings, lvlm)
        ]
