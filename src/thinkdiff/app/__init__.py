"""``thinkdiff app``: a web page for interleaved images and text (Gradio, ``pip install thinkdiff[app]``).

A thin layer over the same :class:`~thinkdiff.pipelines.ThinkDiffPipeline` that ``thinkdiff
generate`` runs, writing the same outputs through the same writer
(:func:`thinkdiff.pipelines.outputs.write_output`): an image (or video) and its JSON sidecar.

The two sides:

- :class:`Backend`: no Gradio in it. It holds the server's choices of models (the page picks among
  them; it never names a server path itself), checks uploads against the limits, runs one job at a
  time on the device, writes every job into its own folder under ``--out``, and, on the miniature
  world, has the world's judge read every image.
- :func:`build_app`: the page. A sequence editor (image and text rows: add, move, remove; one click
  loads a mini-CoBSAT example), the settings, Generate / Cancel, the outputs (image, the LVLM's
  text, seed, stage timings, peak memory, the judge's reading), the text bridge beside it when
  asked, a history gallery and the PNG + sidecar to download. An API endpoint ``/generate`` takes
  the sequence as JSON plus uploaded images (for ``gradio_client``).

Without ``--model`` the models are the miniature world's committed weights: the app starts offline
on a CPU in seconds. Bad input of any kind is a one-line message in the page; the server keeps
serving and no traceback reaches the client.

The package, one idea a module:

- :mod:`~thinkdiff.app.jobs`: the :class:`Backend` (no Gradio in it) and the job's settings.
- :mod:`~thinkdiff.app.examples`: mini-CoBSAT prompts as editor rows, and the example gallery.
- :mod:`~thinkdiff.app.outputs`: what the page says about each output, and the ``--out`` folder's rule.
- :mod:`~thinkdiff.app.layout`: the page (:func:`build_app`) and :func:`launch`.
"""

from thinkdiff.app.jobs import AppConfig, Backend, Cancelled, GenerateOptions
from thinkdiff.app.layout import MAX_ROWS, build_app, launch
from thinkdiff.app.outputs import JobResult

__all__ = [
    "MAX_ROWS",
    "AppConfig",
    "Backend",
    "Cancelled",
    "GenerateOptions",
    "JobResult",
    "build_app",
    "launch",
]
