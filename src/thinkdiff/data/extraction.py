"""Pre-computing ThinkDiff-LVLM training data: the LVLM describes each image, its token features are saved.

For every image of a source, one of the paper's 16 description prompts is chosen (seeded by the
sample key), the LVLM samples an answer, and the post-final-norm features of the answer's tokens
are written to feature shards (:mod:`thinkdiff.data.feature_shards`), one output shard per input
shard. What decides the content is :class:`ExtractionSettings`
(:mod:`thinkdiff.data.extraction_settings`); the engines that run the LVLM (``hf``, ``vllm``) are
in :mod:`thinkdiff.data.lvlm_engines`; one shard's work is in :mod:`thinkdiff.data.shard_extraction`.

The work is split by input shard across ranks, and a rerun skips the shards that are complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thinkdiff.data.extraction_settings import DESCRIPTION_PROMPTS, ExtractionSettings, recorded_model_name
from thinkdiff.data.feature_shards import read_shard_records, shard_name, write_index, write_json_atomic
from thinkdiff.data.lvlm_engines import (
    ENGINES,
    VLLM_MIN_VERSION,
    VLLM_TEXT_TOKENS,
    FeatureEngine,
    Generated,
    HFEngine,
    VLLMEngine,
    make_engine,
    vllm_engine_args,
    vllm_install_problem,
)
from thinkdiff.data.shard_extraction import extract_shard
from thinkdiff.data.sharding import rank_and_world_size
from thinkdiff.data.sources import SourceShard, SourceSpec, list_source_shards
from thinkdiff.utils import compare_settings, record_changes, remove_debris, temporary_path

__all__ = [
    "DESCRIPTION_PROMPTS",
    "ENGINES",
    "VLLM_MIN_VERSION",
    "VLLM_TEXT_TOKENS",
    "ExtractionSettings",
    "ExtractionSummary",
    "FeatureEngine",
    "Generated",
    "HFEngine",
    "VLLMEngine",
    "check_settings_before_loading",
    "extract_features",
    "make_engine",
    "merge",
    "recorded_model_name",
    "vllm_engine_args",
    "vllm_install_problem",
    "write_report",
]

logger = logging.getLogger(__name__)

SETTINGS_NAME = "extraction.json"
REPORT_NAME = "report.json"
SKIPPED_NAME = "skipped.jsonl"
CHANGES_NAME = "changes.jsonl"



@dataclass
class ExtractionSummary:
    """What one process did."""

    rank: int
    world_size: int
    shards_assigned: int
    shards_done_before: int = 0
    shards_written: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples lost, per reason."""
    shard_errors: dict[str, int] = field(default_factory=dict)
    """Failures of a shard's stream itself (e.g. a damaged tar), per reason; the samples they cost
    are counted in :attr:`skipped`."""
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_written / self.samples_written if self.samples_written else 0.0

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"
        if self.shard_errors:
            skipped += " (shard errors: " + ", ".join(f"{k} {v}" for k, v in self.shard_errors.items()) + ")"
        return (
            f"rank {self.rank}/{self.world_size}: {self.shards_written} shards written, "
            f"{self.shards_done_before} already complete (of {self.shards_assigned}); "
            f"{self.samples_written} samples, skipped: {skipped}; "
            f"{self.bytes_per_sample / 1024:.1f} KiB/sample; "
            f"{self.samples_per_second:.2f} samples/s over {self.seconds:.1f} s"
        )


def _run_settings(
    model_name: str, shards: Sequence[SourceShard], settings: ExtractionSettings, batch_size: int
) -> dict[str, Any]:
    return {
        "model": model_name,
        "source_shards": [s.name for s in shards],
        **asdict(settings),
        "prompts": list(settings.prompts),
        # The batch decides the sampling seeds and the padding: a redone shard must match.
        "batch_size": batch_size,
    }


