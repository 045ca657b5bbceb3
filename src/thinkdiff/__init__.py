"""ThinkDiff: multimodal in-context reasoning for diffusion models through a proxy T5 decoder.

The public API is small and imported lazily so that ``import thinkdiff`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Aligner": "thinkdiff.models.aligner",
    "ProxyT5Decoder": "thinkdiff.models.proxy_decoder",
}

if TYPE_CHECKING:
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

__all__ = ["Aligner", "ProxyT5Decoder", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thinkdiff' has no attribute {name!r}")
