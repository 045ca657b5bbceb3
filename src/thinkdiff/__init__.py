"""ThinkDiff: multimodal in-context reasoning for diffusion models through a proxy T5 decoder.

The public API is small and imported lazily so that ``import thinkdiff`` stays cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# torchao (the int8/fp8 backend of --quantize) logs, on every import on a torch build it was not
# compiled for, C-extension load failures, torch deprecation notes and a diffusers note about
# loading torchao-serialized checkpoints: none concerns quantizing at load, and they would break
# the CLI's one-line errors. Real errors still raise.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

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
