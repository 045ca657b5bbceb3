"""The settings behind the published CoBSAT rows, as presets a run can start from.

A CoBSAT image depends on more than the model: the instruction, how the LVLM decodes, the decoder's
size, steps and guidance. Two published configurations are presets of ``thinkdiff eval cobsat
generate --preset``:

- ``release``: ThinkDiff-LVLM as the authors' release runs it (``ThinkDiff-LVLM`` rows, 0.417 /
  0.463): the LVLM generates exactly 128 tokens (EOS ignored) sampled at temperature 0.6, top-p 0.9;
  FLUX.1-dev at 512 px, 28 steps, guidance 3.5, pooled CLIP of ``""``.
- ``tbdn``: the 2026 follow-up's text bridge as its final code runs it (its method's rows, 0.693 /
  0.767): Qwen2-VL-7B-Instruct writes a prompt of at most 128 tokens with query-contrastive decoding
  (weight 0.5) and *greedy* selection (its script passes temperature 0.7 and top-p 0.9 but no
  ``top_k``, so the checkpoint's ``generation_config.json`` ``top_k: 1`` applies: inferred from
  its code and the checkpoint's configuration); FLUX.1-dev reads that text (T5 up to 512 tokens)
  at 256 px, 28 steps, guidance 3.5; no hint sentence (its final code has none, although the rows
  it produced are named "+ hint": :data:`SOME_HINT`).

Both use the release's instruction, blank line included
(:data:`~thinkdiff.pipelines.constants.DEFAULT_INSTRUCTION`), and the release's item layout
(``Word k: x, ``); whether the follow-up laid its items out so is not verified (its items come
from a CoBSAT version that is not public; docs/cobsat.md). :data:`PUBLISHED_SETTINGS` gives
each published row whose settings are known; :func:`setting_differences` lists where a run differs.
Pure data: importing this module imports no model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from thinkdiff.pipelines.constants import DEFAULT_DECODER, DEFAULT_INSTRUCTION, DEFAULT_LVLM

__all__ = [
    "COMPARED_SETTINGS",
    "DEFAULT_SETTINGS",
    "PRESETS",
    "PUBLISHED_SETTINGS",
    "SOME_HINT",
    "UNKNOWN",
    "Preset",
    "implied_settings",
    "pooled_of",
    "resolve_settings",
    "setting_differences",
    "settings_text",
]

UNKNOWN = "unknown"
"""A published row's setting that its code does not show."""

SOME_HINT = "a hint, sentence unknown"
"""The hint of the follow-up's rows named "+ hint": the name says a hint was used, but its final code
holds no hint sentence (earlier commits, 4fd1494 and 3cf84c6, hold a "Note: ..." one), so which
sentence made the published numbers is unknown. A run without a hint differs from such a row; a
run with any hint cannot be told apart from it."""

COMPARED_SETTINGS: tuple[str, ...] = (
    "mode",
    "lvlm",
    "decoder",
    "instruction",
    "hint",
    "num_tokens",
    "greedy",
    "temperature",
    "top_p",
    "qcd_alpha",
    "stop_at_eos",
    "pooled",
    "t5_max_length",
    "size",
    "steps",
    "guidance",
)
"""The settings that shape a CoBSAT image, in the order they are printed (the seed is not one: the
published rows do not state theirs)."""

DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "mode": None,
        "lvlm": None,
        "decoder": None,
        "instruction": DEFAULT_INSTRUCTION,
        "hint": None,
        "num_tokens": 128,
        "greedy": False,
        "temperature": 0.6,
        "top_p": 0.9,
        "qcd_alpha": 0.0,
        "stop_at_eos": False,
        "pooled": None,
        "t5_max_length": None,
        "size": 512,
        "steps": 28,
        "guidance": 3.5,
        "seed": 123,
    }
)
"""``eval cobsat generate`` without a preset: the protocol's size, steps, guidance and seed, the
release's decoding. ``lvlm``/``decoder`` ``None``: the model folder's, else the paper's.
``stop_at_eos``, ``pooled`` and ``t5_max_length`` follow from the mode and decoder
(:func:`implied_settings`)."""

