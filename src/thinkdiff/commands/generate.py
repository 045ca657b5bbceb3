"""``thinkdiff generate``: images (FLUX.1) or videos (CogVideoX) from interleaved images and text.

Inputs are given once on the command line (``--image``/``--text``, repeated, in order), as one job
(``--job FILE.json``) or as many (``--jobs FILE.jsonl``, batched). Each output gets a JSON sidecar
with its inputs, mode, seed, the LVLM's text, the component ids and the stage timings. Every input
is checked before any model loads, and files are written atomically, so bad input leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkdiff.limits import check_finite, check_seed, seed_argument

if TYPE_CHECKING:
    from thinkdiff.models.bundle import ThinkDiffInfo
    from thinkdiff.pipelines import Request

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4",)
JOB_KEYS = (
    "items", "seed", "extra_text", "steps", "guidance", "true_cfg", "height", "width", "num_frames", "out",
    "qcd_alpha", "hint",
)  # fmt: skip

JOBS_HELP = """\
Job files: --job holds one JSON object, --jobs one object per line:
  {"items": [{"text": "Word 1: white, "}, {"image": "cars/white.jpg"}, {"text": "Word 2: blue, "}],
   "seed": 0, "extra_text": null, "steps": 28, "guidance": 3.5, "true_cfg": 1.0, "height": 512,
   "width": 512, "num_frames": 49, "qcd_alpha": 0.5, "hint": true, "out": "white-blue.png"}
Only "items" is required ({"text": ...} or {"image": PATH}; a bare string is text); the other
fields default to the command-line values. Relative image paths are relative to the job file.
"meta" (any JSON object, e.g. the benchmark record `thinkdiff eval cobsat prompts --format
thinkdiff` puts there) is copied into the sidecar; any other key is an error. With --jobs, --out is
a folder and a job's "out" is a name inside it (default 00000.png); with --job and no --out, a name
inside the current folder. An "out" that leads outside (.., an absolute path, a symlink) is refused.

Examples:
  thinkdiff generate --model runs/lvlm/model --text "Word 1: white, " --image white.jpg \\
      --text "\\n\\nWord 2: blue, " --image blue.jpg --text "\\n\\nWord 3: red, " --seed 0 --out red.png
  thinkdiff generate --mode text-bridge --lvlm Qwen/Qwen2-VL-7B-Instruct --jobs cobsat.jsonl --out out/
  thinkdiff generate --model runs/clip/model --decoder THUDM/CogVideoX-5b --image cat.jpg \\
      --text "running on the beach" --out cat.mp4
  thinkdiff generate --model src/thinkdiff/miniworld/weights/thinkdiff/no-split-calibrated \\
      --text "Word 1: red, " --image red_star.png ... --out mini.png   # the mini world, on a CPU
The model folder's thinkdiff.json may say how it is meant to run (its "inference": token count,
EOS, greedy); those are the defaults of --num-tokens, --stop-at-eos, --greedy, --temperature and
--top-p, and the sidecar's "conditioning_sources" says where each setting came from.
"""


def add_qcd_and_hint(group: argparse._ActionsContainer) -> None:
    """``--qcd-alpha [A]`` and ``--hint [SENTENCE]`` (lvlm and text-bridge; read back with :func:`hint_of`)."""
    from thinkdiff.pipelines.constants import DEFAULT_QCD_ALPHA, HINT_INSTRUCTION

    group.add_argument(
        "--qcd-alpha",
        type=float,
        nargs="?",
        const=DEFAULT_QCD_ALPHA,
        default=0.0,
        metavar="A",
        help="lvlm and text-bridge: query-contrastive decoding, (1+A)*logits(input) - A*logits(input without "
        f"its last text) before temperature/top-p (bare flag: {DEFAULT_QCD_ALPHA}; default 0: off)",
    )
    group.add_argument(
        "--hint",
        nargs="?",
        const=HINT_INSTRUCTION,
        metavar="SENTENCE",
        help="lvlm and text-bridge: append a hint to the instruction (bare flag: ours, that the last word is "
        "the key clue and the shared attribute comes from the pictures)",
    )


def hint_of(args: argparse.Namespace) -> str | None:
    """The hint sentence ``--hint`` asked for (bare flag: ``HINT_INSTRUCTION``), or ``None``;
    ``ValueError`` for an empty sentence (an unset shell variable, say), which is neither."""
    if args.hint is not None and not args.hint.strip():
        raise ValueError("--hint got an empty sentence: give one, --hint alone for ours, or no --hint for none")
    return None if args.hint is None else args.hint.strip()


class _AppendItem(argparse.Action):
    """--image and --text append to one shared list, so their order is the interleaved order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, "items", None) or [])
        items.append(("image" if option_string == "--image" else "text", values))
        namespace.items = items


