"""The miniature world: ThinkDiff reproduced end to end at a size a laptop CPU trains in minutes.

Every component is the real architecture at a tiny size, trained from scratch by
``thinkdiff miniworld build`` (:mod:`~thinkdiff.miniworld.build`), and does its job in the world:

- :mod:`~thinkdiff.miniworld.world`: 32x32 renders of shapes with an object colour, a texture and
  a background colour, at random positions and sizes, with specks and noise; templated captions;
  held-out combinations.
- :mod:`~thinkdiff.miniworld.minicobsat`: CoBSAT's tasks, prompt list and k-shot prompts, rendered.
- :mod:`~thinkdiff.miniworld.judge`: reads the attributes back (pixel statistics + a small CNN).
- :mod:`~thinkdiff.miniworld.components`: the mini T5, FLUX.1 transformer, Qwen2-VL and EVA ViT.
- :mod:`~thinkdiff.miniworld.budgets`: the build's seed and budgets (full and quick).
- :mod:`~thinkdiff.miniworld.sampler`: the mini FLUX sampler's default steps and guidance.
- :mod:`~thinkdiff.miniworld.models`: a built world, loaded; the one place embeddings become images.
- :mod:`~thinkdiff.miniworld.experiments`: ThinkDiff through the project's extraction and trainer.
- :mod:`~thinkdiff.miniworld.report`: ``thinkdiff miniworld report``, the measurements, one module
  per section.
- :mod:`~thinkdiff.miniworld.demo`: one prompt in, one judged image out (``make demo``).
"""
