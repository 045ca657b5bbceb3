"""The mini FLUX.1: the real ``FluxTransformer2DModel`` at a tiny size, in pixel space, trained with
flow matching on the world's images conditioned on the frozen mini T5 encoder.

Pixel space instead of a VAE: a 32x32 RGB image is pixel-unshuffled by 2 into 12 x 16 x 16 "latents",
which FLUX's own 2x2 packing turns into 64 tokens of 48 channels
(:func:`thinkdiff.pipelines.decoders.pixels_to_latents`). The saved folder is a stock
``FluxPipeline`` with ``vae=None`` plus a ``thinkdiff_decoder.json`` (:func:`write_descriptor`), so
ThinkDiff inference's ``FluxDecoder`` samples it (20 steps, true CFG 3.0, 32 px) and unpacks the
latents into pixels; :meth:`thinkdiff.miniworld.models.MiniWorld.images_from_embeds` does the same.

The training images are the pool's *canonical* renders (:func:`thinkdiff.miniworld.world.canonical`:
the object centred at a fixed size, no specks, no pixel noise): a caption does not say where the
object is or how big, and the nuisances are there for the readers (VLM, vision encoder, judge).

Conditioning is the T5 encoder's states only: the pipeline's CLIP text encoder is a real
``CLIPTextModel`` whose final norm is zero, so its pooled output (FLUX's ``pooled_projections``) is
zero for every text, the way ThinkDiff drives FLUX with a fixed pooled embedding. Training mixes
two prompt layouts, so that both ways of calling the pipeline are in distribution:

- exact length (75% of batches): one caption template per batch, no padding, as ThinkDiff's aligned
  features arrive;
- padded to :data:`MAX_TEXT_TOKENS` with T5's pad states (25%), as ``pipe(prompt=...,
  max_sequence_length=MAX_TEXT_TOKENS)`` encodes text.

10% of captions are dropped to ``""`` (padded to the batch's length) for classifier-free guidance;
the pipeline's ``true_cfg_scale`` then uses ``negative_prompt_embeds`` of the same shape.

Shapes: B batch, L text tokens, D T5 width, N image tokens (64), P packed channels (48).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from thinkdiff.miniworld.components.common import Ema, cosine_lr, save_losses
from thinkdiff.miniworld.components.t5 import T5_D_MODEL
from thinkdiff.miniworld.pool import ScenePool
from thinkdiff.miniworld.sampler import DEFAULT_CFG, DEFAULT_STEPS
from thinkdiff.miniworld.world import IMAGE_SIZE, caption
from thinkdiff.pipelines.decoders import pixels_to_latents, write_pixel_space_descriptor

__all__ = [
    "CLIP_HIDDEN",
    "MAX_TEXT_TOKENS",
    "build_pipeline",
    "build_transformer",
    "images_to_latents",
    "load_pipeline",
    "t5_states",
    "train_flux",
    "write_descriptor",
]

CLIP_HIDDEN = 32
"""Width of the stub CLIP text encoder = the transformer's ``pooled_projection_dim``."""
MAX_TEXT_TOKENS = 16
"""Padded prompt length (``max_sequence_length``) when the pipeline encodes text itself."""
_UNSHUFFLE = 2
_LATENT_CHANNELS = 3 * _UNSHUFFLE**2  # 12
_GRID = IMAGE_SIZE // _UNSHUFFLE  # 16


def build_transformer() -> FluxTransformer2DModel:
    """The mini FLUX.1 transformer: 2 double + 2 single blocks, 4 heads of 32 (1.8M parameters)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=False,
        # RoPE over (text index, row, column); the axes sum to the head dim.
        axes_dims_rope=(8, 12, 12),
    )


def images_to_latents(images_BHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> packed FLUX latents [B, 64, 48] in [-1, 1]."""
    return pixels_to_latents(images_BHWC, _UNSHUFFLE)


def write_descriptor(folder: Path) -> Path:
    """Write the saved pipeline's ``thinkdiff_decoder.json``: pixel space, 32 px, and the sampler
    settings of :mod:`~thinkdiff.miniworld.sampler`."""
    return write_pixel_space_descriptor(
        folder,
        pixel_unshuffle=_UNSHUFFLE,
        sample_size=IMAGE_SIZE,
        max_sequence_length=MAX_TEXT_TOKENS,
        defaults={"num_inference_steps": DEFAULT_STEPS, "true_cfg_scale": DEFAULT_CFG},
    )