def register(subparsers: argparse._SubParsersAction) -> None:
    from thinkdiff.pipelines.constants import MODES, OFFLOAD_MODES, QUANTIZE_MODES

    parser = subparsers.add_parser(
        "generate",
        help="generate an image or video from interleaved images and text",
        description="Generate images (FLUX.1) or videos (CogVideoX) from interleaved images and text.\n\n"
        + JOBS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs (one of: --image/--text items, --job, --jobs)")
    inputs.add_argument("--image", action=_AppendItem, metavar="PATH", help="an image (repeatable, ordered)")
    inputs.add_argument("--text", action=_AppendItem, metavar="STR", help="a text (repeatable, ordered)")
    inputs.add_argument("--job", type=Path, metavar="FILE.json", help="one job as a JSON object")
    inputs.add_argument("--jobs", type=Path, metavar="FILE.jsonl", help="many jobs, one JSON object a line")
    inputs.add_argument(
        "--extra-text", help="lvlm: appended as decoder-T5 tokens; clip/text-bridge: to the text"
    )

    models = parser.add_argument_group("models")
    models.add_argument(
        "--model", type=Path, help="trained ThinkDiff model folder (not needed for text-bridge)"
    )
    models.add_argument(
        "--mode", choices=MODES, help="default: the model folder's variant, text-bridge without --model"
    )
    models.add_argument(
        "--decoder",
        help="decoder folder or hub id: FLUX.1, Chroma, PixArt-Sigma, SD3/3.5, CogVideoX or LTX-Video "
        "(default: the model's decoder)",
    )
    models.add_argument(
        "--lvlm", help="LVLM for lvlm/text-bridge (default: the model's; Qwen/Qwen2-VL-7B-Instruct)"
    )
    models.add_argument("--vision", help="BLIP-2 vision model for clip mode (default: the model's)")
    models.add_argument(
        "--allow-other-source",
        action="store_true",
        help="run the aligner with an --lvlm/--vision of another family than the one it was trained on "
        "(thinkdiff.json's source_model); refused otherwise",
    )

    decoding = parser.add_argument_group("decoder settings (default: the decoder's own)")
    decoding.add_argument(
        "--seed", type=seed_argument, default=0, help="seeds the LVLM sampling and the noise (default 0)"
    )
    decoding.add_argument(
        "--steps", type=int, help="denoising steps (FLUX.1-dev 28, schnell 4, CogVideoX 50)"
    )
    decoding.add_argument(
        "--guidance",
        type=float,
        help="guidance scale (stock: FLUX.1-dev 3.5, Chroma 5, PixArt-Sigma 4.5, SD3 7, LTX-Video 3, CogVideoX 6)",
    )
    decoding.add_argument(
        "--true-cfg",
        type=float,
        help='FLUX true classifier-free guidance scale; above 1 the negative is the decoder\'s T5 of "" '
        "(default 1: off, or the decoder folder's thinkdiff_decoder.json)",
    )
    decoding.add_argument("--height", type=int, help="pixels (FLUX: 1024 or the folder's sample_size)")
    decoding.add_argument("--width", type=int, help="pixels (FLUX: 1024 or the folder's sample_size)")
    decoding.add_argument("--num-frames", type=int, help="video frames (CogVideoX)")
    decoding.add_argument(
        "--fps", type=int, default=8, help="frames per second of written videos (default 8)"
    )

    conditioning = parser.add_argument_group("conditioning")
    conditioning.add_argument("--instruction", help="instruction before the items (default: the CoBSAT one)")
    conditioning.add_argument("--no-instruction", action="store_true", help="send the items alone")
    # These five default to the model folder's own (thinkdiff.json "inference"), else the library's.
    conditioning.add_argument(
        "--num-tokens",
        type=int,
        help="LVLM tokens: exactly, or at most with --stop-at-eos (default: the model folder's, else 128)",
    )
    conditioning.add_argument(
        "--stop-at-eos",
        action=argparse.BooleanOptionalAction,
        help="lvlm mode: stop at the LVLM's EOS and align the tokens up to it "
        "(default: the model folder's, else exactly --num-tokens)",
    )
    conditioning.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        help="lvlm and text-bridge modes: decode the LVLM greedily instead of sampling "
        "(default: the model folder's, else sampling)",
    )
    conditioning.add_argument(
        "--temperature", type=float, help="LVLM sampling (default: the model folder's, else 0.6)"
    )
    conditioning.add_argument("--top-p", type=float, help="LVLM nucleus mass (default: the model folder's, else 0.9)")
    add_qcd_and_hint(conditioning)
    conditioning.add_argument(
        "--text-max-length", type=int, default=128, help="T5 tokens of text (default 128)"
    )
    conditioning.add_argument("--max-images", type=int, default=16, help="most images per input (default 16)")
    conditioning.add_argument("--max-pixels", type=int, help="cap on the LVLM's image resolution")

    running = parser.add_argument_group("running")
    running.add_argument("--out", type=Path, help="output file (a folder with --jobs)")
    running.add_argument("--device", help="torch device (default: cuda if available)")
    running.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="frozen models' dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )
    running.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="decoder CPU offload")
    running.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="LVLM, decoder transformer and T5 weights: nf4 (bitsandbytes, CUDA), int8 (torchao, also CPU), "
        "fp8 (torchao, compute capability 8.9+)",
    )
    running.add_argument(
        "--transformer-file",
        type=Path,
        default=None,
        metavar="GGUF",
        help="a GGUF file of the decoder's transformer (e.g. a Q4/Q8 FLUX.1-dev), loaded in place of its weights",
    )
    running.add_argument("--batch-size", type=int, default=1, help="requests per decoder call")
    running.add_argument(
        "--lvlm-batch-size",
        type=int,
        default=1,
        help="requests per LVLM call (above 1 a request's sampled text depends on its batch)",
    )
    running.add_argument("--chunk-size", type=int, default=64, help="jobs per pass through all stages")
    parser.set_defaults(func=run, items=None)


