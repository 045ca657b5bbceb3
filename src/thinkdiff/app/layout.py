"""The page: the sequence editor, the settings, the outputs and the history (Gradio), and :func:`launch`."""

import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkdiff.app.jobs import MODEL_DEFAULT, Backend, Cancelled, GenerateOptions, JobResult
from thinkdiff.app.outputs import describe

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

MAX_ROWS = 12
"""Rows of the page's sequence editor (images and texts together)."""
CSS = """
#output-image img, #bridge-image img, #history img { image-rendering: pixelated; }
#output-image img, #bridge-image img { width: 100%; height: 100%; object-fit: contain; }
"""
"""The mini world draws 32-pixel images: shown enlarged, pixels kept sharp."""


def _upload_path(value: Any) -> str | None:
    """The server path of an image slot's upload, as Gradio hands it over unprocessed.

    Events reading the image slots skip Gradio's preprocessing: stock ``gr.Image`` opens every
    input with PIL there, so a broken upload failed outside the app with a bare "Error". Gradio
    still checks, before this, that the path is an upload to this server; the backend then checks
    the image and says what is wrong with it.
    """
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def _rows(kinds: Sequence[str], images: Sequence[Any], texts: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"kind": kind, "image": _upload_path(images[i]), "text": texts[i] or ""}
        for i, kind in enumerate(kinds)
        if kind
    ]


def _items(rows: Sequence[dict[str, Any]]) -> list[str | Path]:
    items: list[str | Path] = []
    for n, row in enumerate(rows):
        if row["kind"] == "image":
            if not row["image"]:
                raise ValueError(
                    f"row {n + 1} is an image row without an image: upload one or remove the row"
                )
            items.append(Path(row["image"]))
        elif row["text"]:
            items.append(str(row["text"]))
    return items


