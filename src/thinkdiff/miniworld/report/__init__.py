"""``thinkdiff miniworld report``: measure the components and ThinkDiff's claims in the miniature world.

Every number in the report comes from running the evaluation code on a built models folder;
nothing is typed in. The report folder gets ``report.md``, ``report.json`` (all numbers, with the
prompt-level outcomes), and PNGs: component loss curves, the norm ablation (the paper's Figure 7),
accuracy bars, and grids of example inputs and outputs.

One module per section (:mod:`~thinkdiff.miniworld.report.runner` lists them, runs them and saves
each as it finishes):

- :mod:`~thinkdiff.miniworld.report.fidelity`: each component at its own job.
- :mod:`~thinkdiff.miniworld.report.premise`: does what the proxy T5 decoder reads come out of FLUX?
- :mod:`~thinkdiff.miniworld.report.clip`: ThinkDiff-CLIP.
- :mod:`~thinkdiff.miniworld.report.qcd`: the query-contrastive baseline.
- :mod:`~thinkdiff.miniworld.report.ablation`: the ablation aligners and the norm ablation.
- :mod:`~thinkdiff.miniworld.report.lvlm`: ThinkDiff-LVLM on mini-CoBSAT, every method.

and the parts read from them: :mod:`~thinkdiff.miniworld.report.claims` (the paper's claims,
tested), :mod:`~thinkdiff.miniworld.report.calibration`, :mod:`~thinkdiff.miniworld.report.markdown`,
:mod:`~thinkdiff.miniworld.report.plots`.
"""

from thinkdiff.miniworld.report.common import ReportConfig, quick_report_config
from thinkdiff.miniworld.report.markdown import render_markdown
from thinkdiff.miniworld.report.runner import SECTIONS, write_report

__all__ = ["SECTIONS", "ReportConfig", "quick_report_config", "render_markdown", "write_report"]
