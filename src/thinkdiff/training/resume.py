"""Resuming a run: which checkpoint every rank continues from, and whether the settings still match.

Only rank 0 writes checkpoints, so only rank 0 chooses one (the newest that reads back whole,
skipping broken ones with a warning) and tells the others its name; every rank then reads that
checkpoint from its own view of the run folder and all ranks check together that each loaded the
same step. A node that cannot see it (no shared filesystem) stops every rank with one line,
instead of silently training from scratch beside the others.

A resumed run must be the run it continues: every config field that changes the result is
compared with the checkpoint's record, and a difference is refused unless it is named in
``allow_change``; accepted changes are appended to the run folder's ``changes.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from thinkdiff.training.checkpoint import Checkpoint, CheckpointError, checkpoint_dirs, read_checkpoint
from thinkdiff.training.config import TrainConfig
from thinkdiff.utils import compare_settings, record_changes

logger = logging.getLogger(__name__)

CHANGES_NAME = "changes.jsonl"

RESULT_NEUTRAL_FIELDS = frozenset(
    {
        "output_dir",  # where the run lives, not what it computes
        "val_data",  # validation only reads
        "num_workers",  # the data order does not depend on the workers (thinkdiff.data.sharding)
        "activation_checkpointing",  # recomputes the same activations
        "log_every",
        "val_every",
        "val_batches",
        "decode_every",
        "decode_samples",
        "save_every",
        "keep_last",
        "max_bad_steps",
    }
)
"""Config fields that do not change the trained weights; every other field, including any added
later, is compared on resume."""


def check_allow_change(names: list[str] | tuple[str, ...]) -> None:
    """``ValueError`` for a name in ``--allow-change`` that is not a config field."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"--allow-change: unknown config field(s) {', '.join(unknown)}")


def config_changes(
    saved: dict[str, Any], config: TrainConfig, allow_change: tuple[str, ...], where: Path
) -> list[dict[str, Any]]:
    """The accepted differences between a checkpoint's config and ``config`` (``ValueError`` for the
    others). A field the checkpoint does not record (added since) counts as its default."""
    check_allow_change(allow_change)
    defaults = dataclasses.asdict(TrainConfig())
    recorded = {k: v for k, v in {**defaults, **saved}.items() if k not in RESULT_NEUTRAL_FIELDS}
    current = {k: v for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL_FIELDS}
    return compare_settings(recorded, current, allowed=allow_change, where=where)


def record_config_changes(output_dir: Path, changes: list[dict[str, Any]], checkpoint: Checkpoint) -> None:
    for change in changes:
        logger.warning(
            "resuming %s with %s changed from %r to %r (allowed; recorded in %s)",
            checkpoint.folder, change["field"], change["old"], change["new"], CHANGES_NAME,
        )  # fmt: skip
    record_changes(
        Path(output_dir) / CHANGES_NAME, changes, step=checkpoint.step, checkpoint=str(checkpoint.folder)
    )


def newest_good_checkpoint(output_dir: Path, aligner: nn.Module) -> Checkpoint | None:
    """The newest checkpoint of a run that reads back whole; broken ones are skipped with a warning.

    ``None`` when the run has no checkpoint; ``CheckpointError`` when it has some and none is good
    (starting again from step 0 would quietly throw the run away).
    """
    skipped = []
    for folder in reversed(checkpoint_dirs(output_dir)):
        try:
            checkpoint = read_checkpoint(folder, aligner)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", folder.name, exc)
            skipped.append(f"{folder.name} ({exc})")
            continue
        if skipped:
            logger.warning(
                "resuming from %s, the newest good checkpoint (skipped %d broken: %s)",
                folder.name, len(skipped), "; ".join(skipped),
            )  # fmt: skip
        return checkpoint
    if skipped:
        raise CheckpointError(
            f"no usable checkpoint in {Path(output_dir) / 'checkpoints'}: {'; '.join(skipped)}; "
            "remove or repair them, or start again with --resume never"
        )
    return None


def agree_on_checkpoint(
    accelerator: Accelerator, output_dir: Path, checkpoint: str | Path, aligner: nn.Module
) -> Checkpoint | None:
    """The checkpoint every rank resumes from: rank 0's choice, read by every rank.

    ``checkpoint`` is ``"auto"`` (the run's newest good checkpoint; rank 0 sends its name inside
    the run folder, which each rank resolves in its own ``output_dir``) or a checkpoint folder.
    Raises ``CheckpointError`` on every rank when any rank cannot read it or read another step.
    """
    name: str | None = None
    error: str | None = None
    chosen: Checkpoint | None = None
    if accelerator.is_main_process:
        try:
            if checkpoint == "auto":
                chosen = newest_good_checkpoint(output_dir, aligner)
                if chosen is not None:
                    name = str(chosen.folder.relative_to(output_dir))
            else:
                chosen = read_checkpoint(Path(checkpoint), aligner)
                name = str(checkpoint)
        except CheckpointError as exc:
            error = str(exc)
    if accelerator.num_processes == 1:
        if error is not None:
            raise CheckpointError(error)
        return chosen

    from accelerate.utils import broadcast_object_list, gather_object

    # Objects between this run's own processes (pickled by torch.distributed), not a user's file.
    message = broadcast_object_list([(name, chosen.step if chosen else None, error)], from_process=0)
    name, step, error = message[0]
    if error is not None:
        raise CheckpointError(error)
    if name is None:
        return None
    local_error = None
    if not accelerator.is_main_process:
        folder = Path(output_dir) / name if checkpoint == "auto" else Path(name)
        try:
            chosen = read_checkpoint(folder, aligner)
        except CheckpointError as exc:
            local_error = str(exc)
    report = {
        "rank": accelerator.process_index,
        "step": chosen.step if chosen else None,
        "error": local_error,
    }
    reports = gather_object([report])
    bad = [r for r in reports if r["error"] is not None or r["step"] != step]
    if bad:
        details = "; ".join(f"rank {r['rank']}: {r['error'] or _read_step(r['step'])}" for r in bad)
        raise CheckpointError(
            f"rank 0 resumes from {name} (step {step}) but not every rank can: {details}; every node must "
            "see rank 0's run folder (a shared filesystem, or copy its checkpoints/ to each node)"
        )
    return chosen


def _read_step(step: int | None) -> str:
    return f"read step {step}"
