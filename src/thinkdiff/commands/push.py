"""``thinkdiff push MODEL_DIR REPO_ID``: upload an exported model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from thinkdiff.console import escaped

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
            "file that really lives in the folder (a symlink is refused), read once: what is checked (it "
            "must load) is what is sent. Local paths that thinkdiff.json and the card record (the source "
            "model, the data, an initial aligner) are published by their last name only; the folder keeps "
            "them whole. With --dry-run nothing is sent: the file list, the paths shortened and the card "
            "are printed. Log in first with `hf auth login` or set HF_TOKEN."
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


def upload_plan(model_dir: Path, repo_id: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Check the repository id and the folder; return the bytes to upload, by file name, in order,
    and the local paths replaced in them (see :func:`published`).

    Each file is opened once, without following a symlink, and checked on the open file (a regular
    file that really lives in ``model_dir``: see :func:`thinkdiff.paths.read_confined_file`); the
    aligner is then loaded from those very bytes, so what was checked is what is loaded, printed and
    sent, even if the folder changes meanwhile.
    """
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    from thinkdiff.paths import read_confined_file

    check_repo_id(repo_id)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"ThinkDiff model folder {model_dir} does not exist")
    names = model_files()
    missing = [name for name in names if not os.path.lexists(model_dir / name)]
    if len(missing) == len(names):
        raise FileNotFoundError(f"{model_dir} is not a ThinkDiff model folder (it has none of {', '.join(names)})")
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks {', '.join(missing)}; re-export it with this version of thinkdiff"
        )
    contents = {
        name: read_confined_file(
            model_dir, name, max_bytes=None if name == SAFETENSORS_WEIGHTS_NAME else TEXT_FILE_LIMIT
        )
        for name in names
    }
    contents, paths = published(contents)
    _check_loads(model_dir, contents)
    return contents, paths


def published(contents: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The files as published, and the local paths replaced in them (each with its replacement).

    ``thinkdiff.json`` and the card record where the aligner's models and data lay on this machine
    (``/home/alice/...``); the Hub gets only each path's last name (see
    :func:`thinkdiff.models.model_card.published_paths`). The card is edited in place, not rendered
    again, so that what the user wrote in it (a license) is kept.
    """
    from thinkdiff.models.bundle import INFO_FILE
    from thinkdiff.models.model_card import CARD_FILE, published_paths

    try:
        info = json.loads(contents[INFO_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return contents, {}  # refused by the load check, which names the file
    paths = published_paths(info)
    if not paths:
        return contents, {}
    card = contents[CARD_FILE].decode("utf-8", errors="surrogateescape")
    for path in sorted(paths, key=len, reverse=True):  # "/a/b/c" before "/a/b"
        for form in (path, json.dumps(path)[1:-1]):  # as written in a table cell or a JSON list
            card = card.replace(form, paths[path])
    return {
        **contents,
        CARD_FILE: card.encode("utf-8", errors="surrogateescape"),
        INFO_FILE: (json.dumps(_replaced(info, paths), indent=2) + "\n").encode(),
    }, paths


def _replaced(values: Any, paths: dict[str, str]) -> Any:
    if isinstance(values, str):
        return paths.get(values, values)
    if isinstance(values, dict):
        return {key: _replaced(value, paths) for key, value in values.items()}
    if isinstance(values, list):
        return [_replaced(value, paths) for value in values]
    return values


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository id the Hub would not take (``../x``, ``me/x?y#z``), in one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repository id {repo_id!r} is not valid on the Hub: {exc}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"repository id must look like owner/name, got {repo_id!r}")


def _check_loads(model_dir: Path, contents: dict[str, bytes]) -> None:
    """Refuse a folder that `thinkdiff generate` could not load, judged on the bytes to be sent.

    They are loaded from a private copy (a fresh folder only this process writes), never from
    ``model_dir`` again; an error names ``model_dir``, where the user can mend it.
    """
    from thinkdiff.models.bundle import load_model

    with tempfile.TemporaryDirectory(prefix="thinkdiff-push-") as copy:
        for name, data in contents.items():
            (Path(copy) / name).write_bytes(data)
        try:
            load_model(copy)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(str(exc).replace(copy, str(model_dir))) from None


def run(args: argparse.Namespace) -> int:
    from thinkdiff.models.model_card import CARD_FILE

    contents, paths = upload_plan(args.model_dir, args.repo_id)
    if args.dry_run:
        print(f"would upload to {args.repo_id} ({'private' if args.private else 'public'}):")
        for name, data in contents.items():
            print(f"  {name}  {len(data)} bytes")
        if paths:
            print(f"local paths published by their last name only ({args.model_dir} keeps them whole):")
            for path, shown in paths.items():
                print(f"  {escaped(path)} -> {escaped(shown)}")
        print(f"--- {CARD_FILE} ---")
        try:
            print(contents[CARD_FILE].decode("utf-8"), end="")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{args.model_dir / CARD_FILE} is not UTF-8 text ({exc.reason})") from None
        return 0

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        # The checked bytes, file by file: never a path (which could be swapped meanwhile), never a folder walk.
        commit = api.create_commit(
            repo_id=args.repo_id,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in contents.items()],
            revision=args.revision,
            commit_message=args.message,
        )
    except Exception as exc:  # network, auth, offline mode, quota: all reach the user as one line
        logger.debug("upload failed", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"upload to {args.repo_id} failed: {first}") from exc
    print(f"uploaded {len(contents)} files to {getattr(commit, 'commit_url', args.repo_id)}")
    return 0
