"""Streaming the feature shards for training: shuffled, split across ranks and workers, resumable.

The order of an epoch is planned on sample *indices* before any feature is read: shards in a seeded
order, each read front to back (sequential I/O), rank ``r`` taking every ``world_size``-th sample,
then a seeded shuffle buffer, then optional length bucketing. Workers take whole batch slots in turn
(see :mod:`thinkdiff.data.sharding`), so the stream a rank sees depends only on
``(seed, epoch, rank, world_size, batch_size)``: not on ``num_workers``. Resuming skips the first
``samples_seen`` planned indices without reading them.

Use with ``DataLoader(dataset, batch_size=dataset.batch_size, num_workers=..., collate_fn=...)`` and
call :meth:`FeatureShardDataset.set_epoch` before each epoch, as with ``DistributedSampler``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from thinkdiff.data.feature_shards import FeatureShards
from thinkdiff.data.sharding import rank_and_world_size, select_worker_slots, shuffle_buffer, worker_info

__all__ = ["FeatureShardDataset", "padding_fraction"]


def padding_fraction(batches: Iterable[Sequence[int]]) -> float:
    """Share of padded positions when each batch of lengths is padded to its longest member."""
    real = padded = 0
    for lengths in batches:
        if lengths:
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return 0.0 if padded == 0 else 1.0 - real / padded


class FeatureShardDataset(IterableDataset):
    """Samples of a feature folder as ``{"key", "features" [N, H] bf16, "token_ids" [N] long, "text",
    "epoch"}`` (plus ``"prompt_features"`` [P, H] with ``prompt_features=True``).

    Args:
        root: the output folder of ``thinkdiff extract-features``.
        batch_size: the DataLoader's batch size (workers take whole batches in turn).
        shuffle_buffer: size of the shuffle buffer over sample indices (0 or 1: shards in seeded
            order, samples in stored order).
        seed: base seed of every shuffle.
        rank, world_size: this process's share; default from ``RANK``/``WORLD_SIZE`` (torchrun,
            accelerate) or ``(0, 1)``.
        bucket_batches: if > 0, sort windows of ``bucket_batches * batch_size`` planned samples by
            length and cut them into batches (shuffled), so that a batch holds similar lengths.
        bucket_key: what to sort by instead of the length: ``f(key, length, epoch) -> int``, e.g.
            the random cut of the LVLM objective (:class:`thinkdiff.objectives.CutLength`), which
            sets both the memory and the target length of a sample. Must be picklable.
        prompt_features: also return the prompt-token features (the input-tokens ablation).
        even_ranks: give every rank ``len // world_size`` samples (dropping at most
            ``world_size - 1`` per epoch), so that DDP ranks run the same number of steps.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        bucket_batches: int = 0,
        bucket_key: Callable[[str, int, int], int] | None = None,
        prompt_features: bool = False,
        even_ranks: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_batches < 0:
            raise ValueError(f"bucket_batches must be >= 0, got {bucket_batches}")
        self.shards = FeatureShards(Path(root), prompt_features=prompt_features)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.bucket_batches = bucket_batches
        self.bucket_key = bucket_key
        self.even_ranks = even_ranks
        self.epoch = 0
        self._iterations = 0  # __iter__ calls since set_epoch: persistent workers never see set_epoch
        self._resume: tuple[int, int] | None = None  # (epoch, samples_seen)

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        total = len(self.shards)
        if self.even_ranks:
            return total // self.world_size
        return len(range(self.rank, total, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.epoch = epoch
        self._iterations = 0

    # ---- resume --------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_samples": len(self.shards),
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "bucket_batches": self.bucket_batches,
            "bucket_key": getattr(self.bucket_key, "fingerprint", None),
        }

    def state_dict(self, samples_seen: int) -> dict[str, Any]:
        """The position to resume from, after the training loop consumed ``samples_seen`` samples of
        the current epoch on this rank (the dataset cannot count them itself: DataLoader workers
        read ahead in other processes)."""
        return {"epoch": self.epoch, "samples_seen": int(samples_seen), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration start at the saved epoch and sample.

        Raises ``ValueError`` when the data or the settings that decide the order have changed.
        """
        if state["fingerprint"] != self._fingerprint():
            raise ValueError(
                f"cannot resume the data order: saved with {state['fingerprint']}, now {self._fingerprint()}"
            )
        self.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["samples_seen"])

    # ---- the plan ------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``(shard, row)`` pairs for an epoch, in the order they are yielded."""
        rng = random.Random(f"{self.seed}:{epoch}")  # same on every rank: they must agree on shards
        shard_order = list(range(len(self.shards.shard_sizes)))
        if self.shuffle_buffer > 1:
            rng.shuffle(shard_order)
        stream = ((s, row) for s in shard_order for row in range(self.shards.shard_sizes[s]))
        mine = (item for i, item in enumerate(stream) if i % self.world_size == self.rank)
        rank_rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        planned = list(shuffle_buffer(mine, self.shuffle_buffer, rank_rng))
        planned = planned[: len(self)]
        if self.bucket_batches > 0:
            planned = self._bucket(planned, rank_rng, epoch)
        return planned

    def _sort_key(self, planned: list[tuple[int, int]], epoch: int) -> Callable[[tuple[int, int]], int]:
        lengths = {s: self.shards.lengths(s) for s in {s for s, _ in planned}}
        if self.bucket_key is None:
            return lambda item: lengths[item[0]][item[1]]
        keys = {s: [m["key"] for m in self.shards.metadata(s)] for s in lengths}
        bucket_key = self.bucket_key
        return lambda item: bucket_key(keys[item[0]][item[1]], lengths[item[0]][item[1]], epoch)

    def _bucket(
        self, planned: list[tuple[int, int]], rng: random.Random, epoch: int
    ) -> list[tuple[int, int]]:
        sort_key = self._sort_key(planned, epoch)
        window = self.bucket_batches * self.batch_size
        bucketed: list[tuple[int, int]] = []
        for start in range(0, len(planned), window):
            chunk = sorted(planned[start : start + window], key=sort_key)
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            # A window's last batch may be short; keep it last so that only the epoch's final batch
            # can be short (every earlier window is full).
            full, rest = batches[:-1], batches[-1:]
            rng.shuffle(full)
            bucketed.extend(item for batch in full + rest for item in batch)
        return bucketed

    def planned_padding_fraction(self, epoch: int = 0) -> float:
        """Padding share of this rank's feature batches in ``epoch`` (reads only the offsets)."""
        planned = self.plan(epoch)
        lengths = {s: self.shards.lengths(s) for s in {s for s, _ in planned}}
        token_counts = [lengths[s][row] for s, row in planned]
        return padding_fraction(
            token_counts[i : i + self.batch_size] for i in range(0, len(token_counts), self.batch_size)
        )

    # ---- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch + self._iterations
        self._iterations += 1
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
            self._resume = None  # once (in this process; a worker's copy is dropped after the epoch)
        worker_id, num_workers = worker_info()
        for shard, row in select_worker_slots(
            self.plan(epoch),
            batch_size=self.batch_size,
            worker_id=worker_id,
            num_workers=num_workers,
            skip=skip,
        ):
            # The epoch lets a collator draw different random cuts of the same sample each epoch.
            yield {**self.shards.get(shard, row), "epoch": epoch}