def _clip_stub(vocab_size: int, max_positions: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    with torch.no_grad():
        # Zero final norm: every text gets the same (zero) pooled embedding; see the module docstring.
        model.final_layer_norm.weight.zero_()
        model.final_layer_norm.bias.zero_()
    return model.eval()


def build_pipeline(
    transformer: FluxTransformer2DModel, t5_encoder: T5EncoderModel, t5_tokenizer: T5TokenizerFast
) -> FluxPipeline:
    """A stock ``FluxPipeline`` around the mini transformer and mini T5 encoder (no VAE)."""
    import tempfile

    from thinkdiff.tiny.tokenizers import save_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(Path(tmp) / "clip"))
    clip = _clip_stub(len(clip_tokenizer), clip_tokenizer.model_max_length)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5_encoder.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def load_pipeline(folder: Path) -> FluxPipeline:
    """The trained mini FLUX pipeline (``FluxPipeline.from_pretrained`` of the saved folder)."""
    pipe = FluxPipeline.from_pretrained(folder, vae=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def t5_states(
    encoder: T5EncoderModel, tokenizer: T5TokenizerFast, texts: list[str], length: int | None = None
) -> torch.Tensor:
    """T5 encoder states [B, L, D] of texts, as FLUX's pipeline computes them (no attention mask).

    ``length=None``: every text must tokenize to the same length (no padding: the exact layout);
    otherwise pad (with T5's pad token, attended like the pipeline does) or truncate to ``length``.
    """
    if length is None:
        enc = tokenizer(texts, return_tensors=None)
        lengths = {len(ids) for ids in enc.input_ids}
        if len(lengths) != 1:
            raise ValueError(f"texts tokenize to different lengths {sorted(lengths)}; pass length= to pad")
        ids = torch.tensor(enc.input_ids)
    else:
        ids = tokenizer(
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
    return encoder(input_ids=ids).last_hidden_state


def _caption_batch(
    pool: ScenePool, idx: list[int], rng: random.Random, padded: bool
) -> tuple[list[str], int | None]:
    """Captions for a batch: one template per batch (exact length) unless ``padded``; 10% empty."""
    template = {k: rng.random() < 0.5 for k in ("color", "texture", "background")}
    texts = []
    for i in idx:
        scene = pool.scenes[i]
        if padded:
            template = {k: rng.random() < 0.5 for k in ("color", "texture", "background")}
        texts.append(
            caption(
                scene.shape,
                scene.color if template["color"] else None,
                scene.texture if template["texture"] else None,
                scene.background if template["background"] else None,
            )
        )
    length = MAX_TEXT_TOKENS if padded else None
    # Condition dropout: "" padded to the batch's length with pad states, the CFG negative.
    drop = [rng.random() < 0.1 for _ in idx]
    if any(drop):
        texts = ["" if d else t for d, t in zip(drop, texts)]
        if length is None:
            length = len(next(t for t in texts if t).split()) + 1 if any(texts) else 1
    return texts, length


def train_flux(
    folder: Path,
    t5_folder: Path,
    pool: ScenePool,
    *,
    seed: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    progress: bool = True,
) -> dict:
    """Train the mini FLUX on ``pool`` and save the whole pipeline into ``folder``."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from thinkdiff.models.proxy_decoder import _quiet_transformers

    tokenizer = AutoTokenizer.from_pretrained(t5_folder)
    with _quiet_transformers():  # the encoder alone: the decoder's weights are expected leftovers
        encoder = T5EncoderModel.from_pretrained(t5_folder).eval().requires_grad_(False)
    torch.manual_seed(seed)
    transformer = build_transformer()
    ema = Ema(transformer, ema_decay)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(f"flux-train:{seed}")
    gen = torch.Generator().manual_seed(seed)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, _GRID // 2, _GRID // 2, "cpu", torch.float32)
    pooled = torch.zeros(batch_size, CLIP_HIDDEN)
    losses: list[float] = []
    started = time.perf_counter()
    transformer.train()
    for step in tqdm(range(steps), desc="mini FLUX", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(200, steps // 10 + 1))
        idx = [rng.randrange(len(pool)) for _ in range(batch_size)]
        texts, length = _caption_batch(pool, idx, rng, padded=rng.random() < 0.25)
        text_BLD = t5_states(encoder, tokenizer, texts, length)
        x0_BNP = images_to_latents(pool.canonical_images[idx])
        noise_BNP = torch.randn(x0_BNP.shape, generator=gen)
        # Logit-normal times (SD3 / FLUX): most weight on mid-range noise levels.
        t_B = torch.sigmoid(torch.randn(batch_size, generator=gen))
        xt_BNP = (1 - t_B[:, None, None]) * x0_BNP + t_B[:, None, None] * noise_BNP
        txt_ids = torch.zeros(text_BLD.shape[1], 3)
        pred_BNP = transformer(
            hidden_states=xt_BNP,
            timestep=t_B,
            pooled_projections=pooled,
            encoder_hidden_states=text_BLD,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred_BNP, noise_BNP - x0_BNP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema.update(transformer, step)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    ema.copy_to(transformer)
    pipe = build_pipeline(transformer, encoder, tokenizer)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    write_descriptor(folder)
    record = {"steps": steps, "batch_size": batch_size, "seconds": round(seconds, 1)}
    save_losses(folder / "training.json", losses, **record)
    return record