FLUX_DEV_T5_TOKENS = 512
"""T5 tokens FLUX.1-dev reads of a text prompt: ``FluxPipeline``'s default ``max_sequence_length``,
which the follow-up's ``flux(prompt=output_text)`` uses (our FLUX decoder's ``text_bridge_length``
for FLUX.1-dev; a test holds the two equal)."""


def implied_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the mode and the decoder decide beside the flags, as the pipeline does it.

    - ``stop_at_eos``: text-bridge always stops at the LVLM's end of sequence; lvlm generates
      exactly ``num_tokens`` unless its setting says otherwise; clip runs no LVLM (``None``).
    - ``pooled``: FLUX.1-dev's pooled CLIP vector: of ``""`` in lvlm mode (the aligned tokens
      replace the text), of the prompt text otherwise.
    - ``t5_max_length``: T5 tokens FLUX.1-dev reads of the LVLM's text in text-bridge mode.

    For another decoder (or the model folder's) the last two are ``None`` here: they are the
    decoder's own, and the sidecar records them once it is loaded.
    """
    mode, flux_dev = settings["mode"], settings["decoder"] == DEFAULT_DECODER
    return {
        "stop_at_eos": None if mode == "clip" else mode == "text-bridge" or bool(settings["stop_at_eos"]),
        "pooled": pooled_of(mode) if flux_dev and mode else None,
        "t5_max_length": FLUX_DEV_T5_TOKENS if flux_dev and mode == "text-bridge" else None,
    }


def pooled_of(mode: str) -> str:
    """What FLUX's pooled CLIP vector is made of in ``mode``: ``""`` in lvlm mode (the aligned tokens
    replace the text, as in the release), the prompt text otherwise."""
    return 'CLIP of ""' if mode == "lvlm" else "CLIP of the text"


def _with_implied(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({**settings, **implied_settings(settings)})


@dataclass(frozen=True)
class Preset:
    """A published configuration: its settings and the rows of :data:`~thinkdiff.evaluation.cobsat.results.PUBLISHED` it produced."""

    name: str
    summary: str
    """One line for ``--help``."""
    rows: tuple[str, ...]
    settings: Mapping[str, Any]
    """Every key of :data:`DEFAULT_SETTINGS`."""


_RELEASE = _with_implied({**DEFAULT_SETTINGS, "mode": "lvlm", "lvlm": DEFAULT_LVLM, "decoder": DEFAULT_DECODER})
_TBDN = _with_implied(
    {
        **DEFAULT_SETTINGS,
        "mode": "text-bridge",
        "lvlm": DEFAULT_LVLM,
        "decoder": DEFAULT_DECODER,
        "greedy": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "qcd_alpha": 0.5,
        "size": 256,
    }
)
_TBDN_METHOD = "Text bridge + hint + QCD (2026 follow-up, its method; avg only)"

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "release": Preset(
            "release",
            "ThinkDiff-LVLM as released: exactly 128 LVLM tokens at temperature 0.6 / top-p 0.9, 512 px, "
            "28 steps, guidance 3.5",
            ("ThinkDiff-LVLM",),
            _RELEASE,
        ),
        "tbdn": Preset(
            "tbdn",
            "the 2026 follow-up's text bridge: greedy QCD 0.5, at most 128 tokens, 256 px, 28 steps, "
            "guidance 3.5, no hint",
            (_TBDN_METHOD,),
            _TBDN,
        ),
    }
)
"""``--preset`` choices."""

PUBLISHED_SETTINGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "ThinkDiff-LVLM": _RELEASE,
        # The two ablations ran the release's inference on other aligners.
        "ThinkDiff w/o masked training": _RELEASE,
        "ThinkDiff using input-token features": _RELEASE,
        "Text bridge, Qwen2-VL + FLUX.1-dev 256px (2026 follow-up; avg only)": {**_TBDN, "qcd_alpha": 0.0},
        # The rows named "+ hint" used one, though its final code (the tbdn preset) holds none.
        "Text bridge + hint (2026 follow-up; avg only)": {**_TBDN, "qcd_alpha": 0.0, "hint": SOME_HINT},
        "Text bridge + QCD (2026 follow-up; avg only)": _TBDN,
        _TBDN_METHOD: {**_TBDN, "hint": SOME_HINT},
        "Text bridge + hint + QCD, InternVL3 (2026 follow-up; avg only)": {
            **_TBDN,
            "lvlm": "OpenGVLab/InternVL3-8B-hf",
            "hint": SOME_HINT,
        },
    }
)
"""The settings behind each published row we know them for (SEED-LLaMA, Emu and GILL are other
systems: none)."""


def resolve_settings(preset: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run uses: :data:`DEFAULT_SETTINGS`, then the preset's, then ``given``
    (the flags the user typed; ``None`` values mean "not given").

    Returns ``{"preset": name or None, "published_rows": [...], "settings": {...}, "overrides":
    {name: {"preset": value, "given": value}}}``: an override is a given flag that changes the
    preset's value. Raises ``ValueError`` for an unknown preset or setting name.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    base = dict(DEFAULT_SETTINGS if preset is None else PRESETS[preset].settings)
    chosen = {name: value for name, value in given.items() if value is not None}
    overrides = {
        name: {"preset": base[name], "given": value}
        for name, value in chosen.items()
        if preset is not None and base[name] != value
    }
    settings = {**base, **chosen}
    return {
        "preset": preset,
        "published_rows": list(PRESETS[preset].rows) if preset is not None else [],
        "settings": {**settings, **implied_settings(settings)},
        "overrides": overrides,
    }


def setting_differences(run: Mapping[str, Any], published: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (run's value, published value)}`` for the :data:`COMPARED_SETTINGS` both record and
    the published row states. Where either side decodes greedily, temperature and top-p are moot
    (a greedy/sampling mismatch shows as ``greedy``)."""
    out: dict[str, tuple[Any, Any]] = {}
    any_greedy = bool(run.get("greedy")) or bool(published.get("greedy"))
    for name in COMPARED_SETTINGS:
        if name not in run or name not in published or published[name] == UNKNOWN:
            continue
        if any_greedy and name in ("temperature", "top_p"):
            continue
        if run[name] is None and name in ("lvlm", "decoder"):
            continue  # not recorded: the model folder's
        if published[name] == SOME_HINT and run[name] is not None:
            continue  # some hint on both sides: which sentence the row used is not known
        if run[name] != published[name]:
            out[name] = (run[name], published[name])
    return out


