"""One output shard: the LVLM answers one input shard's samples (described one by one, or grouped
into task-format prompts) and the answers' features are written as a feature shard."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from thinkdiff.data.extraction_settings import ExtractionSettings
from thinkdiff.data.feature_shards import FeatureShardWriter, shard_name
from thinkdiff.data.lvlm_engines import FeatureEngine, Generated
from thinkdiff.data.sources import ImageCaptionSample, Skip, SkipLog, SourceShard, iter_samples
from thinkdiff.data.task_prompts import TASK_INSTRUCTION, group_task_prompts
from thinkdiff.pipelines.constants import hinted

__all__ = ["batches", "extract_shard", "extract_task_shard", "skip_fields"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def skip_fields(skips: SkipLog) -> dict[str, Any]:
    """What a shard record says of what was lost: ``skipped`` counts lost *samples* per reason,
    ``shard_errors`` counts failures of the shard's stream itself (no sample key: a damaged tar
    reports its cut sample as ``truncated_sample`` and the stream error once more, which is not a
    second lost sample), and ``skipped_samples`` lists both for ``skipped.jsonl``."""
    lost = [s for s in skips.skips if s.key]
    stream = [s for s in skips.skips if not s.key]
    return {
        "skipped": dict(sorted(Counter(s.reason for s in lost).items())),
        "shard_errors": dict(sorted(Counter(s.reason for s in stream).items())),
        "skipped_samples": [s.to_json() for s in skips.skips],
    }


def _run_engine(
    engine: FeatureEngine, batch: list[ImageCaptionSample], prompts: list[str], seed: int, skips: SkipLog
) -> list[Generated | None]:
    """Run a batch; if it fails, run its samples one by one and skip those that fail alone.

    An image the LVLM cannot take (an extreme aspect ratio the processor rejects, one so large it
    runs out of memory) must cost that sample, not the run.
    """
    try:
        return list(engine.run([s.image for s in batch], prompts, seed))
    except (ValueError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if len(batch) == 1:
            skips(Skip(batch[0].key, batch[0].shard, "lvlm_error", f"{type(exc).__name__}: {exc}"[:500]))
            return [None]
        logger.warning("a batch failed (%s: %s); retrying its samples one by one", type(exc).__name__, exc)
    results: list[Generated | None] = []
    for i, (sample, prompt) in enumerate(zip(batch, prompts)):
        results.extend(_run_engine(engine, [sample], [prompt], seed + 1 + i, skips))
    return results


def extract_shard(
    shard: SourceShard,
    out_dir: Path,
    engine: FeatureEngine,
    settings: ExtractionSettings,
    batch_size: int,
    bar: Any,
) -> dict[str, Any]:
    for stale in out_dir.glob(f"{shard_name(shard.index)}.*.tmp"):
        stale.unlink()  # left by a killed run
    if settings.task_shots:
        return extract_task_shard(shard, out_dir, engine, settings, batch_size, bar)
    skips = SkipLog()
    started = time.perf_counter()
    with FeatureShardWriter(out_dir, shard.index, prompt_features=settings.prompt_features) as writer:
        for batch_index, batch in enumerate(batches(iter_samples(shard, skips), batch_size)):
            prompts = [settings.prompt_for(s.key) for s in batch]
            seed = settings.batch_seed(shard.index, batch_index)
            results = _run_engine(engine, batch, prompts, seed, skips)
            for sample, prompt, result in zip(batch, prompts, results):
                if result is None:
                    continue
                writer.add(
                    sample.key,
                    result.token_ids_N,
                    result.features_NH,
                    prompt=prompt,
                    text=result.text,
                    prompt_features_PH=result.prompt_features_PH,
                    caption=sample.caption,
                )
            bar.update(len(batch))
        # A few samples the LVLM rejects are data; most of a shard failing is a bug or a broken setup,
        # and must not be recorded as a complete shard (a rerun would never redo it).
        failed = [s for s in skips.skips if s.reason == "lvlm_error"]
        if len(failed) >= 2 and 2 * len(failed) > len(failed) + writer.num_samples:
            raise RuntimeError(
                f"{len(failed)} samples of {shard.name} failed in the LVLM, e.g. {failed[0].detail}"
            )
        return writer.finish(
            {
                "source": shard.name,
                "engine": engine.name,
                "seconds": round(time.perf_counter() - started, 3),
                **skip_fields(skips),
            }
        )


def extract_task_shard(
    shard: SourceShard,
    out_dir: Path,
    engine: FeatureEngine,
    settings: ExtractionSettings,
    batch_size: int,
    bar: Any,
) -> dict[str, Any]:
    """One output shard of task-format prompts (``extract_features`` with ``settings.task_shots``).

    Each prompt's key, final text (as ``prompt``), the LVLM's answer (``text``), the target's
    caption and key and the shot count are stored with the answer's features.
    """
    if not hasattr(engine, "run_items"):
        raise ValueError(f"the {engine.name} engine cannot answer interleaved prompts; use the hf engine")
    skips = SkipLog()
    started = time.perf_counter()
    prompts = group_task_prompts(
        iter_samples(shard, skips),
        settings.task_shots,
        text_words=settings.task_text_words,
        instruction=hinted(TASK_INSTRUCTION, settings.hint),
    )
    with FeatureShardWriter(out_dir, shard.index, prompt_features=settings.prompt_features) as writer:
        for batch_index, batch in enumerate(batches(prompts, batch_size)):
            results = engine.run_items([p.items for p in batch], settings.batch_seed(shard.index, batch_index))
            for prompt, result in zip(batch, results):
                writer.add(
                    prompt.key,
                    result.token_ids_N,
                    result.features_NH,
                    prompt=prompt.final_text,
                    text=result.text,
                    prompt_features_PH=result.prompt_features_PH,
                    caption=prompt.target_caption,
                    target_key=prompt.target_key,
                    shots=prompt.shots,
                )
            bar.update(sum(p.shots + 1 for p in batch))
        return writer.finish(
            {
                "source": shard.name,
                "engine": engine.name,
                "task_shots": list(settings.task_shots),
                "seconds": round(time.perf_counter() - started, 3),
                **skip_fields(skips),
            }
        )
