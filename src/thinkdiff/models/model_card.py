"""Model cards: the ``README.md`` with Hugging Face Hub metadata that every exported model folder gets.

A card is rendered from the folder's :class:`~thinkdiff.models.model_info.ThinkDiffInfo` alone, so
``thinkdiff train``, ``thinkdiff convert-official`` and the miniature world all write the same kind
of card through :func:`~thinkdiff.models.bundle.save_model`. What the card states comes from
``info.extra`` (the training config, data, steps, final losses, measured numbers); nothing is
typed in. The license is not known to us (an aligner inherits the terms of the models it connects:
FLUX.1-dev is non-commercial), so it is left for the user to fill in before publishing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinkdiff.models.loading import TINY_PREFIX
from thinkdiff.models.model_info import ThinkDiffInfo

__all__ = ["CARD_FILE", "hub_base_models", "published_paths", "render_model_card"]

CARD_FILE = "README.md"

_VARIANT_TITLE = {"lvlm": "ThinkDiff-LVLM", "clip": "ThinkDiff-CLIP"}
_PAPER = "https://arxiv.org/abs/2502.10458"


def _is_hub_id(name: str) -> bool:
    """A hub id is ``owner/name`` that is neither a local path nor an offline-kit ``tiny:`` model."""
    if not name or name.startswith((TINY_PREFIX, "/", ".", "~")) or ":" in name:
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).expanduser().exists()


def _is_local_path(value: str) -> bool:
    """A path on this machine (``/home/alice/runs/x``, ``runs/feat/task``, ``~/m``), as opposed to a
    hub id (``owner/name``), an offline-kit ``tiny:`` name, a URL or a plain word."""
    if value.startswith(TINY_PREFIX) or "://" in value:
        return False
    return value.startswith(("/", "~", "./", "../")) or ("/" in value and not _is_hub_id(value))


def published_paths(values: Any) -> dict[str, str]:
    """The local paths among ``values`` (a ``thinkdiff.json`` object, searched through), each with
    what is published in its place: its last name only (``/home/alice/runs/a/model`` -> ``model``).

    A folder is published as it is, minus where it lies on this machine (a privacy matter: a home
    folder names its user); hub ids are kept whole. The local folder keeps its full record.
    """
    if isinstance(values, str):
        return {values: Path(values).name or values} if _is_local_path(values) else {}
    found: dict[str, str] = {}
    for value in values.values() if isinstance(values, dict) else values if isinstance(values, list) else ():
        found.update(published_paths(value))
    return found


def hub_base_models(info: ThinkDiffInfo) -> list[str]:
    """The Hub ids among the models an aligner connects: the source model, the proxy T5, the decoder."""
    names = [info.source_model, info.proxy_t5, info.diffusion_decoder]
    return [n for i, n in enumerate(names) if _is_hub_id(n) and n not in names[:i]]


def _metadata(info: ThinkDiffInfo) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="thinkdiff",
        pipeline_tag="text-to-image",
        base_model=hub_base_models(info) or None,
        tags=["thinkdiff", f"thinkdiff-{info.variant}", "aligner", "multimodal-in-context-reasoning"],
    )
    # The license is the user's call: the aligner inherits its base models' terms.
    return data.to_yaml() + "\n# license: fill in before publishing (see 'License' below)\n"


def _rows(values: dict[str, Any]) -> list[str]:
    lines = ["| field | value |", "|---|---|"]
    for key, value in values.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"| `{key}` | {shown.replace('|', '/')} |")
    return lines


def render_model_card(info: ThinkDiffInfo) -> str:
    """The card's Markdown: Hub YAML metadata, what the model is, how it was made, how to load it."""
    extra = dict(info.extra)
    measured = extra.pop("measured", None)
    title = _VARIANT_TITLE[info.variant]
    reads = (
        f"the features of the tokens that `{info.source_model}` generates"
        if info.features == "generated"
        else f"the features of the prompt tokens of `{info.source_model}` (input-token ablation)"
    )
    if info.variant == "clip":
        reads = f"the pooled vision tokens of `{info.source_model}`"
    lines = [
        "---",
        _metadata(info).rstrip("\n"),
        "---",
        "",
        f"# {title} aligner",
        "",
        f"A [ThinkDiff]({_PAPER}) aligner (`Linear -> GELU -> Linear -> RMSNorm`, {info.in_dim} -> "
        f"{info.out_dim}) that maps {reads} into the T5 prompt space of `{info.diffusion_decoder}`. "
        f"It was trained against the frozen decoder of `{info.proxy_t5}` as a proxy.",
        "",
        "## Models it connects",
        "",
        f"- source model: `{info.source_model}`",
        f"- proxy T5 (training only): `{info.proxy_t5}`",
        f"- diffusion decoder: `{info.diffusion_decoder}`",
        "",
        "## How it was made",
        "",
    ]
    if extra:
        lines += _rows(extra)
    else:
        lines.append("No provenance was recorded for this folder.")
    lines += ["", "## Measured", ""]
    if measured:
        lines += _rows(measured)
    else:
        lines.append(
            "Nothing has been measured for this folder yet (`thinkdiff eval cobsat` measures CoBSAT)."
        )
    lines += [
        "",
        "## How to use it",
        "",
        "```bash",
        "pip install thinkdiff",
        f"thinkdiff generate --model MODEL_DIR --mode {info.variant} --image a.png --text 'a dog' "
        "--image b.png --text 'a cat' --text 'red' --out out/",
        "```",
        "",
        "```python",
        "from thinkdiff.pipelines import Request, ThinkDiffPipeline",
        "",
        'pipe = ThinkDiffPipeline.from_pretrained("MODEL_DIR")',
        'out = pipe(Request(["a dog", "a.png", "a cat", "b.png", "red"], seed=0))',
        "```",
        "",
        "## License",
        "",
        "Not set by the exporter. The aligner is a derivative of the models above and inherits their "
        "terms; FLUX.1-dev, for one, is released under a non-commercial license. Add a `license:` "
        "field to the metadata before publishing.",
        "",
    ]
    return "\n".join(lines)
