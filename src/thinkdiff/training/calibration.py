"""Calibration: the diffusion decoder in the training loop of a trained aligner.

The proxy objective pins the *content* of the aligned features (the T5 decoder reads them back) but
not the *basis* the diffusion decoder reads. Calibration keeps the decoder frozen and trains only
the aligner so that the decoder behaves on the aligned features as it does on its own text:

- **student**: the frozen denoiser conditioned on the aligned features (ThinkDiff-LVLM: the
  LVLM's generated-token features of a stored answer; ThinkDiff-CLIP: the aligned image tokens
  followed by the decoder's T5 states of the caption's first part, as at inference), with the
  pooled vector inference gives aligned features (FLUX: CLIP of ``""``);
- **teacher**: the same denoiser on its own text encoder's states of the answer (the whole caption
  for CLIP), with that text's pooled vector; no gradient, cached per text.

Losses (``TrainConfig.calibration_loss``):

- ``distill``: MSE between the student's and the teacher's outputs on the same noisy inputs. It
  needs no alignment between the LVLM's and T5's tokens, so it carries over to real tokenizers;
- ``regress``: per-position MSE of the aligned features onto the teacher's T5 states, where the two
  tokenisations can be aligned (:func:`align_tokens`: one to one, or through character offsets);
  no decoder call at all.

- ``flow`` (ThinkDiff-LVLM on task-format data): distillation on the target image's noised
  latents, towards the mean of the teacher's output and the flow-matching target of that image (a
  signal beyond the text bridge: the picture the answer should describe).

Each can add ``proxy_weight`` x the no-split proxy cross-entropy, which keeps the proxy decoder
reading the features. Noisy inputs (``noise_source``; the default 'auto' takes ``source`` where
the images are at hand, else ``teacher``): the ``teacher``'s own partial samples (a few teacher
Euler steps from noise, on the sampler's path, so every noise level is trained), ``pure`` noise at a high noise level (``sigma >= noise_min_sigma``; no extra calls, but
the lower levels are never trained), or the ``source`` image's latents noised
at a logit-normal level (CLIP: the caption's image, in the batch; LVLM: the target image of a
task-format prompt, from ``target_images``).

Samples are grouped by (student length, teacher length): a FLUX prompt has no mask, so samples
are stacked only with others of the same lengths, as at inference.

Shapes: B batch, L aligned tokens, T teacher tokens, D prompt width, N latent tokens, C channels.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from thinkdiff.objectives import CLIPBatch, LVLMBatch, aligned_clip_memory
from thinkdiff.training.proxy_objective import ProxyObjective

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.training.config import TrainConfig
    from thinkdiff.training.objective import FrozenModels

__all__ = [
    "Calibration",
    "CalibrationObjective",
    "align_tokens",
    "alignment_word_agreement",
    "calibration_loss",
    "token_char_spans",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- token alignment
def token_char_spans(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token of ``ids`` in ``tokenizer.decode(ids)``, from decoded prefixes
    (works for any tokenizer, byte-level BPE included, without offset support)."""
    spans, start = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True))
        spans.append((start, end))
        start = end
    return spans


def _first_chars(text: str, ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, bool]]:
    """Per token of ``ids``: the position in ``text`` of its first non-space character, and whether
    it has one (a whitespace-only token stands for nothing T5 keeps)."""
    decoded = tokenizer.decode(list(ids), skip_special_tokens=True)
    # The decoded text may differ from ``text`` in leading spaces only; offsets are into ``text``.
    shift = text.find(decoded.strip()) - (len(decoded) - len(decoded.lstrip()))
    firsts = []
    for start, end in token_char_spans(tokenizer, ids):
        piece = decoded[start:end]
        first = start + (len(piece) - len(piece.lstrip()))
        firsts.append((first + shift, first < end))
    return firsts


