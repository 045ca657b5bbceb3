"""``thinkdiff push MODEL_DIR REPO_ID``: upload an exported model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def model_files() -> tuple[str, ...]:
    """The files a model folder is made of (what ``save_model`` writes), in upload order.

    Nothing else is uploaded, so a stray file in the folder (a log, a private note) never leaves
    the machine.
    """
    from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from thinkdiff.models.bundle import INFO_FILE
    from thinkdiff.models.model_card import CARD_FILE

    return (CARD_FILE, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, INFO_FILE)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a model folder (aligner, thinkdiff.json, model card) to the Hugging Face Hub",
        description=(
            "Upload a ThinkDiff model folder written by `thinkdiff train` or `thinkdiff convert-official` "
            "to a Hub model repository. Only the folder's model files are sent: README.md (the model "
            "card), config.json, diffusion_pytorch_model.safetensors and thinkdiff.json, each a regular "
            "file that really lives in the folder (a symlink is refused). The folder is checked first (it "
            "must load). With --dry-run nothing is sent: the file list and the card are printed. Log in "
            "first with `hf auth login` or set HF_TOKEN."
        ),
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="the model folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name of the Hub repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--message", default="Upload ThinkDiff aligner", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="print what would be uploaded, send nothing")
    parser.set_defaults(func=run)


# The card and the two JSON files are a few KiB; a larger one is not what `save_model` wrote (and a
# sparse multi-GiB "README.md" would otherwise be printed by --dry-run and published). The weights
# need no cap: a safetensors file must be exactly as long as its header says, and the aligner's
# strict load below checks every tensor's shape.
TEXT_FILE_LIMIT = 1 << 20


def upload_plan(model_dir: Path, repo_id: str) -> list[Path]:
    """Check the folder and the repository id; return the real paths of the files to upload, in order.

    Every file must really live in ``model_dir`` (no symlink, nothing outside, a regular file: see
    :func:`thinkdiff.paths.confined_file`); this is checked before any of them is read.
    """
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    from thinkdiff.models.bundle import load_model
    from thinkdiff.paths import confined_file

    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise ValueError(f"repository id must look like owner/name, got {repo_id!r}")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"ThinkDiff model folder {model_dir} does not exist")
    names = model_files()
    present = {
        name: confined_file(model_dir, name, max_bytes=None if name == SAFETENSORS_WEIGHTS_NAME else TEXT_FILE_LIMIT)
        for name in names
        if os.path.lexists(model_dir / name)
    }
    load_model(model_dir)  # refuses a folder that `thinkdiff generate` could not load
    missing = [name for name in names if name not in present]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks {', '.join(missing)}; re-export it with this version of thinkdiff"
        )
    return [present[name] for name in names]


def run(args: argparse.Namespace) -> int:
    files = upload_plan(args.model_dir, args.repo_id)
    if args.dry_run:
        print(f"would upload to {args.repo_id} ({'private' if args.private else 'public'}):")
        for path in files:
            print(f"  {path.name}  {path.stat().st_size} bytes")
        print("--- README.md ---")
        print(files[0].read_text(), end="")  # model_files() lists the card first
        return 0

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        # The checked files one by one, never a folder walk (which would follow what it finds).
        commit = api.create_commit(
            repo_id=args.repo_id,
            operations=[CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=path) for path in files],
            revision=args.revision,
            commit_message=args.message,
        )
    except Exception as exc:  # network, auth, offline mode, quota: all reach the user as one line
        logger.debug("upload failed", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"upload to {args.repo_id} failed: {first}") from exc
    print(f"uploaded {len(files)} files to {getattr(commit, 'commit_url', args.repo_id)}")
    return 0
