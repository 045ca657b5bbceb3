"""Loading a built miniature world, and the few calls everything downstream makes on it.

A models folder (what ``thinkdiff miniworld build`` writes) holds::

    t5/        the mini T5 (T5ForConditionalGeneration + tokenizer): the proxy decoder
    flux/      the mini FLUX.1 (a stock FluxPipeline folder, no VAE; text_encoder_2 = the T5 encoder)
    vlm/       the mini Qwen2-VL (model, tokenizer, image processor)
    vision/    the mini EVA ViT (Blip2VisionModel + BLIP-2 image processor)
    judge/     the judge's CNN
    thinkdiff/lvlm/, thinkdiff/clip/   the trained ThinkDiff aligners (model folders as exported
               by the project's trainer)
    build.json what was built, with which seed and budgets, how long it took

:meth:`MiniWorld.images_from_embeds` is the one place where prompt embeddings become images; it
calls the stock ``FluxPipeline`` through ThinkDiff inference's ``FluxDecoder``.

Shapes: L text tokens, D T5 width.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinkdiff.miniworld.sampler import DEFAULT_CFG, DEFAULT_STEPS

__all__ = ["DEFAULT_CFG", "DEFAULT_STEPS", "DrawnImages", "MiniWorld", "default_weights_dir"]


def default_weights_dir() -> Path:
    """Where the committed weights live (``src/thinkdiff/miniworld/weights``)."""
    return Path(__file__).resolve().parent / "weights"


@dataclass
class MiniWorld:
    """The loaded components of a models folder (each loaded on first use)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._negatives: dict[int, torch.Tensor] = {}
        if not (self.root / "t5").is_dir():
            raise FileNotFoundError(
                f"{self.root} is not a miniature-world models folder (no t5/); build one with "
                "`thinkdiff miniworld build DIR`"
            )

    # ---- components ----------------------------------------------------------------------------
    @functools.cached_property
    def t5_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.root / "t5")

    @functools.cached_property
    def pipe(self):
        from thinkdiff.miniworld.components.flux import load_pipeline

        return load_pipeline(self.root / "flux")

    @functools.cached_property
    def decoder(self):
        """ThinkDiff inference's decoder wrapper around :attr:`pipe` (pixel space, from the folder's
        ``thinkdiff_decoder.json``)."""
        from thinkdiff.pipelines.decoders import DecoderSpec, load_decoder

        return load_decoder(DecoderSpec.inspect(self.root / "flux"), torch.device("cpu"), torch.float32)

    @property
    def t5_encoder(self):
        return self.pipe.text_encoder_2

    @functools.cached_property
    def judge(self):
        from thinkdiff.miniworld.judge import Judge

        return Judge.load(self.root / "judge")

    @functools.cached_property
    def vlm(self):
        from thinkdiff.models.lvlm import LVLMFeatureExtractor

        return LVLMFeatureExtractor.from_pretrained(self.root / "vlm", device="cpu", dtype=torch.float32)

    @functools.cached_property
    def vision(self):
        from thinkdiff.models.clip_vision import CLIPVisionFeatures

        return CLIPVisionFeatures.from_pretrained(self.root / "vision", device="cpu", dtype=torch.float32)

    def inference_settings(self):
        """How ThinkDiff's inference drives this world's VLM: greedy answers that stop at EOS, at
        most as long as the longest answer the world has (the aligner was trained on such answers)."""
        from thinkdiff.miniworld.components.vlm import max_answer_tokens
        from thinkdiff.models.lvlm import load_processor
        from thinkdiff.pipelines import InferenceSettings

        tokenizer = load_processor(self.root / "vlm").tokenizer
        return InferenceSettings(num_tokens=max_answer_tokens(tokenizer), stop_at_eos=True, greedy=True)

    def thinkdiff_pipeline(self, name: str = "lvlm", **kwargs: Any):
        """The project's ``ThinkDiffPipeline`` on this world: the aligner ``thinkdiff/<name>`` (or a
        model folder), its VLM or vision encoder, and its FLUX; on the CPU, every stage kept loaded.
        ``kwargs`` override those choices (e.g. ``mode="text-bridge"``)."""
        from thinkdiff.models.bundle import load_info
        from thinkdiff.pipelines import ThinkDiffPipeline

        folder = self._model_folder(name)
        options: dict[str, Any] = {
            "decoder": self.root / "flux",
            "device": "cpu",
            "keep_loaded": True,
            "settings": self.inference_settings(),
        }
        if load_info(folder).variant == "clip":
            options["vision"] = self.root / "vision"
        else:
            options["lvlm"] = self.root / "vlm"
        return ThinkDiffPipeline.from_pretrained(folder, **{**options, **kwargs})

    def _model_folder(self, name: str) -> Path:
        return Path(name) if Path(name).is_dir() else self.root / "thinkdiff" / name

    def aligner(self, name: str):
        """A trained ThinkDiff aligner and its info (``thinkdiff/<name>`` or any model folder)."""
        from thinkdiff.models.bundle import load_model

        return load_model(self._model_folder(name))

    # ---- text and images -----------------------------------------------------------------------
    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """T5 encoder states [L, D] of each text at its own length (no padding)."""
        from thinkdiff.miniworld.components.flux import t5_states

        return [t5_states(self.t5_encoder, self.t5_tokenizer, [t])[0] for t in texts]

    def negative_embeds(self, length: int) -> torch.Tensor:
        """The CFG negative [L, D]: T5 states of ``""`` padded to ``length`` (as in training)."""
        from thinkdiff.miniworld.components.flux import t5_states

        if length not in self._negatives:
            self._negatives[length] = t5_states(self.t5_encoder, self.t5_tokenizer, [""], length=length)[0]
        return self._negatives[length]

    @torch.no_grad()
    def images_from_embeds(
        self,
        embeds: Sequence[torch.Tensor],
        seeds: Sequence[int],
        *,
        steps: int = DEFAULT_STEPS,
        cfg: float = DEFAULT_CFG,
        batch_size: int = 256,
    ) -> np.ndarray:
        """uint8 [B, H, W, 3] images from prompt embeddings [L_i, D] (any lengths; no masks exist in
        FLUX, so prompts are batched only with others of the same length).

        The denoising is ThinkDiff inference's own (:meth:`FluxDecoder.generate
        <thinkdiff.pipelines.decoders.FluxDecoder.generate>`), batched wider than the pipeline's:
        one CPU generator per image, true CFG against T5("") at the prompt's length.
        """
        from thinkdiff.miniworld.world import IMAGE_SIZE

        if len(embeds) != len(seeds):
            raise ValueError(f"{len(embeds)} prompt embeddings but {len(seeds)} seeds")
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, e in enumerate(embeds):
            if e.ndim != 2 or e.shape[-1] != self.pipe.transformer.config.joint_attention_dim:
                raise ValueError(
                    f"prompt embedding {i} has shape {list(e.shape)}, expected "
                    f"[tokens, {self.pipe.transformer.config.joint_attention_dim}]"
                )
            by_length[e.shape[0]].append(i)
        out: np.ndarray | None = None
        for length, members in by_length.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                prompt = torch.stack([embeds[i].float() for i in chunk])
                # The stub CLIP's pooled vector is zero for every text, "" included.
                pooled = torch.zeros(len(chunk), self.pipe.transformer.config.pooled_projection_dim)
                conditioning = {
                    "prompt_embeds": prompt,
                    "pooled_prompt_embeds": pooled,
                    "negative_prompt_embeds": self.negative_embeds(length)[None].expand_as(prompt),
                    "negative_pooled_prompt_embeds": pooled,
                }
                settings = {
                    "height": IMAGE_SIZE,
                    "width": IMAGE_SIZE,
                    "num_inference_steps": steps,
                    "true_cfg_scale": cfg,
                }
                generators = [torch.Generator().manual_seed(seeds[i]) for i in chunk]
                pil = self.decoder.generate(self.pipe, conditioning, generators, settings)
                images = np.stack([np.asarray(im) for im in pil])
                if out is None:
                    out = np.empty((len(embeds), *images.shape[1:]), np.uint8)
                out[chunk] = images
        assert out is not None
        return out

    def images_from_text(self, texts: Sequence[str], seeds: Sequence[int], **kwargs) -> np.ndarray:
        """Text -> mini T5 -> mini FLUX (the decoder's own text-to-image)."""
        return self.images_from_embeds(self.text_embeds(texts), seeds, **kwargs)


