"""Training data as a stream of optimiser steps: each step is this rank's list of micro-batches.

The datasets (:mod:`thinkdiff.data`) plan their order from ``(seed, epoch, rank, world size, batch
size)`` alone and can skip to any position without reading what they skip, so the data position in
a checkpoint is just ``(epoch, samples seen)``; a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from thinkdiff.data.feature_shards import ShardMismatchError, worker_error_message
from thinkdiff.training.config import TrainConfig

logger = logging.getLogger(__name__)


class StepData:
    """Micro-batches grouped into optimiser steps, over as many epochs as needed."""

    def __init__(
        self, dataset: Any, collate: Any, micro_batch: int, accumulation: int, num_workers: int
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.accumulation = accumulation
        self.loader = DataLoader(
            dataset,
            batch_size=micro_batch,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=False,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )
        self.samples_seen = 0
        self._iterator: Iterator[Any] | None = None

    def _next_batch(self) -> Any:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                self.samples_seen += len(batch.keys)
                return batch
            except ShardMismatchError as exc:
                # From a DataLoader worker, the message carries the worker's traceback: keep the line.
                raise ShardMismatchError(worker_error_message(exc)) from None
            except StopIteration:
                self._iterator = None
                self.dataset.set_epoch(self.dataset.epoch + 1)
                self.samples_seen = 0
        raise ValueError("the training data yields no batch: is the data folder empty?")

    def next_step(self) -> list[Any]:
        """The next ``accumulation`` micro-batches of this rank (epochs roll over as needed)."""
        return [self._next_batch() for _ in range(self.accumulation)]

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(self.samples_seen)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position; an empty state restarts at the first sample of epoch 0."""
        self._iterator = None
        if not state:
            self.dataset.set_epoch(0)
            self.samples_seen = 0
            return
        self.dataset.load_state_dict(state)
        self.samples_seen = state["samples_seen"]


def feature_width(config: TrainConfig) -> int:
    """Width of the stored LVLM features (the aligner's input), after checking the feature folders.

    Before the first step: every shard of the training and validation folders matches its record
    (sizes, safetensors headers; the SHA-256 follows on first read, in the workers), the folders
    were made by the configured LVLM (``config.lvlm``, as recorded by ``extract-features``), and
    their width is that LVLM's hidden size: an aligner trained on other features could not serve it.
    """
    from thinkdiff.data.extraction import recorded_model_name
    from thinkdiff.data.feature_shards import check_feature_folder

    root = _single_feature_root(config.data)
    index = check_feature_folder(root)
    width = index.get("hidden_size")
    if not width:
        raise ValueError(f"feature folder {root} holds no features yet")
    folders = [(root, index)]
    if config.val_data:
        val_root = _single_feature_root(config.val_data)
        folders.append((val_root, check_feature_folder(val_root)))
    configured = recorded_model_name(config.lvlm)
    for folder, folder_index in folders:
        made_by = folder_index.get("model")
        if made_by is not None and made_by != configured:
            raise ValueError(
                f"feature folder {folder} was made by LVLM {made_by}, but the config's lvlm is {config.lvlm}; "
                f"pass --lvlm {made_by} (its tokenizer decodes the targets, its model serves the aligner)"
            )
        if folder_index.get("hidden_size") not in (None, width):
            raise ValueError(
                f"feature folder {folder} holds {folder_index['hidden_size']}-wide features, the training "
                f"folder {root} {width}-wide"
            )
    hidden = lvlm_hidden_size(config.lvlm)
    if hidden is not None and hidden != width:
        raise ValueError(
            f"feature folder {root} holds {width}-wide features, but LVLM {config.lvlm} has hidden size {hidden}: "
            "an aligner trained on them could not serve it; extract the features with that LVLM"
        )
    return int(width)


def lvlm_hidden_size(name: str) -> int | None:
    """The hidden size of an LVLM's language model, from its config alone (no weights fetched);
    ``None`` (with a warning) when its config cannot be read."""
    from transformers import AutoConfig

    from thinkdiff.models.loading import TOKENIZER_FILES, resolve_model_dir

    try:
        config = AutoConfig.from_pretrained(resolve_model_dir(name, kind="LVLM", files=TOKENIZER_FILES))
        return int(config.get_text_config().hidden_size)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        logger.warning("cannot read the hidden size of LVLM %s (%s); feature width not checked", name, exc)
        return None


def _single_feature_root(data: list[str]) -> Path:
    if len(data) != 1:
        raise ValueError(
            f"ThinkDiff-LVLM trains on one feature folder (merge several first), got {len(data)}: {data}"
        )
    return Path(data[0])


def load_lvlm_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The LVLM's tokenizer alone (no weights are fetched for a hub id)."""
    from transformers import AutoTokenizer

    from thinkdiff.models.loading import TOKENIZER_FILES, resolve_model_dir

    return AutoTokenizer.from_pretrained(
        resolve_model_dir(name, kind="LVLM tokenizer", files=TOKENIZER_FILES)
    )


def build_step_data(
    config: TrainConfig,
    t5_tokenizer: PreTrainedTokenizerBase,
    rank: int,
    world_size: int,
    micro_batch: int,
    accumulation: int,
    validation: bool = False,
    image_size: int = 224,
) -> StepData:
    """The training (or validation) stream of one rank for ``config`` (clip: images resized to
    ``image_size``, the vision tower's input side)."""
    sources = config.val_data if validation else config.data
    # Validation reads the same held-out order every time, unshuffled.
    shuffle = 0 if validation else config.shuffle_buffer
    workers = 0 if validation else config.num_workers
    if config.variant == "lvlm":
        from thinkdiff.data.feature_dataset import FeatureShardDataset
        from thinkdiff.objectives import CutLength, LVLMSplitCollator

        generated = config.features == "generated"
        dataset = FeatureShardDataset(
            _single_feature_root(sources),
            batch_size=micro_batch,
            shuffle_buffer=shuffle,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            bucket_batches=0 if validation else config.bucket_batches,
            # The random cut sets both lengths of a sample; the prompt ablation pads prompt features.
            bucket_key=CutLength(config.seed, config.max_split, config.split) if generated else None,
            prompt_features=not generated,
        )
        collate = LVLMSplitCollator(
            load_lvlm_tokenizer(config.lvlm),
            t5_tokenizer,
            split=config.split,
            max_split=config.max_split,
            max_target_tokens=config.max_target_tokens,
            features=config.features,  # type: ignore[arg-type]
            seed=config.seed,
        )
    else:
        from thinkdiff.data.image_caption import ImageCaptionDataset
        from thinkdiff.objectives import CLIPCaptionCollator

        dataset = ImageCaptionDataset(
            sources if len(sources) > 1 else sources[0],
            batch_size=micro_batch,
            shuffle_buffer=shuffle,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            image_size=image_size,
        )
        collate = CLIPCaptionCollator(
            t5_tokenizer,
            max_text_tokens=config.max_target_tokens,
            seed=config.seed,
            empty_first=config.clip_empty_first,
        )
    return StepData(dataset, collate, micro_batch, accumulation, workers)
