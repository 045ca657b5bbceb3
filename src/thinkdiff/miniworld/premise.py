"""The premise test: does the proxy objective transfer to FLUX when the source features are perfect?

ThinkDiff trains its aligner against the frozen T5 *decoder* and hopes FLUX, which reads the T5
*encoder*'s states, draws from the result. :func:`proxy_transfer` checks that premise with no VLM in
the way: oracle features of a caption, an aligner learnt with the proxy loss, FLUX drawing the
held-out captions, the judge reading them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from thinkdiff.miniworld.experiments import clip_test_scenes, mean_cosine
from thinkdiff.miniworld.judge import attribute_accuracy
from thinkdiff.miniworld.world import Scene, full_caption, sample_scene, scene_rng

if TYPE_CHECKING:
    from thinkdiff.miniworld.models import MiniWorld

__all__ = ["TRANSFER_CALIBRATED", "TRANSFER_CEILING", "TRANSFER_MAPPED", "TRANSFER_SOURCES", "proxy_transfer"]

logger = logging.getLogger(__name__)

TRANSFER_SOURCES: tuple[str, ...] = ("T5 encoder states", "T5 word embeddings")
"""Oracle source features of :func:`proxy_transfer`: the caption's own T5 encoder states (everything
FLUX reads, one learnt map away), and the T5 input embeddings of its words (no context)."""
TRANSFER_CEILING = "T5 encoder states (FLUX's own input)"
"""The row of :func:`proxy_transfer` where FLUX reads the T5 states themselves (no aligner)."""
TRANSFER_MAPPED = "{source}, then a linear map fitted to T5 states"
"""Row name pattern of a source's aligned features after the fitted linear map."""
TRANSFER_CALIBRATED = "{source}, then calibrated (decoder in the loop)"
"""Row name pattern of the T5-states aligner after calibration (:func:`proxy_transfer`)."""


