"""The miniature world's components, each the real architecture at a tiny size, trained from scratch.

- :mod:`~thinkdiff.miniworld.components.t5`: T5 encoder-decoder (the proxy decoder and FLUX's text encoder).
- :mod:`~thinkdiff.miniworld.components.flux`: FLUX.1 transformer, pixel space, flow matching.
- :mod:`~thinkdiff.miniworld.components.vlm`: Qwen2-VL that describes images and answers mini-CoBSAT.
- :mod:`~thinkdiff.miniworld.components.vision`: BLIP-2/EVA ViT trained contrastively against captions.
"""