def _number(value: Any, name: str, kind: type[int] | type[float]) -> Any:
    """A setting typed in the page: blank is ``None`` (the decoder's default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def build_app(backend: Backend) -> "gr.Blocks":
    """The page over ``backend`` (see the module docstring)."""
    import gradio as gr

    models = backend.model_choices()
    first = models[0]

    def page_error(error: BaseException) -> gr.Error:
        """The one-line message the page shows; a real bug is logged here, never sent."""
        if isinstance(error, ValueError | FileNotFoundError | OSError):
            return gr.Error(str(error).splitlines()[0] if str(error) else type(error).__name__)
        if type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
            logger.warning("job ran out of GPU memory: %s", str(error).splitlines()[0])
            return gr.Error(
                "out of GPU memory: a smaller size, or start the app with --offload model or --quantize"
            )
        logger.exception("job failed")
        return gr.Error(f"internal error ({type(error).__name__}); the server log has the details")

    with gr.Blocks(title="ThinkDiff", analytics_enabled=False) as demo:
        gr.Markdown(
            "# ThinkDiff\nInterleaved images and text in, an image out: the LVLM reads the sequence, "
            "ThinkDiff's aligner turns its answer into the diffusion decoder's prompt."
            + (
                "  \nModels: the **miniature world** (trained from scratch on CPU; 32-pixel images, "
                "its judge reads each one)."
                if backend.world is not None
                else ""
            )
        )
        kinds = gr.State([""] * MAX_ROWS)
        target = gr.State(None)
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("### Sequence")
                groups, images, texts, ups, downs, removes = [], [], [], [], [], []
                for i in range(MAX_ROWS):
                    with gr.Group(visible=False, elem_id=f"row-{i}") as group, gr.Row(equal_height=True):
                        images.append(
                            gr.Image(
                                type="filepath",
                                sources=["upload", "clipboard"],
                                label=f"image (row {i + 1})",
                                height=140,
                                visible=False,
                                elem_id=f"row-{i}-image",
                                scale=3,
                            )
                        )
                        texts.append(
                            gr.Textbox(
                                label=f"text (row {i + 1})",
                                lines=2,
                                visible=False,
                                elem_id=f"row-{i}-text",
                                scale=3,
                            )
                        )
                        with gr.Column(min_width=60, scale=0):
                            ups.append(gr.Button("↑", size="sm", elem_id=f"row-{i}-up"))
                            downs.append(gr.Button("↓", size="sm", elem_id=f"row-{i}-down"))
                            removes.append(gr.Button("✕", size="sm", elem_id=f"row-{i}-remove"))
                    groups.append(group)
                with gr.Row():
                    add_image = gr.Button("+ image", elem_id="add-image")
                    add_text = gr.Button("+ text", elem_id="add-text")
                    clear = gr.Button("clear", elem_id="clear")
                with gr.Row():
                    task = gr.Dropdown(
                        ["Color-I", "Color-II", "Background-I", "Background-II", "Texture-I", "Texture-II"],
                        value="Color-II",
                        label="example task (mini-CoBSAT)",
                    )
                    # The examples need only the world's renderer: real models get them too.
                    shot = gr.Dropdown([1, 2, 3, 4], value=2, label="shots")
                    load_example = gr.Button("load an example", elem_id="load-example")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                gr.Markdown("### Settings")
                model = gr.Dropdown(models, value=first, label="model", elem_id="model")
                mode = gr.Dropdown(
                    backend.mode_choices(), value=backend.variant(first) or "text-bridge", label="mode"
                )
                decoder = gr.Dropdown(backend.decoder_choices(), value=MODEL_DEFAULT, label="decoder")
                with gr.Row():
                    width = gr.Textbox("", label="width", placeholder="blank: the decoder's")
                    height = gr.Textbox("", label="height", placeholder="blank: the decoder's")
                with gr.Row():
                    steps = gr.Textbox("", label="steps", placeholder="blank: the decoder's")
                    guidance = gr.Textbox("", label="guidance", placeholder="blank: the decoder's")
                    true_cfg = gr.Textbox("", label="true CFG", placeholder="blank: the decoder's")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    reseed = gr.Button("random", size="sm", elem_id="random-seed")
                with gr.Row():
                    num_tokens = gr.Number(backend.default_num_tokens(), label="LVLM tokens", precision=0)
                    qcd = gr.Textbox("", label="QCD alpha", placeholder="blank: off")
                    hint = gr.Checkbox(False, label="hint")
                bridge = gr.Checkbox(
                    False, label="also the text bridge (same inputs and seed)", elem_id="text-bridge"
                )
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Row():
            out_image = gr.Image(
                label="ThinkDiff", type="filepath", elem_id="output-image", interactive=False, height=320
            )
            out_video = gr.Video(label="ThinkDiff (video)", visible=False, interactive=False, height=320)
            bridge_image = gr.Image(
                label="text bridge",
                type="filepath",
                visible=False,
                interactive=False,
                height=320,
                elem_id="bridge-image",
            )
        details = gr.Markdown("", elem_id="details")
        lvlm_text = gr.Textbox(label="the LVLM's text", interactive=False, elem_id="lvlm-text")
        downloads = gr.File(label="PNG + JSON sidecar", file_count="multiple", interactive=False)
        gallery = gr.Gallery(label="history", columns=6, height=220, elem_id="history")

        # Hidden API inputs: the sequence as JSON, images as uploads (see on_api).
        api_items = gr.JSON(visible=False)
        api_images = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_files = gr.File(file_count="multiple", visible=False)
        api_button = gr.Button(visible=False)

        # ---- editor ---------------------------------------------------------------------------
        editor = [kinds, *images, *texts]
        shown = [kinds, target, *groups, *images, *texts]

        def layout(rows: list[dict[str, Any]], note: str | None = None) -> list[Any]:
            """Updates drawing ``rows`` into the slots (+ the target, cleared by any edit)."""
            rows = rows[:MAX_ROWS]
            out: list[Any] = [[r["kind"] for r in rows] + [""] * (MAX_ROWS - len(rows)), None]
            out += [gr.update(visible=i < len(rows)) for i in range(MAX_ROWS)]
            for i in range(MAX_ROWS):
                row = rows[i] if i < len(rows) else None
                is_image = row is not None and row["kind"] == "image"
                out.append(gr.update(visible=is_image, value=row["image"] if is_image else None))
            for i in range(MAX_ROWS):
                row = rows[i] if i < len(rows) else None
                is_text = row is not None and row["kind"] == "text"
                out.append(gr.update(visible=is_text, value=row["text"] if is_text else ""))
            return out

        def split(values: Sequence[Any]) -> list[dict[str, Any]]:
            kinds_now = values[0]
            return _rows(kinds_now, values[1 : 1 + MAX_ROWS], values[1 + MAX_ROWS :])

        def add(kind: str) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                if len(rows) >= MAX_ROWS:
                    raise gr.Error(f"the editor holds {MAX_ROWS} rows")
                return layout([*rows, {"kind": kind, "image": None, "text": ""}])

            return handler

        def move(index: int, step: int) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                other = index + step
                if 0 <= other < len(rows):
                    rows[index], rows[other] = rows[other], rows[index]
                return layout(rows)

            return handler

        def remove(index: int) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                return layout([r for n, r in enumerate(rows) if n != index])

            return handler

        ui = {"concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
        raw = {**ui, "preprocess": False}  # image slots are read unprocessed (see _upload_path)
        add_image.click(add("image"), editor, shown, **raw)
        add_text.click(add("text"), editor, shown, **raw)
        clear.click(lambda *values: layout([]), editor, shown, **raw)
        for i in range(MAX_ROWS):
            ups[i].click(move(i, -1), editor, shown, **raw)
            downs[i].click(move(i, +1), editor, shown, **raw)
            removes[i].click(remove(i), editor, shown, **raw)

        def on_upload(value: Any, index: int) -> tuple[Any, str]:
            path = _upload_path(value)
            if not path:
                return gr.update(), ""
            try:
                backend.check_image(path, f"row {index + 1} ({Path(path).name})")
            except ValueError as error:
                gr.Warning(str(error))
                return None, f"⚠️ {error}"
            return gr.update(), ""

        for i in range(MAX_ROWS):
            images[i].upload(lambda value, i=i: on_upload(value, i), images[i], [images[i], status], **raw)

        def on_example(task_name: str, shots: int) -> list[Any]:
            try:
                example = backend.example(task_name, int(shots))
            except (ValueError, OSError) as error:
                raise page_error(error) from None
            rows = [
                {"kind": "text", "image": None, "text": item}
                if isinstance(item, str)
                else {"kind": "image", "image": str(item), "text": ""}
                for item in example["items"]
            ]
            out = layout(rows)
            out[1] = {"target": example["target"], "caption": example["target_caption"]}
            return [*out, example["seed"], example["caption"]]

        load_example.click(on_example, [task, shot], [*shown, seed, status], **ui)
        reseed.click(lambda: random.randrange(2**31), None, seed, **ui)
        model.change(lambda m: gr.update(value=backend.variant(m) or "text-bridge"), model, mode, **ui)

        # ---- generation -----------------------------------------------------------------------
        settings = [
            model, mode, decoder, seed, width, height, steps, guidance, true_cfg, num_tokens, qcd, hint, bridge,
        ]  # fmt: skip
        running: dict[str, threading.Event] = {}

        def options(values: Sequence[Any], goal: dict[str, Any] | None) -> GenerateOptions:
            """The settings' values, in the order of ``settings``."""
            m, md, dec, sd, w, h, st, g, cfg, nt, a, hn, br = values
            return GenerateOptions(
                model=m,
                mode=md,
                decoder=dec or MODEL_DEFAULT,
                seed=_number(sd, "seed", int) or 0,
                width=_number(w, "width", int),
                height=_number(h, "height", int),
                steps=_number(st, "steps", int),
                guidance=_number(g, "guidance", float),
                true_cfg=_number(cfg, "true CFG", float),
                num_tokens=_number(nt, "LVLM tokens", int),
                qcd_alpha=_number(a, "QCD alpha", float),
                hint=bool(hn),
                text_bridge=bool(br),
                target=None if goal is None else goal["target"],
            )

        def run_job(
            items: list[str | Path], opts: GenerateOptions, request: gr.Request, progress: gr.Progress
        ) -> list[JobResult]:
            session = request.session_hash or "api"
            event = running[session] = threading.Event()
            try:
                return backend.generate(
                    items, opts, cancelled=event, progress=lambda f, text: progress(f, desc=text)
                )
            except Cancelled:
                raise gr.Error("cancelled") from None
            except gr.Error:
                raise
            except Exception as error:
                raise page_error(error) from None
            finally:
                running.pop(session, None)

        def on_generate(
            data: dict[Any, Any],
            request: gr.Request,
            progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (how gradio asks for it)
        ) -> list[Any]:
            rows = split([data[c] for c in editor])
            goal, past = data[target], data[history]
            try:
                items = _items(rows)
                opts = options([data[c] for c in settings], goal)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            results = run_job(items, opts, request, progress)
            main, rest = results[0], results[1:]
            caption = None if goal is None else goal["caption"]
            notes = [describe(r, caption) for r in results]
            video = main.path.suffix == ".mp4"
            past = [*past, (str(main.path), f"{main.mode} · seed {main.sidecar['seed']}")]
            past += [
                (str(r.path), f"{r.mode} · seed {r.sidecar['seed']}") for r in rest if r.path.suffix == ".png"
            ]
            files = [str(p) for r in results for p in (r.path, r.sidecar_path)]
            return [
                gr.update(value=None if video else str(main.path), visible=not video),
                gr.update(value=str(main.path) if video else None, visible=video),
                gr.update(value=str(rest[0].path) if rest else None, visible=bool(rest)),
                "\n\n".join(notes),
                "\n\n".join(
                    f"[{r.mode}] {r.sidecar['lvlm_text']}" for r in results if r.sidecar["lvlm_text"]
                ),
                files,
                past,
                past[::-1],
            ]

        generation = run.click(
            on_generate,
            {*editor, target, history, *settings},
            [out_image, out_video, bridge_image, details, lvlm_text, downloads, history, gallery],
            api_name="generate_page",
            api_visibility="private",
            concurrency_id="device",
            concurrency_limit=1,
            preprocess=False,  # see _upload_path; options() parses the settings
        )

        def on_cancel(request: gr.Request) -> None:
            event = running.get(request.session_hash or "")
            if event is not None:
                event.set()
            gr.Info("cancelled")

        cancel.click(on_cancel, None, None, cancels=[generation], **ui)

        def on_api(
            items: Any,
            files: list[str] | None,
            model_: str,
            mode_: str,
            decoder_: str,
            seed_: float | None,
            width_: str | float | None,
            height_: str | float | None,
            steps_: str | float | None,
            guidance_: str | float | None,
            true_cfg_: str | float | None,
            num_tokens_: float | None,
            qcd_alpha_: str | float | None,
            hint_: bool,
            bridge_: bool,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (how gradio asks for it)
        ) -> tuple[list[str], dict[str, Any]]:
            """``items``: [{"text": str} | {"image": k}], k indexing the uploaded ``files``; then
            the settings (in the order of ``settings``)."""
            values = [
                model_, mode_, decoder_, seed_, width_, height_, steps_, guidance_, true_cfg_, num_tokens_,
                qcd_alpha_, hint_, bridge_,
            ]  # fmt: skip
            files = list(files or [])
            sequence: list[str | Path] = []
            try:
                if not isinstance(items, list):
                    raise ValueError('items must be a list of {"text": STR} and {"image": INDEX}')
                for item in items:
                    if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
                        sequence.append(item["text"])
                    elif isinstance(item, dict) and set(item) == {"image"} and isinstance(item["image"], int):
                        if not 0 <= item["image"] < len(files):
                            raise ValueError(
                                f"image index {item['image']} but {len(files)} images were uploaded"
                            )
                        sequence.append(Path(files[item["image"]]))
                    else:
                        raise ValueError(
                            f'each item must be {{"text": STR}} or {{"image": INDEX}}, got {item!r}'
                        )
                opts = options(values, None)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            results = run_job(sequence, opts, request, progress)
            return (
                [str(p) for r in results for p in (r.path, r.sidecar_path)],
                {"results": [r.summary() for r in results]},
            )

        api_button.click(
            on_api,
            [api_items, api_images, *settings],
            [api_files, api_result],
            api_name="generate",
            concurrency_id="device",
            concurrency_limit=1,
        )
    return demo


# What the app writes under --out: the examples folder and one folder per job (see ``run``).


def launch(backend: Backend, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the page; returns the Blocks (already serving when ``block`` is False)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=1, max_size=32)
    backend.out_dir.mkdir(parents=True, exist_ok=True)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{int(backend.config.max_upload_mb * 1024)}kb",
        allowed_paths=[str(backend.out_dir)],
        show_error=False,  # only the app's own one-line messages reach the page
        prevent_thread_lock=not block,
        ssr_mode=False,
        css=CSS,
        quiet=not block,
        inbrowser=False,
        share=False,
    )
    return demo
