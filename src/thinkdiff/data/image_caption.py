"""Streaming raw image-caption data for ThinkDiff-CLIP, with BLIP-2's image preprocessing.

Ranks split the input shards (``shards[rank::world_size]`` of a seeded per-epoch shard order, so
no two ranks read the same shard; with fewer shards than ranks, each rank reads them all and keeps
every ``world_size``-th sample). Inside a rank every worker reads the rank's shards (cheap: only
bytes), the undecoded samples pass a seeded shuffle buffer, and workers take whole batch slots in
turn (see :mod:`thinkdiff.data.sharding`); a worker decodes and preprocesses only its own samples.
The order then depends on ``(seed, epoch, rank, world_size, batch_size)`` and not on
``num_workers``, and a resume skips the first ``samples_seen`` positions without decoding them.

Resume is exact when no image fails to decode; each undecodable image before the checkpoint moves
the resume point by one sample (it is only found out when decoding, which skipping avoids).
Ranks may get different numbers of samples (whole shards): train for a number of steps, with each
rank starting its next epoch when its stream ends, rather than waiting for the others.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from thinkdiff.data.sharding import rank_and_world_size, select_worker_slots, shuffle_buffer, worker_info
from thinkdiff.data.sources import SkipLog, SourceSpec, decode_image, iter_raw_samples, list_source_shards
from thinkdiff.imaging import to_rgb

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageCaptionDataset", "blip2_preprocess"]

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def blip2_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """BLIP-2's eval transform: RGB (:func:`thinkdiff.imaging.to_rgb`), bicubic resize to ``size`` x
    ``size``, /255, CLIP mean/std.

    Returns a float32 tensor [3, size, size].
    """
    # Always through to_rgb: an RGB image may still carry an EXIF orientation to apply.
    rgb = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    pixels_HWC = np.asarray(rgb, dtype=np.float32) / 255.0
    pixels_HWC = (pixels_HWC - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(
        CLIP_STD, dtype=np.float32
    )
    return torch.from_numpy(np.ascontiguousarray(pixels_HWC.transpose(2, 0, 1)))


class ImageCaptionDataset(IterableDataset):
    """Samples ``{"key", "pixel_values" [3, size, size], "caption"}`` of an image-caption source.

    Args:
        source: tar shards (brace pattern, list or folder), an image folder or a manifest (see
            :func:`thinkdiff.data.sources.list_source_shards`).
        image_size: side of the square BLIP-2 input (224).
        batch_size: the DataLoader's batch size (workers take whole batches in turn).
        shuffle_buffer: samples held for shuffling (0 or 1: stored order, shards unshuffled).
        seed: base seed of every shuffle.
        rank, world_size: this process's share; default from the environment (see
            :func:`thinkdiff.data.sharding.rank_and_world_size`).
        samples_per_shard: slice size for folder and manifest sources.
    """

    def __init__(
        self,
        source: SourceSpec,
        *,
        image_size: int = 224,
        batch_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        samples_per_shard: int = 1000,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source_shards = list_source_shards(source, samples_per_shard=samples_per_shard)
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.epoch = 0
        self._iterations = 0
        self._resume: tuple[int, int] | None = None
        self.skips = SkipLog()  # in the process that iterates (a worker's own copy)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.epoch = epoch
        self._iterations = 0

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "source_shards": [s.name for s in self.source_shards],
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self, samples_seen: int) -> dict[str, Any]:
        """The position to resume from after the loop consumed ``samples_seen`` samples this epoch."""
        return {"epoch": self.epoch, "samples_seen": int(samples_seen), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration start at the saved epoch and position (``ValueError`` if the
        source or the order settings changed)."""
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("cannot resume the data order: the source or the order settings changed")
        self.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["samples_seen"])

    @property
    def split_by_sample(self) -> bool:
        """Fewer shards than ranks (a small validation set): every rank reads all shards and keeps
        every ``world_size``-th sample, instead of taking whole shards."""
        return len(self.source_shards) < self.world_size

    def rank_shards(self, epoch: int) -> list[int]:
        """Indices of the source shards this rank reads in ``epoch``, in reading order."""
        order = list(range(len(self.source_shards)))
        if self.shuffle_buffer > 1:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)  # the same on every rank
        return order if self.split_by_sample else order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch + self._iterations
        self._iterations += 1
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip, self._resume = self._resume[1], None
        worker_id, num_workers = worker_info()

        raw = (
            sample
            for i in self.rank_shards(epoch)
            for sample in iter_raw_samples(self.source_shards[i], self._skip)
        )
        if self.split_by_sample:
            raw = (sample for n, sample in enumerate(raw) if n % self.world_size == self.rank)
        shuffled = shuffle_buffer(raw, self.shuffle_buffer, random.Random(f"{self.seed}:{epoch}:{self.rank}"))
        for item in select_worker_slots(
            shuffled, batch_size=self.batch_size, worker_id=worker_id, num_workers=num_workers, skip=skip
        ):
            sample = decode_image(item, self._skip)
            if sample is not None:
                yield {
                    "key": sample.key,
                    "pixel_values": blip2_preprocess(sample.image, self.image_size),
                    "caption": sample.caption,
                }

    def _skip(self, skip: Any) -> None:
        # Every worker reads every caption of its rank; only the worker that owns a sample reports
        # its undecodable image, but caption problems would be reported num_workers times.
        worker_id, _ = worker_info()
        if worker_id == 0 or skip.reason in ("unreadable_image", "truncated_image"):
            self.skips(skip)
            # A dropped training sample must not pass silently (the log is the run's record of it).
            logger.warning("skipped %s of %s (%s): %s", skip.key or "-", skip.shard, skip.reason, skip.detail)