class DrawnImages:
    """The images one measurement has drawn, by prompt embedding, seed and sampler settings.

    Rows of a table often ask for the same image: the text bridge where the VLM's answer is the
    target caption, a decoding variant whose answer did not change. Such a request is answered
    from here instead of sampling it again; only the others go through the sampler, batched as
    before. (A reused image was drawn in another batch than the row's own would have been, which
    on a CPU can move a pixel by 1/255: the same image up to the sampler's batch rounding.)
    """

    def __init__(self) -> None:
        self._images: dict[tuple[int, str, str], np.ndarray] = {}

    def draw(
        self, world: MiniWorld, embeds: Sequence[torch.Tensor], seeds: Sequence[int], **sampling: Any
    ) -> np.ndarray:
        """uint8 [B, H, W, 3]: :meth:`MiniWorld.images_from_embeds` for the requests not drawn yet."""
        import hashlib

        settings = repr(sorted(sampling.items()))
        keys = [
            (
                seed,
                settings,
                hashlib.sha1(
                    e.float().contiguous().numpy().tobytes() + repr(tuple(e.shape)).encode()
                ).hexdigest(),
            )
            for e, seed in zip(embeds, seeds, strict=True)
        ]
        new: dict[tuple[int, str, str], int] = {}
        for i, key in enumerate(keys):
            if key not in self._images:
                new.setdefault(key, i)
        if new:
            drawn = world.images_from_embeds(
                [embeds[i] for i in new.values()], [seeds[i] for i in new.values()], **sampling
            )
            self._images.update(zip(new, drawn))
        return np.stack([self._images[key] for key in keys])