def check_settings_before_loading(
    out_dir: str | Path,
    model: str,
    source: SourceSpec,
    settings: ExtractionSettings,
    *,
    batch_size: int,
    engine: str,
    hf_features: str | None,
    allow_change: Sequence[str] = (),
) -> None:
    """The settings check of :func:`extract_features`, on what is known before the LVLM is loaded
    (a refused rerun should not first load a 7B model); nothing is written."""
    if not (Path(out_dir) / SETTINGS_NAME).is_file():
        return
    shards = list_source_shards(source, samples_per_shard=settings.samples_per_shard)
    current = {
        **_run_settings(recorded_model_name(model), shards, settings, batch_size),
        "engine": engine,
        "hf_features": hf_features if engine == "hf" else None,
    }
    _check_settings(Path(out_dir), current, allow_change, write=False)


def _check_settings(
    out_dir: Path, current: dict[str, Any], allow_change: Sequence[str] = (), *, write: bool = True, record: bool = True
) -> None:
    """Write the run's settings, or check that a rerun into the same folder uses the same ones.

    A difference is refused (naming the fields) unless the field is in ``allow_change``; with
    ``write``, an allowed change becomes the folder's setting and is appended to ``changes.jsonl``
    (by the process with ``record``, so ranks do not record it twice).
    """
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        if write:
            write_json_atomic(path, current)
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} (the settings this folder was written with): {exc}") from exc
    known = sorted(set(current) | set(saved))
    unknown = sorted(set(allow_change) - set(known))
    if unknown:
        raise ValueError(f"--allow-change: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    changes = compare_settings(saved, current, allowed=allow_change, where=out_dir)
    if not write:
        return
    # Settings an older version did not record are taken as this run's (they cannot be compared).
    if changes or set(current) - set(saved):
        write_json_atomic(path, {**saved, **current})
    if record:
        for change in changes:
            logger.warning("%s: %s changed from %r to %r (allowed)", out_dir, change["field"], change["old"], change["new"])
        record_changes(out_dir / CHANGES_NAME, changes)


def _engine_settings(engine: FeatureEngine) -> dict[str, Any]:
    """What of the engine decides the features besides :class:`ExtractionSettings`: its kind, how
    the hf engine gets the features, the LVLM's dtype and its image-size cap."""
    extractor = getattr(engine, "extractor", None)
    model = getattr(extractor, "model", None)
    image_processor = getattr(getattr(extractor, "processor", None), "image_processor", None)
    size = getattr(image_processor, "size", None)
    return {
        "engine": engine.name,
        "hf_features": getattr(engine, "features", None),
        "dtype": str(getattr(model, "dtype", None)),
        # A dict, or transformers' SizeDict (no keys(); dict() of it keeps the fields that are set).
        "image_size": dict(sorted(dict(size).items())) if size is not None else None,
    }


def _expected_samples(shard: SourceShard) -> int | None:
    """Samples in a shard when known without reading it (slices; img2dataset's ``*_stats.json``)."""
    if shard.stop is not None:
        return shard.stop - shard.start
    stats = Path(shard.url).with_name(Path(shard.url).stem + "_stats.json")
    try:
        with open(stats, encoding="utf-8") as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extract_features(
    source: SourceSpec,
    out_dir: str | Path,
    engine: FeatureEngine,
    settings: ExtractionSettings | None = None,
    *,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    allow_change: Sequence[str] = (),
) -> ExtractionSummary:
    """Write the feature shards of this rank's input shards into ``out_dir``; skip complete ones.

    Input shard ``i`` becomes output shard ``shard-{i:06d}``; rank ``r`` of ``w`` takes shards
    ``r, r + w, ...`` (``rank``/``world_size`` default to the environment, see
    :func:`thinkdiff.data.sharding.rank_and_world_size`). Ends by merging every complete shard into
    ``index.json`` and writing ``report.json`` / ``skipped.jsonl``. A rerun must use the settings
    the folder was written with, except those named in ``allow_change`` (recorded in
    ``changes.jsonl``).
    """
    from tqdm.auto import tqdm

    settings = settings or ExtractionSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = rank_and_world_size(rank, world_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file")
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_debris(out_dir)  # of killed runs; a live rank's temporary files are kept
    if removed:
        logger.info("%s: removed %d temporary files of killed runs: %s", out_dir, len(removed), ", ".join(removed))
    shards = list_source_shards(source, samples_per_shard=settings.samples_per_shard)
    _check_settings(
        out_dir,
        {**_run_settings(engine.model, shards, settings, batch_size), **_engine_settings(engine)},
        allow_change,
        record=rank == 0,
    )
    mine = shards[rank::world_size]
    done = {r["name"] for r in read_shard_records(out_dir)}
    todo = [s for s in mine if shard_name(s.index) not in done]
    summary = ExtractionSummary(rank, world_size, len(mine), shards_done_before=len(mine) - len(todo))
    logger.info(
        "rank %d/%d: %d of %d input shards to do (%d already complete)",
        rank, world_size, len(todo), len(mine), summary.shards_done_before,
    )  # fmt: skip

    expected = [_expected_samples(s) for s in todo]
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    shard_errors: Counter[str] = Counter()
    with tqdm(
        total=sum(e for e in expected if e is not None) or None,
        unit="sample",
        desc=f"rank {rank}" if world_size > 1 else "extract",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for i, shard in enumerate(todo):
            record = extract_shard(shard, out_dir, engine, settings, batch_size, bar)
            summary.shards_written += 1
            summary.samples_written += record["num_samples"]
            summary.bytes_written += sum(f["bytes"] for f in record["files"].values())
            counts.update(record["skipped"])
            shard_errors.update(record.get("shard_errors", {}))
            # Re-estimate the total for the ETA; shards of unknown size (tars without img2dataset's
            # stats) count as the mean of the shards done so far.
            mean = summary.samples_written / summary.shards_written
            rest = expected[i + 1 :]
            bar.total = bar.n + int(sum(e if e is not None else mean for e in rest))
            bar.refresh()
    summary.seconds = time.perf_counter() - started
    summary.skipped = dict(sorted(counts.items()))
    summary.shard_errors = dict(sorted(shard_errors.items()))
    merge(out_dir)
    return summary


def merge(out_dir: str | Path) -> dict[str, Any]:
    """Rebuild ``index.json``, ``report.json`` and ``skipped.jsonl`` from the complete shards.

    Each rank does this when it finishes; run it once more after all ranks of a multi-node run
    are done (``thinkdiff extract-features --merge-only``). Returns the report.
    """
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {SETTINGS_NAME}: not an extract-features output folder")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    index = write_index(out_dir, num_source_shards=len(saved["source_shards"]), model=saved["model"])
    return write_report(out_dir, index)


def write_report(out_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.json`` (totals, lost samples per reason, shard stream errors per reason, bytes
    per sample) and ``skipped.jsonl`` (one line per skipped sample or shard error: key (empty for a
    shard error), shard, reason, detail) from the complete shards."""
    out_dir = Path(out_dir)
    records = read_shard_records(out_dir)
    tmp = temporary_path(out_dir / SKIPPED_NAME)
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            for skip in record.get("skipped_samples", []):
                f.write(json.dumps(skip, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / SKIPPED_NAME)
    total_bytes = sum(f["bytes"] for r in records for f in r["files"].values())
    feature_bytes = sum(r["files"]["features"]["bytes"] for r in records)
    samples = index["num_samples"]
    report = {
        "complete": index["complete"],
        "num_shards": index["num_shards"],
        "num_source_shards": index["num_source_shards"],
        "num_samples": samples,
        "num_tokens": index["num_tokens"],
        "skipped": index["skipped"],
        "shard_errors": dict(sorted(sum((Counter(r.get("shard_errors", {})) for r in records), Counter()).items())),
        "bytes_per_sample": total_bytes / samples if samples else None,
        "feature_bytes_per_sample": feature_bytes / samples if samples else None,
        "extraction_seconds": sum(r.get("seconds", 0.0) for r in records),
    }
    write_json_atomic(out_dir / REPORT_NAME, report)
    return report
