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


def message(error: BaseException) -> str:
    """The one line the page shows for a failed job; a real bug is logged here, never sent."""
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, ValueError | FileNotFoundError | OSError):
        return str(error).splitlines()[0] if str(error) else "the input could not be read"
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
        logger.warning("job ran out of GPU memory: %s", str(error).splitlines()[0])
        return "out of GPU memory: a smaller size, or start the app with --offload model or --quantize"
    logger.exception("job failed")
    return "internal error; the server log has the details"


def _placeholder(defaults: dict[str, float], name: str) -> str:
    value = defaults.get(name)
    return "the decoder's" if value is None else f"{value:g} (default)"


def build_app(backend: Backend) -> "gr.Blocks":
    """The page over ``backend`` (see the package docstring)."""
    import gradio as gr

    from thinkdiff.app.examples import EXAMPLE_TASKS, example_thumbnails

    models = backend.model_choices()
    first = models[0]
    defaults = backend.decoder_defaults(first)
    world = backend.world is not None
    bridge_score = backend.text_bridge_score()

    def page_error(error: BaseException) -> gr.Error:
        """The API's one-line error (the page shows the same line in its status instead). The
        server's log gets a traceback only for a real bug (:func:`message` logs it)."""
        return gr.Error(message(error), print_exception=False)

    with gr.Blocks(title="ThinkDiff", analytics_enabled=False) as demo:
        intro = (
            "# ThinkDiff\nInterleaved images and text in, an image out: the LVLM reads the sequence, "
            "ThinkDiff's aligner turns its answer into the diffusion decoder's prompt. The text bridge "
            "(the LVLM's answer as a plain text prompt) is drawn beside it on the same seed."
        )
        if world:
            intro += (
                "  \nModels: the **miniature world** (trained from scratch on CPU; 32-pixel images, its "
                "judge reads each one). The first job also loads the models (seconds); later jobs take "
                "about a second on a CPU."
            )
        gr.Markdown(intro)
        kinds = gr.State([""] * MAX_ROWS)
        kept = gr.State([None] * MAX_ROWS)  # each image slot's last accepted upload
        target = gr.State(None)
        history = gr.State([])
        gr.Markdown("### Examples (mini-CoBSAT: what comes next?)")
        thumbnails = example_thumbnails(backend.examples_dir())
        with gr.Row():
            examples = gr.Gallery(
                [(backend.served(Path(path)), caption) for path, caption, _, _ in thumbnails],
                columns=6,
                height=190,
                object_fit="contain",
                allow_preview=False,
                show_label=False,
                elem_id="examples",
                scale=5,
            )
            with gr.Column(scale=1, min_width=160):
                task = gr.Dropdown(list(EXAMPLE_TASKS), value="Color-II", label="task")
                # The examples need only the world's renderer: real models get them too.
                shot = gr.Dropdown([1, 2, 3, 4], value=2, label="shots")
                load_example = gr.Button("a random one", size="sm", elem_id="load-example")
                clip_example = backend.clip_example()
                load_clip = gr.Button(
                    "ThinkDiff-CLIP: one image", size="sm", elem_id="clip-example", visible=clip_example is not None
                )
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
                                height=110,
                                visible=False,
                                elem_id=f"row-{i}-image",
                                elem_classes="row-image",
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
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                gr.Markdown("### Settings")
                model = gr.Dropdown(
                    [(backend.model_label(m), m) for m in models], value=first, label="model", elem_id="model"
                )
                model_note = gr.Markdown(backend.model_note(first), elem_id="model-note")
                if backend.ablations():
                    with gr.Accordion("what the ablations are", open=False, elem_id="ablations"):
                        bridge_line = (
                            f" The text bridge scores {bridge_score:.3f}." if bridge_score is not None else ""
                        )
                        gr.Markdown(
                            "Each changes one thing from the method (scores: the committed measured report)."
                            + bridge_line
                            + "\n\n"
                            + "\n".join(f"- **{name}**: {line}" for name, line in backend.ablations())
                        )
                mode = gr.Dropdown(
                    backend.mode_choices(), value=backend.variant(first) or "text-bridge", label="mode"
                )
                bridge = gr.Checkbox(
                    True, label="the text bridge beside it (same inputs and seed)", elem_id="text-bridge"
                )
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    reseed = gr.Button("random", size="sm", elem_id="random-seed")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    decoder = gr.Dropdown(backend.decoder_choices(), value=MODEL_DEFAULT, label="decoder")
                    with gr.Row():
                        width = gr.Textbox("", label="width", placeholder=_placeholder(defaults, "width"))
                        height = gr.Textbox("", label="height", placeholder=_placeholder(defaults, "height"))
                    with gr.Row():
                        steps = gr.Textbox("", label="steps", placeholder=_placeholder(defaults, "steps"))
                        guidance = gr.Textbox(
                            "", label="guidance", placeholder=_placeholder(defaults, "guidance")
                        )
                        true_cfg = gr.Textbox(
                            "", label="true CFG", placeholder=_placeholder(defaults, "true_cfg")
                        )
                    with gr.Row():
                        num_tokens = gr.Number(backend.default_num_tokens(), label="LVLM tokens", precision=0)
                        qcd = gr.Textbox("", label="QCD alpha", placeholder="off")
                        hint = gr.Checkbox(False, label="hint")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    cancel = gr.Button("Cancel", variant="secondary", size="sm", elem_id="cancel", scale=1)
        with gr.Column(elem_id="results"):
            with gr.Row():
                out_image = gr.Image(
                    label="ThinkDiff", type="filepath", elem_id="output-image", interactive=False, height=300
                )
                out_video = gr.Video(label="ThinkDiff (video)", visible=False, interactive=False, height=300)
                bridge_image = gr.Image(
                    label="text bridge",
                    type="filepath",
                    interactive=False,
                    height=300,
                    elem_id="bridge-image",
                )
            details = gr.Markdown("", elem_id="details")
            lvlm_text = gr.Textbox(label="the LVLM's text", interactive=False, elem_id="lvlm-text")
            downloads = gr.File(label="PNG + JSON sidecar", file_count="multiple", interactive=False)
            gallery = gr.Gallery(
                label="history", columns=10, height="auto", object_fit="contain", elem_id="history"
            )

        # Hidden API inputs: the sequence as JSON, images as uploads (see on_api).
        api_items = gr.JSON(visible=False)
        api_images = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_files = gr.File(file_count="multiple", visible=False)
        api_button = gr.Button(visible=False)

        # ---- editor ---------------------------------------------------------------------------
        editor = [kinds, *images, *texts]
        shown = [kinds, kept, target, *groups, *images, *texts]

        def layout(rows: list[dict[str, Any]]) -> list[Any]:
            """Updates drawing ``rows`` into the slots (+ the kept uploads, + the target, cleared by any edit)."""
            rows = rows[:MAX_ROWS]
            slots = [rows[i] if i < len(rows) else None for i in range(MAX_ROWS)]
            out: list[Any] = [
                [r["kind"] for r in rows] + [""] * (MAX_ROWS - len(rows)),
                [r["image"] if r is not None and r["kind"] == "image" else None for r in slots],
                None,
            ]
            out += [gr.update(visible=r is not None) for r in slots]
            for r in slots:
                is_image = r is not None and r["kind"] == "image"
                out.append(gr.update(visible=is_image, value=r["image"] if is_image else None))
            for r in slots:
                is_text = r is not None and r["kind"] == "text"
                out.append(gr.update(visible=is_text, value=r["text"] if is_text else ""))
            return out

        def split(values: Sequence[Any]) -> list[dict[str, Any]]:
            kinds_now = values[0]
            return _rows(kinds_now, values[1 : 1 + MAX_ROWS], values[1 + MAX_ROWS :])

        def add(kind: str) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                if len(rows) >= MAX_ROWS:
                    return [*[gr.update()] * len(shown), f"⚠️ the editor holds {MAX_ROWS} rows"]
                return [*layout([*rows, {"kind": kind, "image": None, "text": ""}]), ""]

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
        add_image.click(add("image"), editor, [*shown, status], **raw)
        add_text.click(add("text"), editor, [*shown, status], **raw)
        clear.click(lambda *values: [*layout([]), ""], editor, [*shown, status], **raw)
        for i in range(MAX_ROWS):
            ups[i].click(move(i, -1), editor, shown, **raw)
            downs[i].click(move(i, +1), editor, shown, **raw)
            removes[i].click(remove(i), editor, shown, **raw)

        def on_upload(value: Any, slots: list[str | None], index: int) -> tuple[Any, list[str | None], str]:
            path = _upload_path(value)
            if not path:
                return gr.update(), slots, ""
            slots = list(slots or [None] * MAX_ROWS)
            try:
                backend.check_image(path, f"row {index + 1} ({Path(path).name})")
            except ValueError as error:
                # The image that was there stays; the message says why the new one was refused.
                return slots[index], slots, f"⚠️ {error}"
            slots[index] = path
            return gr.update(), slots, ""

        for i in range(MAX_ROWS):
            images[i].upload(
                lambda value, slots, i=i: on_upload(value, slots, i),
                [images[i], kept],
                [images[i], kept, status],
                **raw,
            )

        def show_example(task_name: str, shots: int, index: int | None) -> list[Any]:
            try:
                example = backend.example(task_name, int(shots), index)
            except (ValueError, OSError) as error:
                return [*[gr.update()] * (len(shown) + 2), f"⚠️ {message(error)}", gr.update()]
            rows = [
                {"kind": "text", "image": None, "text": item}
                if isinstance(item, str)
                else {"kind": "image", "image": backend.served(item), "text": ""}
                for item in example["items"]
            ]
            out = layout(rows)
            out[2] = {"target": example["target"], "caption": example["target_caption"]}
            # An example is a comparison: the text bridge goes beside it.
            return [*out, example["seed"], task_name, example["caption"], True]

        example_outputs = [*shown, seed, task, status, bridge]
        load_example.click(lambda t, k: show_example(t, k, None), [task, shot], example_outputs, **ui)

        def on_thumbnail(shots: int, evt: gr.SelectData) -> list[Any]:
            _, _, task_name, index = thumbnails[evt.index]
            return show_example(task_name, shots, index)

        examples.select(on_thumbnail, [shot], example_outputs, **ui)

        def show_clip_example() -> list[Any]:
            example = backend.clip_example()
            if example is None:
                return [*[gr.update()] * (len(shown) + 3), gr.update()]
            out = layout([{"kind": "image", "image": backend.served(example["items"][0]), "text": ""}])
            out[2] = {"target": example["target"], "caption": example["target_caption"]}
            # The model's change event sets the mode (clip) and its note.
            return [*out, example["seed"], example["caption"], True, example["model"]]

        load_clip.click(show_clip_example, None, [*shown, seed, status, bridge, model], **ui)
        reseed.click(lambda: random.randrange(2**31), None, seed, **ui)

        def on_model(m: str) -> list[Any]:
            given = backend.decoder_defaults(m)
            boxes = [
                gr.update(placeholder=_placeholder(given, n))
                for n in ("width", "height", "steps", "guidance", "true_cfg")
            ]
            return [gr.update(value=backend.variant(m) or "text-bridge"), backend.model_note(m), *boxes]

        model.change(on_model, model, [mode, model_note, width, height, steps, guidance, true_cfg], **ui)

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
            finally:
                running.pop(session, None)

        page_outputs = [
            out_image,
            out_video,
            bridge_image,
            details,
            lvlm_text,
            downloads,
            history,
            gallery,
            status,
        ]

        def on_generate(
            data: dict[Any, Any],
            request: gr.Request,
            progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (how gradio asks for it)
        ) -> list[Any]:
            goal, past = data[target], data[history]
            try:
                items = _items(split([data[c] for c in editor]))
                results = run_job(items, options([data[c] for c in settings], goal), request, progress)
            except Exception as error:  # a user's mistake or a failed job: one line; the results stay
                return [*[gr.update()] * (len(page_outputs) - 1), f"⚠️ {message(error)}"]
            main, rest = results[0], results[1:]
            caption = None if goal is None else goal["caption"]
            notes = [describe(r, caption) for r in results]
            video = main.path.suffix == ".mp4"
            past = [*past, (backend.served(main.path), f"{main.mode} · seed {main.sidecar['seed']}")]
            past += [
                (backend.served(r.path), f"{r.mode} · seed {r.sidecar['seed']}")
                for r in rest
                if r.path.suffix == ".png"
            ]
            files = [backend.served(p) for r in results for p in (r.path, r.sidecar_path)]
            return [
                gr.update(value=None if video else backend.served(main.path), visible=not video),
                gr.update(value=backend.served(main.path) if video else None, visible=video),
                gr.update(value=backend.served(rest[0].path) if rest else None),
                "\n\n".join(notes),
                "\n\n".join(
                    f"[{r.mode}] {r.sidecar['lvlm_text']}" for r in results if r.sidecar["lvlm_text"]
                ),
                files,
                past,
                past[::-1],
                "",
            ]

        # The result lands below the editor: the page scrolls to it as the job starts.
        run.click(
            None,
            None,
            None,
            js="() => document.getElementById('results').scrollIntoView({behavior: 'smooth'})",
        )
        generation = run.click(
            on_generate,
            {*editor, target, history, *settings},
            page_outputs,
            api_name="generate_page",
            api_visibility="private",
            concurrency_id="device",
            concurrency_limit=1,
            preprocess=False,  # see _upload_path; options() parses the settings
        )

        def on_cancel(request: gr.Request) -> str:
            event = running.get(request.session_hash or "")
            if event is None:
                return ""
            event.set()
            return "cancelled"

        cancel.click(on_cancel, None, status, cancels=[generation], **ui)

        def on_api(
            items: Any,
            files: list[Any] | None,
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
            # Unprocessed (see the listener): Gradio's own choice checks would print a traceback
            # for a client's typo; the backend names the bad value in one line instead.
            files = [path for path in (_upload_path(f) for f in files or []) if path]
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
                raise gr.Error(str(error), print_exception=False) from None
            try:
                results = run_job(sequence, opts, request, progress)
            except Exception as error:
                raise page_error(error) from None
            return (
                [backend.served(p) for r in results for p in (r.path, r.sidecar_path)],
                {"results": [r.summary() for r in results]},
            )

        api_button.click(
            on_api,
            [api_items, api_images, *settings],
            [api_files, api_result],
            api_name="generate",
            concurrency_id="device",
            concurrency_limit=1,
            preprocess=False,
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