# ---- inputs -----------------------------------------------------------------------------------


def _parse_item(item: Any, base: Path, where: str) -> Any:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and len(item) == 1 and "text" in item and isinstance(item["text"], str):
        return item["text"]
    if isinstance(item, dict) and len(item) == 1 and "image" in item and isinstance(item["image"], str):
        path = Path(item["image"]).expanduser()
        return path if path.is_absolute() else base / path
    raise ValueError(f'{where}: each item must be {{"text": STR}} or {{"image": PATH}}, got {item!r}')


def _job_request(job: Any, base: Path, where: str, args: argparse.Namespace) -> Request:
    from thinkdiff.pipelines import Request

    if not isinstance(job, dict):
        raise ValueError(f"{where}: a job must be a JSON object, got {type(job).__name__}")
    unknown = [k for k in job if k not in (*JOB_KEYS, "meta")]
    if unknown:
        # A misspelt setting must not run with the default (a "sed" would silently use --seed).
        close = difflib.get_close_matches(unknown[0], JOB_KEYS, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ValueError(
            f'{where}: unknown job key "{unknown[0]}"{hint}; the keys are {", ".join(JOB_KEYS)}, '
            'and "meta" for data to copy into the sidecar'
        )
    if not isinstance(job.get("items"), list):
        raise ValueError(f'{where}: a job needs "items", a list of texts and images')
    if not isinstance(job.get("meta", {}), dict):
        raise ValueError(f'{where}: "meta" must be a JSON object, got {job["meta"]!r}')
    if job.get("out") is not None and not (isinstance(job["out"], str) and job["out"].strip()):
        raise ValueError(f'{where}: "out" must be a file name, got {job["out"]!r}')

    def pick(key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        value = job.get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be a {getattr(kind, '__name__', 'number')}, got {value!r}")
        if isinstance(value, float):
            check_finite(key, value, where)  # JSON readers take NaN and Infinity
        if key == "seed":
            check_seed(key, value, where)
        return value

    hint = job.get("hint")
    if hint is not None and not isinstance(hint, bool):
        raise ValueError(f"{where}: hint must be true or false (the sentence is --hint's), got {hint!r}")
    return Request(
        items=[_parse_item(item, base, where) for item in job["items"]],
        seed=pick("seed", args.seed, int),
        extra_text=pick("extra_text", args.extra_text, str),
        height=pick("height", args.height, int),
        width=pick("width", args.width, int),
        num_inference_steps=pick("steps", args.steps, int),
        guidance_scale=pick("guidance", args.guidance, (int, float)),
        true_cfg_scale=pick("true_cfg", args.true_cfg, (int, float)),
        num_frames=pick("num_frames", args.num_frames, int),
        qcd_alpha=pick("qcd_alpha", None, (int, float)),
        hint=hint,
        metadata={"out": job.get("out"), "job": job.get("meta") or {}, "where": where},
    )


def _read_requests(args: argparse.Namespace) -> list[Request]:
    """The requests of the command line or job files; every format error is a ValueError."""
    from thinkdiff.pipelines import Request

    given = [
        name
        for name, value in (("--image/--text", args.items), ("--job", args.job), ("--jobs", args.jobs))
        if value
    ]
    if not given:
        raise ValueError("no inputs: give --image/--text (repeatable), --job FILE.json or --jobs FILE.jsonl")
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if args.items:
        items = [Path(value).expanduser() if kind == "image" else value for kind, value in args.items]
        return [
            Request(
                items=items,
                seed=args.seed,
                extra_text=args.extra_text,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                true_cfg_scale=args.true_cfg,
                num_frames=args.num_frames,
            )
        ]
    path: Path = args.job or args.jobs
    if not path.is_file():
        raise FileNotFoundError(f"job file not found: {path}")
    data = path.read_bytes()
    # Each --jobs line is parsed alone, so that an error names the file's line, not the JSON's.
    chunks = [(str(path), data)] if args.job else [
        (f"{path} line {n}", line) for n, line in enumerate(data.splitlines(), 1) if line.strip()
    ]  # fmt: skip
    requests = [_job_request(_parse_json(chunk, where), path.parent, where, args) for where, chunk in chunks]
    if not requests:
        raise ValueError(f"{path} holds no jobs")
    for request in requests:
        _job_output(args, request)  # before anything runs: no job may write outside --out
    return requests


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not UTF-8 text (byte {error.start})") from error
    except json.JSONDecodeError as error:
        position = f"column {error.colno}" if "line" in where else f"line {error.lineno} column {error.colno}"
        raise ValueError(f"{where} is not valid JSON: {error.msg} ({position})") from error
    except RecursionError as error:
        raise ValueError(f"{where} is not valid JSON: nested too deeply") from error


def _job_output(args: argparse.Namespace, request: Request) -> Path | None:
    """Where a job's own "out" puts its file, checked to stay inside its folder; ``None`` without one.

    The folder is --out with --jobs (default thinkdiff-output) and the current folder with --job
    (whose "out" is not used when --out is given). Symlinks are followed: a link inside the folder
    that points elsewhere is outside.
    """
    name = request.metadata.get("out")
    if name is None or (args.job and args.out):
        return None
    folder = (args.out or Path("thinkdiff-output")) if args.jobs else Path(".")
    path = folder / Path(name).expanduser()
    if not path.resolve().is_relative_to(folder.resolve()) or path.resolve() == folder.resolve():
        where = request.metadata["where"]
        inside = f"--out {folder}" if args.jobs else "the current folder (or give --out)"
        raise ValueError(f'{where}: "out" {name!r} leads outside {inside}; refused before anything ran')
    return path


def _output_paths(args: argparse.Namespace, requests: list[Request], kind: str, mode: str) -> list[Path]:
    suffixes = VIDEO_SUFFIXES if kind == "video" else IMAGE_SUFFIXES
    default_suffix = suffixes[0]
    if args.jobs:
        folder = args.out or Path("thinkdiff-output")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder} must be a folder with --jobs")
        paths = [_job_output(args, r) or folder / f"{i:05d}{default_suffix}" for i, r in enumerate(requests)]
    else:
        out = _job_output(args, requests[0]) if args.job else None
        paths = [args.out or out or Path(f"thinkdiff-{mode}-{requests[0].seed}{default_suffix}")]
    for path in paths:
        if path.suffix.lower() not in suffixes:
            article = "an" if kind == "image" else "a"
            raise ValueError(f"output {path}: {article} {kind} decoder writes {' or '.join(suffixes)} files")
        # Found now, not when the first image is written after minutes of model loading.
        for written in (path, path.with_suffix(".json")):
            if written.is_dir():
                raise ValueError(f"output {written} is an existing folder; name a file")
        above = next((parent for parent in path.parents if parent.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"output {path}: {above} is a file, not a folder")
    # The same file by two names ("a.png", "./a.png"), or two outputs sharing a sidecar ("a.png",
    # "a.jpg" -> "a.json"), would overwrite each other.
    written = [w.resolve() for p in paths for w in (p, p.with_suffix(".json"))]
    duplicates = sorted({str(w) for w in written if written.count(w) > 1})
    if duplicates:
        raise ValueError(f"several jobs write the same file: {', '.join(duplicates)}")
    return paths


# ---- checks against the models' configs (no weights load) -------------------------------------


def check_aligner_source(
    info: ThinkDiffInfo,
    source: str | Path,
    *,
    flag: str,
    allow_other: bool,
    model_folder: str | Path | None = None,
) -> None:
    """Refuse an LVLM (or vision model) of another family than the aligner was trained on, and warn
    on another name of the same family: its features are what the aligner maps.

    The family is the config's ``model_type`` (``qwen2_vl``, ``qwen2_5_vl``, ``llava`` ...); where
    a config cannot be read, only the names are compared (a warning). ``allow_other`` lets another
    family through with the warning. With ``model_folder``, the recorded model is the folder that
    :func:`~thinkdiff.models.bundle.recorded_model` finds (the one loaded without ``flag``).
    """
    from thinkdiff.models.bundle import recorded_model

    trained, given = str(info.source_model), str(source)
    if model_folder is not None:
        with contextlib.suppress(FileNotFoundError):  # found nowhere: compared as recorded
            trained = recorded_model(model_folder, info, "source_model")
    if _same_model(trained, given):
        return
    trained_family, given_family = _model_family(trained), _model_family(given)
    if trained_family and given_family and trained_family != given_family and not allow_other:
        raise ValueError(
            f"{flag} {given} is a {given_family} model, but this aligner was trained on the features of {trained} "
            f"({trained_family}), which mean something else; pass {flag} {trained}, or --allow-other-source to "
            "run it anyway"
        )
    logger.warning(
        "%s %s is not the model this aligner was trained on (%s, %s); its features may differ: pass %s %s "
        "to use that one",
        flag, given, trained, trained_family or "family unknown", flag, trained,
    )  # fmt: skip


def _same_model(trained: str, given: str) -> bool:
    """Whether ``given`` names the model recorded as ``trained``: the same real folder, or the same
    hub id. A relative folder recorded by ``train`` is relative to where training ran; where it
    does not exist from here, the given folder is that one when its real path ends with it
    (``/work/repo/weights/vlm`` for a recorded ``weights/vlm``)."""
    trained_id, given_id = _model_identity(trained), _model_identity(given)
    if trained_id == given_id:
        return True
    recorded = Path(trained)
    if recorded.is_absolute() or trained_id != trained or not Path(given_id).is_absolute():
        return False  # the recorded folder exists here (and is another), or is a hub id or absolute
    tail = Path(given_id).parts[-len(recorded.parts):]
    return ".." not in recorded.parts and len(recorded.parts) > 1 and tail == recorded.parts


def _model_identity(name: str) -> str:
    """A folder by its real path (``./vlm``, ``/abs/vlm`` and a ``tiny:`` name for it are one
    model), a hub id as written."""
    from thinkdiff.models.loading import TINY_PREFIX, resolve_model_dir

    path = resolve_model_dir(name) if name.startswith(TINY_PREFIX) else Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _model_family(name: str) -> str | None:
    """``model_type`` of a model's ``config.json`` (downloads nothing else), ``None`` if unreadable."""
    from thinkdiff.models.loading import resolve_model_dir

    try:
        config = json.loads((resolve_model_dir(name, files=["config.json"]) / "config.json").read_text())
        return str(config["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- command ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Check everything, then generate in chunks and write each output with its sidecar."""
    import dataclasses

    import torch

    from thinkdiff.models.bundle import load_info
    from thinkdiff.pipelines import InferenceSettings, ThinkDiffPipeline
    from thinkdiff.pipelines.inference_defaults import resolve_settings
    from thinkdiff.pipelines.outputs import write_output
    from thinkdiff.utils import remove_debris

    # 1. Inputs and settings: parsed and checked before any model loads.
    requests = _read_requests(args)
    if args.no_instruction and args.instruction is not None:
        raise ValueError("give --instruction or --no-instruction, not both")
    for name in ("batch_size", "lvlm_batch_size", "chunk_size", "fps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # The model folder's inference defaults (thinkdiff.json), then the flags; the sidecar records
    # where each setting came from.
    info = load_info(args.model) if args.model is not None and Path(args.model).is_dir() else None
    library = InferenceSettings()
    rest = InferenceSettings(
        text_max_length=args.text_max_length,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        encoder_batch_size=args.lvlm_batch_size,
        decoder_batch_size=args.batch_size,
        qcd_alpha=args.qcd_alpha,
        hint=hint_of(args),
    )
    given = {
        "num_tokens": args.num_tokens, "stop_at_eos": args.stop_at_eos, "greedy": args.greedy,
        "temperature": args.temperature, "top_p": args.top_p,
    }  # fmt: skip
    given |= {k: v for k, v in dataclasses.asdict(rest).items() if v != getattr(library, k)}
    settings, sources = resolve_settings(library, info, given)
    if args.hint is not None and args.no_instruction:
        raise ValueError("--hint is appended to the instruction: give it without --no-instruction")
    if args.no_instruction:
        settings.instruction = None
    elif args.instruction is not None:
        settings.instruction = args.instruction
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)

    # 2. The pipeline reads the model folder (aligner only) and the decoder's configs: mode,
    #    variant and widths are checked here; then every image is opened.
    pipe = ThinkDiffPipeline.from_pretrained(
        args.model,
        decoder=args.decoder,
        mode=args.mode,
        lvlm=args.lvlm,
        vision=args.vision,
        device=args.device,
        dtype=dtype,
        offload=args.offload,
        settings=settings,
        quantize=args.quantize,
        transformer_file=args.transformer_file,
    )
    pipe.settings_sources = sources
    pipe.decoder.check_size(args.height, args.width, "", names=("--height", "--width"))
    if pipe.info is not None:
        flag = "--lvlm" if pipe.mode == "lvlm" else "--vision"
        check_aligner_source(
            pipe.info, pipe.source_model, flag=flag, allow_other=args.allow_other_source, model_folder=args.model
        )
    if pipe.mode == "clip":  # the mode may come from the model folder: known only now
        for flag, given, applies in (
            ("--stop-at-eos", args.stop_at_eos, "lvlm mode"),
            ("--greedy", args.greedy, "lvlm and text-bridge modes"),
            ("--qcd-alpha", args.qcd_alpha > 0, "lvlm and text-bridge modes"),
            ("--hint", args.hint is not None, "lvlm and text-bridge modes"),
        ):
            if given:
                raise ValueError(f"{flag} applies to {applies}; mode clip uses no LVLM")
    paths = _output_paths(args, requests, pipe.decoder_spec.kind, pipe.mode)
    pipe.check(requests, flags=True)  # bounds named as flags and job lines

    # 3. Generate and write, a chunk of jobs at a time (each chunk runs every stage once), where
    #    the temporary files of killed runs are cleared first (only the host-tagged names: an
    #    output folder may be the user's own, where another program may use the shorter form).
    for folder in dict.fromkeys(path.parent for path in paths):
        removed = remove_debris(folder, hostless=False)
        if removed:
            logger.info("%s: removed temporary files of a killed run: %s", folder, ", ".join(removed))
    for start in range(0, len(requests), args.chunk_size):
        chunk = requests[start : start + args.chunk_size]
        output = pipe(chunk)
        for offset, request in enumerate(chunk):
            path = paths[start + offset]
            write_output(pipe, request, offset, output, path, batch_size=len(chunk), fps=args.fps)
            print(path)
    return 0