def align_tokens(
    text: str,
    source_ids: Sequence[int],
    source_tokenizer: PreTrainedTokenizerBase,
    target_tokenizer: PreTrainedTokenizerBase,
    mode: str = "offsets",
) -> list[tuple[int, int]] | None:
    """Pairs (source position, target position) of tokens that stand for the same text.

    ``source_ids``: the LVLM's tokens of ``text`` (an EOS at the end is paired with the target's
    EOS). ``target_tokenizer`` must be a fast tokenizer (offsets); the target ends in its EOS.
    ``one-to-one``: the texts must tokenize to the same number of tokens, paired in order (else
    ``None``). ``offsets``: each source token is paired with the target token holding its first
    non-space character (many to one where the target's tokens are longer).
    :func:`alignment_word_agreement` measures how often a pair lies within one word.
    """
    special = set(source_tokenizer.all_special_ids)
    words = [i for i in source_ids if i not in special]
    has_eos = len(words) < len(source_ids)
    enc = target_tokenizer(text, return_offsets_mapping=True)
    target = [(i, span) for i, (tid, span) in enumerate(zip(enc.input_ids, enc.offset_mapping))]
    target_special = set(target_tokenizer.all_special_ids)
    target_words = [(i, span) for i, span in target if enc.input_ids[i] not in target_special]
    target_eos = [i for i, _ in target if enc.input_ids[i] == target_tokenizer.eos_token_id]
    pairs: list[tuple[int, int]] = []
    if mode == "one-to-one":
        if len(words) != len(target_words):
            return None
        pairs = [(i, t) for i, (t, _) in enumerate(target_words)]
    elif mode == "offsets":
        for i, (char, is_word) in enumerate(_first_chars(text, words, source_tokenizer)):
            if not is_word:
                continue
            # The last target token holding the character: a bare "▁" piece shares its span
            # with the word piece after it.
            matches = [t for t, (a, b) in target_words if a <= char < b]
            if matches:
                pairs.append((i, matches[-1]))
    else:
        raise ValueError(f"token alignment must be 'one-to-one' or 'offsets', got {mode!r}")
    if has_eos and target_eos:
        pairs.append((len(source_ids) - 1, target_eos[-1]))
    return pairs


