"""CoBSAT (Zeng et al., 2024): text-to-image in-context learning, ThinkDiff's headline benchmark.

- :mod:`~thinkdiff.evaluation.cobsat.protocol`: vocabulary, tasks, the seed-123 prompt list, k-shot
  prompts, the judge's questions and the reply-parsing rule (pure data, no I/O).
- :mod:`~thinkdiff.evaluation.cobsat.dataset`: find and check the 500 images (folder or zip).
- :mod:`~thinkdiff.evaluation.cobsat.generate`: run any image generator, resumable, batched.
- :mod:`~thinkdiff.evaluation.cobsat.judge`: the LLaVA-1.5 judge (and Qwen2-VL, CLIP), JSONL logs.
- :mod:`~thinkdiff.evaluation.cobsat.presets`: the settings behind the published rows (``--preset``).
- :mod:`~thinkdiff.evaluation.cobsat.results`: accuracy, Wilson intervals, tables beside the papers.

Importing this package imports neither torch nor transformers.
"""

from thinkdiff.evaluation.cobsat.dataset import CobsatDataset, expected_image_paths, write_synthetic_dataset
from thinkdiff.evaluation.cobsat.generate import (
    IMAGE_EXTENSIONS,
    BatchImageGenerator,
    GenerationReport,
    ImageGenerator,
    find_output,
    generate_cobsat,
    output_path,
)
from thinkdiff.evaluation.cobsat.judge import (
    DEFAULT_CLIP,
    DEFAULT_JUDGE,
    LLAVA_PORT_NOTE,
    LLAVA_V1_SYSTEM,
    ChatVLMJudge,
    ClipScorer,
    JudgeInfo,
    JudgeReport,
    LlavaJudge,
    VisionJudge,
    judge_cobsat,
    judge_slug,
    load_judge,
    read_judgements,
    recorded_selection,
)
from thinkdiff.evaluation.cobsat.presets import PRESETS, PUBLISHED_SETTINGS, resolve_settings
from thinkdiff.evaluation.cobsat.protocol import (
    COBSAT_INSTRUCTION,
    ITEMS,
    NUM_PROMPTS,
    PROMPT_SEED,
    SHOWN_AS,
    TASK_COLUMN_ORDER,
    TASKS,
    THEMES,
    CobsatPrompt,
    CobsatTask,
    build_prompt,
    build_prompts,
    judge_questions,
    parse_answer,
    prompts_list,
    shown,
)
from thinkdiff.evaluation.cobsat.results import (
    PUBLISHED,
    CellResult,
    CobsatResults,
    compare_results,
    load_results,
    read_compared,
    read_results_file,
    score_records,
    settings_lines,
    wilson_interval,
    write_results,
)

__all__ = [
    "COBSAT_INSTRUCTION",
    "DEFAULT_CLIP",
    "DEFAULT_JUDGE",
    "IMAGE_EXTENSIONS",
    "ITEMS",
    "LLAVA_PORT_NOTE",
    "LLAVA_V1_SYSTEM",
    "NUM_PROMPTS",
    "PRESETS",
    "PROMPT_SEED",
    "PUBLISHED",
    "PUBLISHED_SETTINGS",
    "SHOWN_AS",
    "TASKS",
    "TASK_COLUMN_ORDER",
    "THEMES",
    "BatchImageGenerator",
    "CellResult",
    "ChatVLMJudge",
    "ClipScorer",
    "CobsatDataset",
    "CobsatPrompt",
    "CobsatResults",
    "CobsatTask",
    "GenerationReport",
    "ImageGenerator",
    "JudgeInfo",
    "JudgeReport",
    "LlavaJudge",
    "VisionJudge",
    "build_prompt",
    "build_prompts",
    "compare_results",
    "expected_image_paths",
    "find_output",
    "generate_cobsat",
    "judge_cobsat",
    "judge_questions",
    "judge_slug",
    "load_judge",
    "load_results",
    "output_path",
    "parse_answer",
    "prompts_list",
    "read_compared",
    "read_judgements",
    "read_results_file",
    "recorded_selection",
    "resolve_settings",
    "score_records",
    "settings_lines",
    "shown",
    "wilson_interval",
    "write_results",
    "write_synthetic_dataset",
]
