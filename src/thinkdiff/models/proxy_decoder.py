"""The frozen proxy T5 decoder that supervises the aligner during training.

ThinkDiff trains its aligner against the *decoder* of an encoder-decoder T5 (paper section 3.1):
the aligned VLM features play the part of the T5 encoder's output, and the decoder must read the
caption back from them. Since FLUX.1's prompt encoder is a T5 encoder, features that the T5 decoder
understands also live in FLUX's prompt-embedding space.

Only what the variant needs is loaded: the decoder, the LM head, the shared embedding and the
encoder's ``final_layer_norm`` weight (to initialise the aligner's norm). ThinkDiff-CLIP also needs
the encoder itself (it encodes the first part of each caption). Weights are converted tensor by
tensor to the target dtype while reading the checkpoint, so the whole model never exists in fp32.

For Flan-T5-XXL (d_model 4096, 24+24 layers, d_ff 10240, vocab 32128) that means: decoder 6.24B +
LM head 0.13B + shared embedding 0.13B = 6.5B parameters, 13.0 GB in bf16, plus at most one fp32
tensor (0.53 GB) in flight; with the encoder (ThinkDiff-CLIP) another 4.6B parameters, 9.2 GB.

Shapes: B batch, M memory tokens, T target tokens, D d_model, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput

from thinkdiff.models.loading import default_dtype, resolve_model_dir

logger = logging.getLogger(__name__)

DEFAULT_PROXY_T5 = "google/flan-t5-xxl"


class ProxyT5Decoder(nn.Module):
    """A frozen T5 decoder (plus, optionally, its encoder) used as the training proxy.

    Build it with :meth:`from_pretrained`. It never trains: all parameters have
    ``requires_grad=False``, and :meth:`train` only switches dropout when ``dropout=True``
    was asked for (the released code ran T5 with dropout 0.1 active; our default is off).
    """

    def __init__(
        self, t5: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, dropout: bool
    ) -> None:
        super().__init__()
        self.t5 = t5
        self.tokenizer = tokenizer
        self.dropout = dropout
        self.checkpointing = False
        """Activation checkpointing on (:meth:`enable_activation_checkpointing`)."""
        self.has_encoder = t5.encoder.config.num_layers > 0
        self.t5.requires_grad_(False)
        self.train(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_PROXY_T5,
        *,
        with_encoder: bool = False,
        dropout: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> ProxyT5Decoder:
        """Load the proxy from any T5 encoder-decoder checkpoint (hub id or local folder).

        Args:
            name_or_path: e.g. ``google/flan-t5-xxl`` (the released code's proxy) or
                ``google/t5-v1_1-xxl`` (the family of FLUX.1's own text encoder), or a folder.
            with_encoder: also load the T5 encoder (ThinkDiff-CLIP encodes caption parts).
            dropout: keep T5's dropout active in training mode, as the released code did.
            dtype: weight dtype; default bf16 on GPU and fp32 on CPU.
            device: where to put the weights; default CUDA when available.
        """
        # From the hub without the encoder: only the shards holding something besides its blocks
        # (Flan-T5-XXL's encoder is 18 GB in fp32).
        skip_encoder = None if with_encoder else (lambda name: not name.startswith("encoder.block."))
        folder = resolve_model_dir(name_or_path, kind="T5 encoder-decoder", tensors=skip_encoder)
        config = AutoConfig.from_pretrained(folder)
        if not isinstance(config, T5Config) or not config.is_encoder_decoder:
            raise ValueError(
                f"{name_or_path} is not a T5 encoder-decoder checkpoint (model_type={config.model_type!r})"
            )
        device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = dtype or default_dtype(device)
        num_decoder_layers = (
            config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        )
        config.num_decoder_layers = num_decoder_layers
        if not with_encoder:
            # A zero-layer encoder keeps only its final_layer_norm (for the aligner's norm), so the
            # loader skips every encoder block instead of materialising and then dropping it.
            config.num_layers = 0
        if not dropout:
            config.dropout_rate = 0.0
        config.use_cache = False
        with _quiet_transformers():
            t5 = T5ForConditionalGeneration.from_pretrained(
                folder, config=config, dtype=dtype, device_map=str(device)
            )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(t5, tokenizer, dropout=dropout)

    # ------------------------------------------------------------ properties
    @property
    def d_model(self) -> int:
        return self.t5.config.d_model

    @property
    def dtype(self) -> torch.dtype:
        return self.t5.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.t5.lm_head.weight.device

    @property
    def encoder_final_norm_weight(self) -> torch.Tensor:
        """The T5 encoder's ``final_layer_norm`` weight, used to initialise the aligner's norm."""
        return self.t5.encoder.final_layer_norm.weight

    def train(self, mode: bool = True) -> ProxyT5Decoder:
        # The frozen decoder follows the trainer's mode only when dropout was asked for: modules in
        # eval mode would also disable HF activation checkpointing, so dropout is removed at load
        # time (p=0) rather than by eval mode.
        super().train(mode)
        self.t5.train(mode and (self.dropout or self.checkpointing))
        return self

    def enable_activation_checkpointing(self) -> None:
        """Recompute decoder activations in the backward pass (less memory, ~1/3 more compute)."""
        enable = getattr(self.t5, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # the older transformers 5 releases know only the name they later deprecated
            self.t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True
        self.train(self.training)

    # -------------------------------------------------------------- compute
    def check_memory(self, memory_BMD: torch.Tensor, memory_mask_BM: torch.Tensor) -> None:
        if memory_BMD.ndim != 3 or memory_BMD.shape[-1] != self.d_model:
            raise ValueError(
                f"memory must be [batch, tokens, {self.d_model}] (the T5 d_model), got {list(memory_BMD.shape)}"
            )
        if memory_mask_BM.shape != memory_BMD.shape[:2]:
            raise ValueError(
                f"memory mask {list(memory_mask_BM.shape)} does not match memory {list(memory_BMD.shape[:2])}"
            )

    def loss(
        self, memory_BMD: torch.Tensor, memory_mask_BM: torch.Tensor, labels_BT: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy of ``labels`` (padding ``-100``) decoded from the memory.

        The memory is the cross-attention input (what T5's encoder would have produced); decoder
        inputs are the labels shifted right with the pad id as the start token, as in T5.

        The loss is float32 whatever the weights' dtype and the autocast: T5's own loss is taken
        from its bf16 logits without autocast (``--mixed-precision no`` on a GPU), which leaves
        about 3 significant digits in the logged loss and bf16 rounding in the aligner's gradients.
        """
        self.check_memory(memory_BMD, memory_mask_BM)
        labels_BT = labels_BT.to(self.device)
        logits_BTV = self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory_BMD.to(self.dtype)),
            attention_mask=memory_mask_BM.to(self.device),
            decoder_input_ids=self.t5.prepare_decoder_input_ids_from_labels(labels_BT),
            use_cache=False,
        ).logits
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate_text(
        self, memory_BMD: torch.Tensor, memory_mask_BM: torch.Tensor, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy-decode text from aligned memory: what the alignment says to the T5 decoder."""
        self.check_memory(memory_BMD, memory_mask_BM)
        ids_BT = self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory_BMD.to(self.dtype)),
            attention_mask=memory_mask_BM.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        return self.tokenizer.batch_decode(ids_BT, skip_special_tokens=True)

    def encode(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """T5 encoder states ``[B, T, D]`` of token ids (only when loaded ``with_encoder=True``)."""
        if not self.has_encoder:
            raise ValueError("this proxy T5 was loaded without its encoder; load it with with_encoder=True")
        return self.t5.encoder(
            input_ids=input_ids_BT.to(self.device), attention_mask=attention_mask_BT.to(self.device)
        ).last_hidden_state


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected 'unused weights' report when the encoder blocks are skipped."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