def alignment_word_agreement(
    texts: Sequence[str], source_tokenizer: PreTrainedTokenizerBase, target_tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """How well :func:`align_tokens` (``offsets``) works for two tokenizers: the share of source
    word tokens paired at all (``coverage``) and the share of pairs whose two tokens lie in the same
    whitespace word of the text (``same_word``)."""
    paired = total = same = 0
    for text in texts:
        ids = source_tokenizer(text, add_special_tokens=False).input_ids
        pairs = align_tokens(text, ids, source_tokenizer, target_tokenizer, "offsets") or []
        enc = target_tokenizer(text, return_offsets_mapping=True)
        words = [len(text[:i].split()) for i in range(len(text) + 1)]  # word index of each char
        firsts = _first_chars(text, ids, source_tokenizer)
        total += sum(is_word for _, is_word in firsts)
        for s, t in pairs:
            first = firsts[s][0]
            ta, tb = enc.offset_mapping[t]
            paired += 1
            same += words[first + 1] == words[max(ta, tb - 1) + 1] if tb > ta else 0
    return {"coverage": paired / max(total, 1), "same_word": same / max(paired, 1), "tokens": total}


# ----------------------------------------------------------------------------- the decoder in the loop
class Calibration:
    """The frozen diffusion decoder of a calibration run, its teacher cache and the losses.

    Everything decoder-specific goes through the :class:`~thinkdiff.pipelines.decoders.DiffusionDecoder`
    calibration methods (``calibration_conditioning``, ``latent_shape``, ``image_latents``,
    ``velocity``, ``add_noise``, ``euler_step``), so any decoder that implements them calibrates.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        dtype: torch.dtype,
        lvlm_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        from thinkdiff.pipelines.decoders import DecoderSpec, load_decoder

        self.config = config
        spec = DecoderSpec.inspect(config.diffusion_decoder)
        self.decoder = load_decoder(spec, device, dtype)
        roles = self.decoder.text_roles(needs_t5=True)  # FLUX: CLIP + T5; SD3: its CLIPs + T5; others: T5
        components = [*self.decoder.components_for(roles), "transformer"]
        needs_images = config.calibration_noise == "source" or config.calibration_loss == "flow"
        if needs_images and "vae" in self.decoder.denoise_components:
            components.append("vae")
        self.pipe = self.decoder.load(components)
        for name in components:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        if config.activation_checkpointing:
            # Recompute each block in backward: the gradient reaches the aligner through every block.
            self.pipe.transformer.enable_gradient_checkpointing()
        size = config.calibration_size or spec.sample_size or 512
        self.height = self.width = size
        self.decoder.check_size(size, size, "calibration_size")
        self.lvlm_tokenizer = lvlm_tokenizer
        self.student_extra = {
            k: v.detach() for k, v in self.decoder.calibration_conditioning(self.pipe, None, None).items()
        }
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._alignments: dict[tuple[str, tuple[int, ...]], list[tuple[int, int]] | None] = {}
        self._target_files: dict[str, Path] | None = None

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    # ---- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def text_conditioning(self, text: str) -> dict[str, torch.Tensor]:
        """The decoder's own conditioning of ``text`` (batch 1), cached per text when configured
        (kept on the CPU: the text encoders need not stay in memory for a cached dataset)."""
        cached = self._cache.get(text)
        if cached is not None:
            return {k: v.to(self.device) for k, v in cached.items()}
        conditioning = self.decoder.calibration_conditioning(
            self.pipe, text or " ", self.config.teacher_max_length
        )
        if self.config.cache_teacher:
            self._cache[text] = {k: v.detach().cpu() for k, v in conditioning.items()}
        return conditioning

    def student(self, prompt_LD: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": prompt_LD[None], **self.student_extra}

    # ---- noisy inputs --------------------------------------------------------------------------
    def _noisy(
        self, n: int, teacher: dict[str, torch.Tensor], clean: torch.Tensor | None, key: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents, their levels and the noise drawn for ``n`` samples of one group, drawn from a generator
        seeded by ``key`` (step and sample keys): a resumed run draws exactly the same noise, with
        no RNG state to restore (the data loader draws from the global one when it restarts)."""
        seed = int(hashlib.sha256(f"{self.config.seed}:{key}".encode()).hexdigest()[:15], 16)
        gen = torch.Generator().manual_seed(seed)
        shape = (n, *self.decoder.latent_shape(self.pipe, self.height, self.width))
        noise = torch.randn(shape, generator=gen).to(self.device)
        source = "source" if clean is not None else self.config.calibration_noise
        if source == "pure":
            low = self.config.noise_min_sigma
            sigmas = (low + (1 - low) * torch.rand(n, generator=gen)).to(self.device)
            return noise, sigmas, noise
        if source == "source":
            assert clean is not None
            # logit-normal levels, as FLUX trains
            sigmas = torch.sigmoid(torch.randn(n, generator=gen)).to(self.device)
            return self.decoder.add_noise(clean.to(noise.dtype), noise, sigmas), sigmas, noise
        # teacher: j Euler steps of the teacher from pure noise along the sampler's schedule.
        steps = self.config.teacher_steps
        schedule = torch.linspace(1.0, 0.0, steps + 1).tolist()
        j = int(torch.randint(0, steps, (1,), generator=gen).item())
        x = noise
        with torch.no_grad():
            for i in range(j):
                sig = torch.full((n,), schedule[i], device=self.device)
                out = self.decoder.velocity(self.pipe, x, sig, teacher, self.height, self.width)
                x = self.decoder.euler_step(x, out.float(), schedule[i], schedule[i + 1])
        return x, torch.full((n,), schedule[j], device=self.device), noise

    # ---- losses --------------------------------------------------------------------------------
    def distill(
        self,
        students: list[torch.Tensor],
        texts: list[str],
        clean: torch.Tensor | None = None,
        key: str = "",
        flow: bool = False,
    ) -> torch.Tensor:
        """Mean MSE between student and teacher outputs; ``students[i]`` is ``[L_i, D]``; ``key``
        seeds the noise (with each group's first text). ``clean``: source-image latents to noise
        (else ``noise_source``); ``flow``: the target is the mean of the teacher's output and the
        flow-matching target of ``clean`` (a signal beyond the text bridge)."""
        teachers = [self.text_conditioning(t) for t in texts]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (s, t) in enumerate(zip(students, teachers)):
            groups[(s.shape[0], t["prompt_embeds"].shape[1])].append(i)
        total = students[0].new_zeros(())
        for members in groups.values():
            teacher = {k: torch.cat([teachers[i][k] for i in members]) for k in teachers[members[0]]}
            student = {
                "prompt_embeds": torch.stack([students[i] for i in members]),
                **{k: v.expand(len(members), *v.shape[1:]) for k, v in self.student_extra.items()},
            }
            group_clean = clean[members] if clean is not None else None
            x, sigmas, noise = self._noisy(len(members), teacher, group_clean, f"{key}:{members[0]}:{texts[members[0]]}")
            with torch.no_grad():
                target = self.decoder.velocity(self.pipe, x, sigmas, teacher, self.height, self.width)
                if flow:
                    assert group_clean is not None
                    target = 0.5 * (target.float() + self.decoder.flow_target(group_clean.float(), noise))
            pred = self.decoder.velocity(self.pipe, x, sigmas, student, self.height, self.width)
            total = total + F.mse_loss(pred.float(), target.float(), reduction="mean") * len(members)
        return total / len(students)

    def regress(self, students: list[torch.Tensor], texts: list[str], token_ids: list[list[int]]) -> torch.Tensor:
        """Per-position MSE of aligned features onto the teacher's T5 states at aligned tokens."""
        assert self.lvlm_tokenizer is not None
        t5_tokenizer = self.decoder_t5_tokenizer
        preds, targets = [], []
        for student, text, ids in zip(students, texts, token_ids):
            # The alignment depends on the text and ids alone: computed once per sample, not per step.
            cache_key = (text, tuple(ids))
            if cache_key not in self._alignments:
                self._alignments[cache_key] = align_tokens(
                    text, ids, self.lvlm_tokenizer, t5_tokenizer, self.config.token_alignment
                )
            pairs = self._alignments[cache_key]
            states = self.text_conditioning(text)["prompt_embeds"][0]
            pairs = [(s, t) for s, t in (pairs or []) if s < student.shape[0] and t < states.shape[0]]
            if not pairs:
                continue
            src, dst = zip(*pairs)
            preds.append(student[list(src)])
            targets.append(states[list(dst)])
        if not preds:
            return students[0].sum() * 0.0  # no alignable sample: a zero loss that keeps the graph
        return F.mse_loss(torch.cat(preds).float(), torch.cat(targets).float())

    @property
    def decoder_t5_tokenizer(self) -> PreTrainedTokenizerBase:
        return getattr(self.pipe, self.decoder.text_encoder_components["t5"][1])  # SD3: tokenizer_3

    def target_images(self, keys: Sequence[str]) -> np.ndarray:
        """uint8 images at the calibration size of task-format samples' targets (``{target_key}:taskK``
        keys), read from ``config.target_images`` (the task-format source folder)."""
        from PIL import Image

        from thinkdiff.imaging import open_rgb

        assert self.config.target_images is not None
        folder = Path(self.config.target_images)
        if self._target_files is None:  # the folder is listed once, not on every step
            self._target_files = {}
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                    self._target_files.setdefault(path.stem, path)
        images = []
        for key in keys:
            target = key.rsplit(":task", 1)[0]
            found = self._target_files.get(target)
            if found is None:
                raise FileNotFoundError(f"no target image {target}.* in {folder} for sample {key!r}")
            image = open_rgb(found).resize((self.width, self.height), Image.Resampling.BICUBIC)
            images.append(np.asarray(image))
        return np.stack(images)

    def source_images(self, pixel_values_BCHW: torch.Tensor) -> np.ndarray:
        """uint8 images at the calibration size from BLIP-2-normalised pixels (the 'source' input)."""
        from thinkdiff.data.image_caption import CLIP_MEAN, CLIP_STD

        mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
        x = pixel_values_BCHW.detach().float().cpu() * std + mean
        x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def calibration_loss(
    aligner: Aligner,
    calibration: Calibration,
    batch: LVLMBatch | CLIPBatch,
    proxy: ProxyT5Decoder,
    image_tokens_BND: torch.Tensor | None = None,
    step: int = 0,
) -> torch.Tensor:
    """The configured calibration loss of one micro-batch (see the module docstring); ``step``
    and the batch's keys seed its noise."""
    config = calibration.config
    key = f"{step}:{batch.keys[0]}:{len(batch.keys)}"
    if isinstance(batch, CLIPBatch):
        assert image_tokens_BND is not None
        aligned_BND = aligner(image_tokens_BND)
        students = [
            torch.cat([aligned_BND[i], calibration.text_conditioning(first)["prompt_embeds"][0].to(aligned_BND.dtype)])
            for i, first in enumerate(batch.inputs)
        ]
        texts = [f"{a} {b}" for a, b in zip(batch.inputs, batch.target_texts)]
        clean = None
        if config.calibration_noise == "source":
            images = calibration.source_images(batch.pixel_values_BCHW)
            clean = calibration.decoder.image_latents(calibration.pipe, images)
        loss = calibration.distill(students, texts, clean, key)
        if config.proxy_weight:
            # The proxy loss on the aligned tokens computed above, without a second aligner forward.
            memory, mask = aligned_clip_memory(aligned_BND, proxy, batch)
            loss = loss + config.proxy_weight * proxy.loss(memory, mask, batch.labels_BT)
        return loss
    aligned_BLD = aligner(batch.features_BLH)
    lengths = batch.mask_BL.sum(1).tolist()
    students = [aligned_BLD[i, : int(n)] for i, n in enumerate(lengths)]
    if config.calibration_loss == "regress":
        loss = calibration.regress(students, batch.target_texts, batch.token_ids)
    else:
        flow = config.calibration_loss == "flow"
        clean = None
        if flow or config.calibration_noise == "source":  # the task-format target images' latents
            clean = calibration.decoder.image_latents(calibration.pipe, calibration.target_images(batch.keys))
        loss = calibration.distill(students, batch.target_texts, clean, key, flow=flow)
    if config.proxy_weight:
        # lvlm_loss on the aligned features computed above, without a second aligner forward.
        loss = loss + config.proxy_weight * proxy.loss(aligned_BLD, batch.mask_BL, batch.labels_BT)
    return loss


class CalibrationObjective:
    """Calibration as a training objective: :func:`calibration_loss` against the run's decoder.

    Decoded samples are the proxy T5's reading of the aligned features, as for the proxy objective.
    """

    def __init__(self, calibration: Calibration, frozen: FrozenModels) -> None:
        self.calibration = calibration
        self.frozen = frozen
        self._proxy = ProxyObjective(frozen)

    @classmethod
    def build(cls, config: TrainConfig, frozen: FrozenModels) -> CalibrationObjective:
        from thinkdiff.training.data import load_lvlm_tokenizer

        lvlm_tokenizer = load_lvlm_tokenizer(config.lvlm) if config.variant == "lvlm" else None
        return cls(Calibration(config, frozen.device, frozen.dtype, lvlm_tokenizer), frozen)

    def loss(self, aligner: Aligner, batch: LVLMBatch | CLIPBatch, step: int) -> torch.Tensor:
        tokens = self._proxy.image_tokens(batch) if isinstance(batch, CLIPBatch) else None
        return calibration_loss(aligner, self.calibration, batch, self.frozen.proxy, tokens, step)

    def decode(self, aligner: Aligner, batch: LVLMBatch | CLIPBatch, n: int) -> list[dict[str, str]]:
        return self._proxy.decode(aligner, batch, n)

    def record(self) -> dict[str, Any]:
        return {"objective": "calibrate", "calibrate_from_scratch": self.calibration.config.calibrate_from_scratch}
