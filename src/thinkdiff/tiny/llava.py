"""A tiny random LLaVA-1.5 style model and processor (the kit's stand-in for the CoBSAT judge)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from thinkdiff.tiny.tokenizers import byte_level_bpe

__all__ = ["LLAVA_CHAT_TEMPLATE", "LLAVA_SPECIAL_TOKENS", "save_tiny_llava"]

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
"""Special tokens of the tiny LLaVA tokenizer; their ids are their positions (unk 0, bos 1,
eos 2, pad 3, image 4), matching Llama's unk/bos/eos = 0/1/2."""

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT:". Images of a turn come
# first, then its text; the assistant's turns end with eos.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_IMAGE_SIZE = 32
_PATCH_SIZE = 8


def _llava_tokenizer() -> PreTrainedTokenizerFast:
    tok = byte_level_bpe(vocab_size=512, special_tokens=LLAVA_SPECIAL_TOKENS)
    # Llama prepends <s> to every sequence (the processor relies on the tokenizer for it).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # batched generation pads on the left
        model_max_length=1024,
    )


def save_tiny_llava(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` into ``path``.

    Vision: CLIP ViT at 32 px, patch 8 (16 patches + CLS, width 32, 2 layers); features from the
    second-to-last layer without CLS (LLaVA-1.5's "default" strategy), so ``<image>`` expands to
    16 tokens. Text: Llama, width 64, 2 layers, vocabulary = the 512-token byte-level BPE.
    Processor: ``CLIPImageProcessorPil`` (no torchvision) + the chat template
    ``"USER: <image>\\n{question} ASSISTANT:"``.
    """
    tokenizer = _llava_tokenizer()
    for token, expected in zip(LLAVA_SPECIAL_TOKENS, range(len(LLAVA_SPECIAL_TOKENS))):
        assert tokenizer.convert_tokens_to_ids(token) == expected, token
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        # CLIP's CLS token: counted by the processor, then dropped by the "default" strategy.
        num_additional_image_tokens=1,
    )

    n_image_tokens = (_IMAGE_SIZE // _PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_IMAGE_SIZE,
            patch_size=_PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
