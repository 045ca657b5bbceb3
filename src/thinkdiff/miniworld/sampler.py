"""The mini FLUX sampler's settings: what every image of the world is drawn with unless told otherwise.

They live in their own module because the decoder writes them into its saved folder
(:func:`~thinkdiff.miniworld.components.flux.write_descriptor`) and
:class:`~thinkdiff.miniworld.models.MiniWorld` samples with them.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CFG", "DEFAULT_STEPS"]

DEFAULT_STEPS = 20
"""Euler steps of the mini FLUX sampler."""
DEFAULT_CFG = 3.0
"""True classifier-free guidance scale (negative = the T5 states of the empty text)."""
