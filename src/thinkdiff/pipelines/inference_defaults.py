"""A model folder's inference defaults: its ``thinkdiff.json`` says how it is meant to be run.

One resolution for the pipeline, ``generate`` and the app: the library's defaults
(:class:`~thinkdiff.pipelines.InferenceSettings`, given as ``base``), then the model folder's ``inference``, then what
the caller gives (flags); each setting records where it came from, for the sidecar.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from thinkdiff.models.model_info import INFO_FILE, ThinkDiffInfo

__all__ = ["FROM_FOLDER", "FROM_GIVEN", "FROM_LIBRARY", "resolve_settings"]

FROM_LIBRARY = "library default"
FROM_FOLDER = f"model folder ({INFO_FILE})"
FROM_GIVEN = "given (flag or argument)"


def resolve_settings(
    base: Any, info: ThinkDiffInfo | None, given: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, str]]:
    """The settings a model runs with (``base``, an ``InferenceSettings`` of the library's
    defaults, with the folder's and then the caller's choices over it), and where each came from.

    ``given`` holds the caller's choices (``None`` values: not given). An ``inference`` key the
    settings do not have is a ``ValueError`` naming the folder's file.
    """
    names = {f.name for f in dataclasses.fields(base)}
    folder = dict(info.inference) if info is not None else {}
    unknown = sorted(set(folder) - names)
    if unknown:
        raise ValueError(
            f"{INFO_FILE}: unknown inference settings {unknown}; known: {', '.join(sorted(names))}"
        )
    chosen = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(chosen) - names)
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}")
    settings = dataclasses.replace(base, **{**folder, **chosen})
    sources = {
        name: FROM_GIVEN if name in chosen else FROM_FOLDER if name in folder else FROM_LIBRARY
        for name in sorted(names)
    }
    return settings, sources
