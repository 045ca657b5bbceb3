"""Who reads what: ranks, dataloader workers, shuffling and resume positions.

Every process in a run must agree on one order without talking to the others. The rule used by the
datasets here: a *rank* owns a fixed part of the data for an epoch (whole input shards, or every
``world_size``-th sample), puts it in one seeded order, and its dataloader workers take turns by
*batch slot*: positions ``[k * batch_size, (k + 1) * batch_size)`` belong to worker ``k % num_workers``.
``torch.utils.data.DataLoader`` collects batches from its workers in exactly that round-robin order, so
the batches a rank trains on do not depend on the number of workers, and "resume after ``n`` samples"
is the same position whatever ``num_workers`` was.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "rank_and_world_size",
    "select_worker_slots",
    "shuffle_buffer",
    "worker_info",
]


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)``.

    Explicit values win; otherwise ``RANK`` / ``WORLD_SIZE`` (set by torchrun and ``accelerate
    launch``), then ``SLURM_PROCID`` / ``SLURM_NTASKS`` (srun without a launcher), else ``(0, 1)``.
    Raises ``ValueError`` when only one of the two is given or the rank is out of range.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})"
        )
    if rank is None:
        for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in os.environ and world_var in os.environ:
                rank, world_size = int(os.environ[rank_var]), int(os.environ[world_var])
                break
        else:
            rank, world_size = 0, 1
    assert world_size is not None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """``(worker_id, num_workers)`` inside a DataLoader worker, ``(0, 1)`` in the main process."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``size`` items (``size <= 1`` passes it through).

    Each incoming item replaces a random buffered one, which is emitted; the rest are emitted in
    random order at the end. Deterministic for a given ``rng`` state.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def select_worker_slots(
    items: Iterable[T], *, batch_size: int, worker_id: int, num_workers: int, skip: int = 0
) -> Iterator[T]:
    """The items of one worker: whole batch slots taken in turn, after the first ``skip`` items.

    Positions are counted after the skip, so a resumed run starts a fresh round of slots at worker 0,
    which is where a new DataLoader starts collecting.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for position, item in enumerate(items):
        position -= skip
        if position >= 0 and (position // batch_size) % num_workers == worker_id:
            yield item