def proxy_transfer(
    world: MiniWorld,
    *,
    n_train: int = 3000,
    n_test: int = 200,
    train_steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    calibration_steps: int = 0,
    proxy_weight: float = 0.1,
    noise_source: str = "teacher",
    **sampling: Any,
) -> dict[str, Any]:
    """Does the proxy objective transfer to FLUX when the source features are perfect?

    ThinkDiff's premise is that features the frozen T5 *decoder* reads as a caption are also
    features FLUX draws that caption from, since both were trained on the T5 encoder's states. Here
    no VLM is involved: an :class:`~thinkdiff.models.aligner.Aligner` (T5-initialised norm) learns
    from oracle features of a caption (:data:`TRANSFER_SOURCES`) with the proxy loss of the whole
    caption (:meth:`~thinkdiff.models.proxy_decoder.ProxyT5Decoder.loss`, no split), then FLUX draws
    held-out test captions from the aligned features. A loop of its own rather than the trainer:
    the trainer reads LVLM feature shards, whose tokens are the VLM's, not T5's.

    Returns ``n``, ``steps`` (= ``train_steps``), ``batch_size`` and ``rows``: per source (first the
    T5 states themselves, the ceiling) the proxy decoder's exact reconstruction of the caption, the
    mean cosine to the T5 states, the R^2 of a linear map from the aligned tokens to the T5 states
    (fitted on 500 training captions, measured on the test ones), and the judge's reading of
    FLUX's images (per attribute and all four); then the same features after that linear map, a
    correction that needs the T5 *encoder*, which ThinkDiff-LVLM does not use.

    ``calibration_steps``: then continue the T5-states aligner with decoder-in-the-loop calibration
    (velocity distillation + ``proxy_weight`` x the proxy loss, noisy inputs from ``noise_source``,
    'teacher' or 'pure', through :class:`thinkdiff.training.calibration.Calibration`) and add the row
    :data:`TRANSFER_CALIBRATED`.
    """
    import random

    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.objectives import pad_features

    tokenizer = world.t5_tokenizer
    proxy = ProxyT5Decoder.from_pretrained(world.root / "t5", device="cpu", dtype=torch.float32)
    embeddings = proxy.t5.shared.weight.detach()
    rng = scene_rng("proxy-transfer", seed)
    train_scenes = [sample_scene(rng) for _ in range(n_train)]
    test_scenes = clip_test_scenes(n_test, seed + 1)  # half from held-out cells
    ids = {s: torch.tensor(tokenizer(full_caption(s)).input_ids) for s in train_scenes + test_scenes}

    @functools.cache
    def states(scene: Scene) -> torch.Tensor:
        return world.text_embeds([full_caption(scene)])[0]

    sources: dict[str, Callable[[Scene], torch.Tensor]] = dict(
        zip(TRANSFER_SOURCES, (states, lambda scene: embeddings[ids[scene]]), strict=True)
    )
    seeds = [seed * 10_000 + i for i in range(n_test)]
    targets = [states(s) for s in test_scenes]

    def judged(embeds: list[torch.Tensor]) -> dict[str, float]:
        return attribute_accuracy(
            world.judge.read(world.images_from_embeds(embeds, seeds, **sampling)), test_scenes
        )

    results = {
        TRANSFER_CEILING: {
            "proxy_exact": None,
            "cosine": 1.0,
            **judged(targets),
        }
    }
    batch_rng = random.Random(f"proxy-transfer:{seed}")
    for name, source in sources.items():
        torch.manual_seed(seed)
        width = source(train_scenes[0]).shape[-1]
        aligner = Aligner(width, proxy.d_model, norm="t5")
        aligner.init_norm_from_t5(proxy)
        optimizer = torch.optim.AdamW(aligner.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for _ in range(train_steps):
            batch = batch_rng.sample(train_scenes, batch_size)
            memory, mask = pad_features([aligner(source(s)) for s in batch])
            labels = torch.nn.utils.rnn.pad_sequence(
                [ids[s] for s in batch], batch_first=True, padding_value=-100
            )
            loss = proxy.loss(memory, mask, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        aligner.eval()
        with torch.no_grad():
            aligned = [aligner(source(s)) for s in test_scenes]
            memory, mask = pad_features(aligned)
            texts = proxy.generate_text(memory, mask, max_new_tokens=24)
            # How far from the T5 states is the aligned output? Least squares from the aligned
            # tokens of training captions to their T5 states: a high R^2 on the test captions
            # means the decoder pinned the content, and left only a linear change of basis free.
            fit = train_scenes[:500]
            x_fit = torch.cat([_with_bias(aligner(source(s))) for s in fit])
            solution = torch.linalg.lstsq(x_fit, torch.cat([states(s) for s in fit])).solution
            mapped = [_with_bias(a) @ solution for a in aligned]
        t_cat = torch.cat(targets)
        residual = (torch.cat(mapped) - t_cat).pow(2).sum() / (t_cat - t_cat.mean(0)).pow(2).sum()
        results[name] = {
            "proxy_exact": float(np.mean([t.strip() == full_caption(s) for t, s in zip(texts, test_scenes)])),
            "cosine": float(np.mean([mean_cosine(a, t) for a, t in zip(aligned, targets)])),
            "linear_r2": float(1 - residual),
            "final_loss": float(np.mean(losses[-20:])),
            **judged(aligned),
        }
        results[TRANSFER_MAPPED.format(source=name)] = {
            "proxy_exact": None,
            "cosine": float(np.mean([mean_cosine(a, t) for a, t in zip(mapped, targets)])),
            **judged(mapped),
        }
        logger.info("proxy transfer from %s: %s", name, results[name])
        if calibration_steps and name == TRANSFER_SOURCES[0]:
            started = time.perf_counter()
            calibration = _transfer_calibration(world, seed, proxy_weight, noise_source)
            aligner.train()
            calibration_losses = []
            for step in range(calibration_steps):
                batch = batch_rng.sample(train_scenes, batch_size)
                aligned_batch = [aligner(source(s)) for s in batch]
                memory, mask = pad_features(aligned_batch)
                labels = torch.nn.utils.rnn.pad_sequence(
                    [ids[s] for s in batch], batch_first=True, padding_value=-100
                )
                loss = calibration.distill(
                    aligned_batch, [full_caption(s) for s in batch], key=f"premise:{step}"
                )
                loss = loss + proxy_weight * proxy.loss(memory, mask, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                calibration_losses.append(loss.item())
            aligner.eval()
            with torch.no_grad():
                aligned = [aligner(source(s)) for s in test_scenes]
                memory, mask = pad_features(aligned)
                texts = proxy.generate_text(memory, mask, max_new_tokens=24)
            results[TRANSFER_CALIBRATED.format(source=name)] = {
                "proxy_exact": float(
                    np.mean([t.strip() == full_caption(s) for t, s in zip(texts, test_scenes)])
                ),
                "cosine": float(np.mean([mean_cosine(a, t) for a, t in zip(aligned, targets)])),
                "final_loss": float(np.mean(calibration_losses[-20:])),
                "calibration_steps": calibration_steps,
                "noise_source": noise_source,
                "calibration_seconds": round(time.perf_counter() - started, 1),
                **judged(aligned),
            }
    return {"n": n_test, "steps": train_steps, "batch_size": batch_size, "rows": results}


def _transfer_calibration(world: MiniWorld, seed: int, proxy_weight: float, noise_source: str):
    """The project's calibration (FLUX of ``world``) for the premise test's own loop."""
    from thinkdiff.training.calibration import Calibration
    from thinkdiff.training.config import TrainConfig

    config = TrainConfig(
        objective="calibrate",
        split=False,
        data=[str(world.root)],
        diffusion_decoder=str(world.root / "flux"),
        proxy_weight=proxy_weight,
        noise_source=noise_source,
        seed=seed,
    )
    return Calibration(config, torch.device("cpu"), torch.float32)


def _with_bias(x_LD: torch.Tensor) -> torch.Tensor:
    """[L, D] -> [L, D + 1] with a column of ones (an affine least-squares fit)."""
    return torch.cat([x_LD, x_LD.new_ones(len(x_LD), 1)], 1)
