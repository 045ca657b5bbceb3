"""Writing a generation's results: the image (or video) and its JSON sidecar, atomically.

The one writer of generation outputs, shared by ``thinkdiff generate`` and ``thinkdiff app``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from thinkdiff.pipelines.pipeline_thinkdiff import ThinkDiffPipeline
    from thinkdiff.pipelines.requests import Request
    from thinkdiff.pipelines.results import ThinkDiffOutput

__all__ = ["write_output"]

logger = logging.getLogger(__name__)


def _write_image(image: Image.Image, path: Path) -> None:
    from thinkdiff.utils import atomic_write_bytes

    buffer = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    image.convert("RGB").save(buffer, format=fmt)
    atomic_write_bytes(path, buffer.getvalue())


def _write_video(frames: list[Image.Image], path: Path, fps: int) -> dict[str, Any]:
    """MP4 through diffusers' ``export_to_video``; PNG frames + a GIF if no video writer works."""
    from diffusers.utils import export_to_video

    from thinkdiff.storage import storage_failure
    from thinkdiff.utils import temporary_path

    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer picks its format from the suffix, so the video is written under its own name
    # inside a temporary folder named like every temporary file here (.NAME.HOST-PID.tmp, which
    # remove_debris clears once its process is dead), then renamed into place.
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a dead process's of the same id
    try:
        tmp.mkdir()
        export_to_video(frames, str(tmp / path.name), fps=fps)
        os.replace(tmp / path.name, path)
        return {}
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError) as error:
        if storage_failure(error) is not None:
            raise  # a full or read-only disk would fail the frames too: said once, by the command line
        # AttributeError: export_to_video's word for imageio without an ffmpeg.
        logger.warning("could not write %s (%s); writing PNG frames and a GIF instead", path, error)
        reason = f"{type(error).__name__}: {error}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    frames_dir = path.with_name(f"{path.stem}_frames")
    frames_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        _write_image(frame, frames_dir / f"{i:04d}.png")
    gif = path.with_suffix(".gif")
    buffer = io.BytesIO()
    from thinkdiff.utils import atomic_write_bytes

    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0
    )
    atomic_write_bytes(gif, buffer.getvalue())
    return {"video_fallback": {"frames": str(frames_dir), "gif": str(gif), "reason": reason}}


def _jsonable_items(items: Sequence[Any]) -> list[dict[str, str]]:
    return [{"text": it} if isinstance(it, str) else {"image": os.fspath(it)} for it in items]


def _sidecar(
    pipe: ThinkDiffPipeline,
    request: Request,
    index: int,
    output: ThinkDiffOutput,
    path: Path,
    batch_size: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    import dataclasses

    from thinkdiff import __version__

    record = {
        "output": path.name,
        "inputs": {"items": _jsonable_items(request.items), "extra_text": request.extra_text},
        "mode": pipe.mode,
        "seed": request.seed,
        "lvlm_text": output.lvlm_texts[index],
        "settings": output.settings[index],
        "conditioning": dataclasses.asdict(pipe.settings),
        "conditioning_sources": pipe.settings_sources,
        # This request's instruction, hint and QCD weight (job overrides included).
        "lvlm": pipe.lvlm_conditioning(request) if pipe.mode != "clip" else None,
        "components": pipe.components,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "offload": pipe.decoder.offload,
        "quantize": pipe.quantize,
        "transformer_file": None if pipe.decoder.transformer_file is None else str(pipe.decoder.transformer_file),
        # Stages run once for a whole batch of requests: these are the batch's times.
        "timings": {k: round(v, 4) for k, v in output.timings.items()},
        "timings_cover_requests": batch_size,
        "thinkdiff_version": __version__,
        **extra,
    }
    if output.peak_memory:
        record["peak_memory_bytes"] = output.peak_memory
    if request.metadata.get("job"):
        record["job"] = request.metadata["job"]
    return record


def write_output(
    pipe: ThinkDiffPipeline,
    request: Request,
    index: int,
    output: ThinkDiffOutput,
    path: Path,
    *,
    batch_size: int = 1,
    fps: int = 8,
) -> dict[str, Any]:
    """Write result ``index`` of a pipeline call to ``path`` and its JSON sidecar beside it.

    The one writer of generation outputs (``thinkdiff generate`` and ``thinkdiff app``): the image
    (or video) and ``path.with_suffix(".json")``, both atomically. ``batch_size`` is how many
    requests the call ran (its timings cover them all). Returns the sidecar's record.
    """
    from thinkdiff.utils import atomic_write_text

    if pipe.decoder_spec.kind == "video":
        extra = _write_video(output.videos[index], path, fps)
    else:
        _write_image(output.images[index], path)
        extra = {}
    record = _sidecar(pipe, request, index, output, path, batch_size, extra)
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return record