def settings_text(settings: Mapping[str, Any]) -> str:
    """One short line: ``text-bridge, Qwen/Qwen2-VL-7B-Instruct, greedy, QCD 0.5, ...``."""
    s = settings
    parts = [str(s[k]) for k in ("mode", "lvlm", "decoder") if s.get(k)]
    if "instruction" in s:
        if s["instruction"] == DEFAULT_INSTRUCTION:
            parts.append("release instruction")
        elif s["instruction"] is not None:
            parts.append("own instruction")
    if "hint" in s:
        hint = s["hint"]
        parts.append(
            "no hint" if hint is None
            else f"hint {UNKNOWN}" if hint == UNKNOWN
            else "hint (sentence unknown)" if hint == SOME_HINT
            else "hint"
        )  # fmt: skip
    if "num_tokens" in s:
        stops = s.get("stop_at_eos", s.get("mode") == "text-bridge")
        parts.append(f"at most {s['num_tokens']} tokens (stops at EOS)" if stops else f"exactly {s['num_tokens']} tokens (EOS ignored)")
    if s.get("greedy"):
        parts.append("greedy")
    elif "temperature" in s:
        parts.append(f"temperature {s['temperature']}, top-p {s.get('top_p')}")
    if "qcd_alpha" in s:
        parts.append(f"QCD {s['qcd_alpha']}" if s["qcd_alpha"] else "no QCD")
    if s.get("pooled"):
        parts.append(f"pooled {s['pooled']}")
    if s.get("t5_max_length"):
        parts.append(f"T5 up to {s['t5_max_length']} tokens")
    for key, unit in (("size", "px"), ("steps", "steps"), ("guidance", "guidance")):
        if key in s:
            parts.append(f"{s[key]} {unit}" if key != "guidance" else f"guidance {s[key]}")
    return ", ".join(parts)
