"""Data: image-caption sources, LVLM feature extraction, feature shards (write + read) and datasets.

- :mod:`~thinkdiff.data.sources`: WebDataset tars, image folders, JSONL/CSV manifests, cut into shards;
  bad samples are skipped and reported.
- :mod:`~thinkdiff.data.extraction`: the LVLM describes each image; its token features are written
  as feature shards (``thinkdiff extract-features``).
- :mod:`~thinkdiff.data.feature_shards`: the shard format, its index, random access.
- :mod:`~thinkdiff.data.feature_dataset` / :mod:`~thinkdiff.data.image_caption`: streaming datasets
  for training (shuffled, split across ranks and workers, resumable).
"""

from __future__ import annotations

from thinkdiff.data.extraction import (
    DESCRIPTION_PROMPTS,
    ExtractionSettings,
    ExtractionSummary,
    HFEngine,
    VLLMEngine,
    extract_features,
    make_engine,
    merge,
)
from thinkdiff.data.feature_dataset import FeatureShardDataset, padding_fraction
from thinkdiff.data.feature_shards import (
    FeatureShards,
    FeatureShardWriter,
    load_index,
    verify_shards,
    write_index,
)
from thinkdiff.data.image_caption import CLIP_MEAN, CLIP_STD, ImageCaptionDataset, blip2_preprocess
from thinkdiff.data.sharding import rank_and_world_size
from thinkdiff.data.sources import (
    ImageCaptionSample,
    RawSample,
    Skip,
    SkipLog,
    SourceShard,
    decode_image,
    iter_raw_samples,
    iter_samples,
    list_source_shards,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DESCRIPTION_PROMPTS",
    "ExtractionSettings",
    "ExtractionSummary",
    "FeatureShardDataset",
    "FeatureShardWriter",
    "FeatureShards",
    "HFEngine",
    "ImageCaptionDataset",
    "ImageCaptionSample",
    "RawSample",
    "Skip",
    "SkipLog",
    "SourceShard",
    "VLLMEngine",
    "blip2_preprocess",
    "decode_image",
    "extract_features",
    "iter_raw_samples",
    "iter_samples",
    "list_source_shards",
    "load_index",
    "make_engine",
    "merge",
    "padding_fraction",
    "rank_and_world_size",
    "verify_shards",
    "write_index",
]
