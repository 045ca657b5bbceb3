"""Query-contrastive decoding on tiny random Qwen2-VL / Qwen2.5-VL models (offline, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from tests.test_data_extraction import _check_against_direct
from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings
from thinkdiff.models.qcd import contrast_items, query_contrastive_processor
from thinkdiff.tiny.qwen import save_tiny_qwen_vl

RED = Image.new("RGB", (56, 56), (200, 10, 10))  # 4 visual tokens
BLUE = Image.new("RGB", (112, 112), (10, 10, 200))  # 16 visual tokens
# Two prompts of different lengths (left padding), images before and after text.
PROMPTS = [
    ["Pick the next one.", "Word 1: red, ", RED, "\n\nWord 2: blue, ", BLUE, "\n\nWord 3: green, "],
    [RED, "Which colour is this?"],
]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def extractor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LVLMFeatureExtractor:
    folder = save_tiny_qwen_vl(tmp_path_factory.mktemp("qcd") / request.param, kind=request.param, seed=0)
    return LVLMFeatureExtractor.from_pretrained(folder, device="cpu", max_images=4)


def test_contrast_items_drop_the_last_text() -> None:
    assert contrast_items(PROMPTS[0]) == PROMPTS[0][:-1]
    assert contrast_items(PROMPTS[1]) == [RED]
    assert contrast_items(["a", RED, "b", BLUE]) == ["a", RED, BLUE]
    with pytest.raises(ValueError, match="has none"):
        contrast_items([RED, Path("x.png")])
    with pytest.raises(ValueError, match="empty"):
        contrast_items(["only the query"])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        SamplingSettings(qcd_alpha=-0.1)


def test_alpha_zero_is_bit_identical_to_plain_sampling(extractor: LVLMFeatureExtractor) -> None:
    """The contrast machinery at weight 0 (contrast forward run, cache kept) changes no bit."""
    sampling = SamplingSettings(max_new_tokens=8, seed=3)
    inputs = extractor.prepare_inputs(PROMPTS)
    config = extractor._generation_config(sampling, with_states=True)
    config.output_scores = True

    def run(processors: LogitsProcessorList | None):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return extractor.model.generate(**inputs, generation_config=config, logits_processor=processors)

    plain = run(None)
    processor = query_contrastive_processor(extractor, PROMPTS, 0.0)
    contrasted = run(LogitsProcessorList([processor]))
    assert processor.steps == len(plain.scores) > 1  # the contrast ran at every step
    assert torch.equal(plain.sequences, contrasted.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, contrasted.scores, strict=True))
    assert all(
        torch.equal(a[-1], b[-1]) for a, b in zip(plain.hidden_states, contrasted.hidden_states, strict=True)
    )
    # The extractor's own path: qcd_alpha=0 is plain sampling.
    out = extractor.generate(PROMPTS, sampling)
    assert torch.equal(out.token_ids, plain.sequences[:, inputs["input_ids"].shape[1] :].masked_fill(
        ~out.feature_mask, extractor.pad_token_id
    ))


def _next_logits(extractor: LVLMFeatureExtractor, inputs, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Logits after prompt + tokens by one cache-free teacher-forced pass (no generate involved)."""
    dummy_B1 = torch.zeros_like(tokens_BT[:, :1])  # never fed: the pass stops before the last id
    features = extractor.features_from_tokens(inputs, torch.cat([tokens_BT, dummy_B1], 1)).features
    return extractor.model.lm_head(features[:, -1]).float()


def test_greedy_qcd_equals_a_two_pass_computation_by_hand(extractor: LVLMFeatureExtractor) -> None:
    alpha, steps = 2.0, 6  # strong enough that the tiny random models change their answers
    sampling = SamplingSettings.exactly(steps, do_sample=False, qcd_alpha=alpha)
    out = extractor.generate(PROMPTS, sampling, teacher_forced=True)

    full = extractor.prepare_inputs(PROMPTS)
    contrast = extractor.prepare_inputs([contrast_items(p) for p in PROMPTS])
    tokens_BT = torch.zeros(len(PROMPTS), 0, dtype=torch.long)
    for _ in range(steps):
        logits_BV = (1 + alpha) * _next_logits(extractor, full, tokens_BT) - alpha * _next_logits(
            extractor, contrast, tokens_BT
        )
        # min_new_tokens == steps; vision tokens are never sampled
        logits_BV[:, [*extractor.eos_token_ids, *extractor.vision_token_ids]] = -torch.inf
        tokens_BT = torch.cat([tokens_BT, logits_BV.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.token_ids, tokens_BT)
    plain = extractor.generate(PROMPTS, SamplingSettings.exactly(steps, do_sample=False))
    assert not torch.equal(plain.token_ids, out.token_ids)  # the contrast changed the answers


def test_top_p_applies_after_the_contrast(extractor: LVLMFeatureExtractor) -> None:
    """generate's processed scores are contrast -> temperature -> top-p (top-p does not commute with
    the contrast: applied first, it would keep the nucleus of the full prompt alone)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    alpha = 10.0  # the tiny random LVLM's near-flat distribution needs a strong contrast to move
    sampling = SamplingSettings.exactly(3, temperature=0.6, top_p=0.9, seed=11)
    full = extractor.prepare_inputs(PROMPTS)
    config = extractor._generation_config(sampling, with_states=False)
    config.output_scores = True
    processors = LogitsProcessorList([query_contrastive_processor(extractor, PROMPTS, alpha)])
    with torch.random.fork_rng():
        torch.manual_seed(11)
        scores_BV = extractor.model.generate(**full, generation_config=config, logits_processor=processors).scores[0]

    contrast = extractor.prepare_inputs([contrast_items(p) for p in PROMPTS])
    none_B0 = torch.zeros(len(PROMPTS), 0, dtype=torch.long)
    full_BV, contrast_BV = (_next_logits(extractor, x, none_B0) for x in (full, contrast))

    def warp(x_BV: torch.Tensor) -> torch.Tensor:
        x_BV = x_BV.clone()
        # min_new_tokens and the vision tokens' suppression (before the contrast or after: the same)
        x_BV[:, [*extractor.eos_token_ids, *extractor.vision_token_ids]] = -torch.inf
        return TopPLogitsWarper(0.9)(none_B0, TemperatureLogitsWarper(0.6)(none_B0, x_BV))

    by_hand_BV = warp((1 + alpha) * full_BV - alpha * contrast_BV)
    kept_BV = torch.isfinite(scores_BV)
    assert torch.equal(kept_BV, torch.isfinite(by_hand_BV))
    torch.testing.assert_close(scores_BV[kept_BV], by_hand_BV[kept_BV], atol=1e-4, rtol=1e-4)
    assert not torch.equal(kept_BV, torch.isfinite(warp(full_BV)))  # the other order keeps other tokens


def test_qcd_features_come_from_the_full_prompt(extractor: LVLMFeatureExtractor) -> None:
    """lvlm mode: the features of a QCD answer are the full prompt's states of its tokens."""
    sampling = SamplingSettings(max_new_tokens=6, seed=5, qcd_alpha=0.5)
    read = extractor.generate(PROMPTS, sampling)  # states read out of generate
    recomputed = extractor.generate(PROMPTS, sampling, teacher_forced=True)
    assert torch.equal(read.token_ids, recomputed.token_ids)
    mask = read.feature_mask
    assert torch.allclose(read.features[mask], recomputed.features[mask], atol=1e-5)
    again = extractor.features_from_tokens(extractor.prepare_inputs(PROMPTS), read.token_ids)
    assert torch.allclose(again.features[mask], read.features[mask], atol=1e-5)


# ---- feature extraction ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extraction_kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from thinkdiff.data.synthetic import write_tar_shards

    root = tmp_path_factory.mktemp("qcd-extraction")
    model = save_tiny_qwen_vl(root / "qwen", kind="qwen2_vl")
    write_tar_shards(root / "tars", num_shards=1, samples_per_shard=3, bad=False)
    return {"root": root, "model": model, "tars": root / "tars"}


def test_extraction_with_qcd_stores_full_prompt_features(extraction_kit: dict) -> None:
    import json

    from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
    from thinkdiff.data.feature_shards import FeatureShards

    kit = extraction_kit
    plain_settings = ExtractionSettings(max_new_tokens=6, seed=1)
    settings = ExtractionSettings(max_new_tokens=6, seed=1, qcd_alpha=2.0)
    engine = make_engine("hf", str(kit["model"]), settings)
    out = kit["root"] / "qcd"
    extract_features(kit["tars"], out, engine, settings, batch_size=2, progress=False)
    assert json.loads((out / "extraction.json").read_text())["qcd_alpha"] == 2.0
    plain_out = kit["root"] / "plain"
    extract_features(kit["tars"], plain_out, make_engine("hf", str(kit["model"]), plain_settings), plain_settings,
                     batch_size=2, progress=False)  # fmt: skip
    shards, plain = FeatureShards(out), FeatureShards(plain_out)
    assert any(not torch.equal(a["token_ids"], b["token_ids"]) for a, b in zip(shards, plain))
    # The stored features are the full prompt's states of the QCD tokens.
    assert _check_against_direct(engine.extractor, out, kit["tars"]) == 3
    with pytest.raises(ValueError, match="qcd_alpha"):  # a resume must use the same weight
        extract_features(kit["tars"], out, engine, plain_settings, batch_size=2, progress=False)


def test_vllm_engine_refuses_qcd(extraction_kit: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from thinkdiff.cli import main

    argv = ["extract-features", "--model", str(extraction_kit["model"]), "--source", str(extraction_kit["tars"]),
            "--out", str(extraction_kit["root"] / "vllm"), "--engine", "vllm", "--qcd-alpha", "0.5"]  # fmt: skip
    assert main(argv) == 2
    assert "vLLM cannot run query-contrastive decoding" in capsys.readouterr().err


# ---- the pipeline and thinkdiff generate --------------------------------------------------------

ITEMS = ["Word 1: white, ", RED, "\n\nWord 2: blue, ", BLUE, "\n\nWord 3: red, "]


def _by_hand(instruction: str, sampling: SamplingSettings, **kwargs):
    from thinkdiff.models.loading import resolve_model_dir

    extractor = LVLMFeatureExtractor.from_pretrained(resolve_model_dir("tiny:qwen2-vl"), device="cpu")
    return extractor.generate([[instruction, *ITEMS]], sampling, teacher_forced=True, **kwargs)


def test_text_bridge_with_qcd_and_hint(tiny_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinkdiff.pipelines import HINT_INSTRUCTION, InferenceSettings, Request, ThinkDiffPipeline

    asked: list[tuple[str, float]] = []
    original = LVLMFeatureExtractor.generate

    def recording(self, prompts, sampling=None, **kwargs):
        asked.extend((p[0], sampling.qcd_alpha) for p in prompts)
        return original(self, prompts, sampling, **kwargs)

    monkeypatch.setattr(LVLMFeatureExtractor, "generate", recording)
    # A short instruction: the tiny random LVLM then attends enough to the query to change its answer.
    plain = "Pick the next one."
    settings = InferenceSettings(instruction=plain, num_tokens=12, greedy=True, qcd_alpha=2.0, encoder_batch_size=4)
    pipe = ThinkDiffPipeline.from_pretrained(
        None, decoder="tiny:flux", lvlm="tiny:qwen2-vl", device="cpu", settings=settings
    )
    requests = [Request(ITEMS), Request(ITEMS, qcd_alpha=0.0), Request([plain, *ITEMS], hint=True)]
    texts = pipe.encode(requests).lvlm_texts
    hinted = f"{plain} {HINT_INSTRUCTION}"
    # One generate call per (instruction, weight); the instruction is added once, the hint after it.
    assert sorted(asked) == sorted([(plain, 2.0), (plain, 0.0), (hinted, 2.0)])
    monkeypatch.undo()

    def by_hand(instruction: str, alpha: float) -> str:
        sampling = SamplingSettings(max_new_tokens=12, do_sample=False, qcd_alpha=alpha)
        return _by_hand(instruction, sampling, with_states=False).texts[0]

    assert texts == [by_hand(plain, 2.0), by_hand(plain, 0.0), by_hand(hinted, 2.0)]
    assert texts[0] != texts[1]
    assert pipe.lvlm_conditioning(requests[2]) == {"instruction": hinted, "hint": HINT_INSTRUCTION, "qcd_alpha": 2.0}


def test_lvlm_mode_aligns_the_full_prompt_features_of_qcd_tokens(tiny_env: Path, tmp_path: Path) -> None:
    from tests.test_pipeline import make_model
    from thinkdiff.models.bundle import load_model
    from thinkdiff.pipelines import DEFAULT_INSTRUCTION, InferenceSettings, Request, ThinkDiffPipeline

    folder = make_model(tmp_path / "lvlm", "lvlm")
    settings = InferenceSettings(num_tokens=8, qcd_alpha=0.5)
    pipe = ThinkDiffPipeline.from_pretrained(folder, device="cpu", settings=settings)
    aligned = pipe.encode(Request(ITEMS, seed=7)).prompt_embeds[0]
    lvlm = _by_hand(DEFAULT_INSTRUCTION, SamplingSettings.exactly(8, seed=7, qcd_alpha=0.5))
    aligner, _ = load_model(folder)
    torch.testing.assert_close(aligned[:8], aligner(lvlm.features[0]), atol=1e-5, rtol=1e-4)


def test_settings_and_requests_are_checked(tiny_env: Path, tmp_path: Path) -> None:
    from tests.test_pipeline import make_model
    from thinkdiff.pipelines import InferenceSettings, Request, ThinkDiffPipeline

    with pytest.raises(ValueError, match="qcd_alpha must be >= 0"):
        InferenceSettings(qcd_alpha=-1)
    with pytest.raises(ValueError, match="appended to an instruction"):
        InferenceSettings(instruction=None, hint="A hint.")
    clip = ThinkDiffPipeline.from_pretrained(make_model(tmp_path / "clip", "clip", seed=1), device="cpu")
    with pytest.raises(ValueError, match="mode clip uses none"):
        clip.check(Request(ITEMS, qcd_alpha=0.5))


def test_generate_cli_records_qcd_and_hint(tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from thinkdiff.cli import main
    from thinkdiff.pipelines import DEFAULT_INSTRUCTION, HINT_INSTRUCTION
    from thinkdiff.pipelines.constants import hinted

    RED.save(tmp_path / "red.png")
    jobs = tmp_path / "jobs.jsonl"
    items = [{"text": "Word 1: red, "}, {"image": "red.png"}, {"text": "\n\nWord 2: blue, "}]
    jobs.write_text(json.dumps({"items": items, "out": "a.png"}) + "\n"
                    + json.dumps({"items": items, "qcd_alpha": 0, "hint": False, "out": "b.png"}) + "\n")  # fmt: skip
    fast = ["--height", "64", "--width", "64", "--steps", "1", "--num-tokens", "4"]
    common = ["--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:flux", *fast]
    assert main(["generate", *common, "--jobs", str(jobs), "--out", str(tmp_path / "out"), "--qcd-alpha", "--hint"]) == 0
    a = json.loads((tmp_path / "out" / "a.json").read_text())
    b = json.loads((tmp_path / "out" / "b.json").read_text())
    assert (a["conditioning"]["qcd_alpha"], a["conditioning"]["hint"]) == (0.5, HINT_INSTRUCTION)
    assert a["lvlm"] == {"instruction": hinted(DEFAULT_INSTRUCTION, HINT_INSTRUCTION), "hint": HINT_INSTRUCTION,
                         "qcd_alpha": 0.5}  # fmt: skip
    assert b["lvlm"] == {"instruction": DEFAULT_INSTRUCTION, "hint": None, "qcd_alpha": 0}
    capsys.readouterr()
    jobs.write_text(json.dumps({"items": items, "hint": "yes"}) + "\n")
    assert main(["generate", *common, "--jobs", str(jobs), "--out", str(tmp_path / "bad")]) == 2
    assert "hint must be true or false" in capsys.readouterr().err
    assert main(["generate", *common, "--text", "x", "--hint", "--no-instruction"]) == 2


# ---- CoBSAT: generate, results, the qcd ablation -------------------------------------------------


def test_qcd_ablation_and_the_results_record_generation(tiny_env: Path, tmp_path: Path) -> None:
    import json

    from transformers import AutoTokenizer

    from tests.conftest import write_feature_folder
    from thinkdiff.cli import main
    from thinkdiff.evaluation.cobsat import PUBLISHED, write_synthetic_dataset
    from thinkdiff.pipelines import HINT_INSTRUCTION

    tokenizer = AutoTokenizer.from_pretrained(tiny_env / "qwen2-vl")
    features = write_feature_folder(tmp_path / "features", tokenizer, per_shard=8)
    dataset = write_synthetic_dataset(tmp_path / "datasets")
    out = tmp_path / "ablation"
    argv = [
        "eval", "cobsat", "ablation", "qcd", "--features", str(features), "--preset", "debug-lvlm",
        "--dataset", str(dataset), "--out", str(out), "--train-args", "--max-steps 2 --val-every 0 --decode-every 0",
        "--tasks", "2", "--shots", "2", "--num-prompts", "1", "--steps", "1", "--size", "64",
        "--judge", "tiny:llava", "--max-new-tokens", "2", "--qcd-alpha", "0.7",
    ]  # fmt: skip
    assert main(argv) == 0
    expected = {
        "text-bridge": ("text-bridge", 0.0, None),
        "text-bridge-hint": ("text-bridge", 0.0, HINT_INSTRUCTION),
        "text-bridge-qcd": ("text-bridge", 0.7, None),
        "text-bridge-hint-qcd": ("text-bridge", 0.7, HINT_INSTRUCTION),
        "lvlm-qcd": ("lvlm", 0.7, None),
    }
    for variant, (mode, alpha, hint) in expected.items():
        sidecar = json.loads(next((out / "images" / variant).rglob("*.json")).read_text())
        generator = sidecar["generator"]
        assert (generator["mode"], generator["qcd_alpha"], generator["hint"]) == (mode, alpha, hint)
        assert (sidecar["output"]["lvlm"]["qcd_alpha"], sidecar["output"]["lvlm"]["hint"]) == (alpha, hint)
        results = json.loads((out / "results" / variant / "cobsat-results.json").read_text())
        assert results["generation"] == [generator]
        assert any(f"qcd_alpha={alpha!r}" in note for note in results["notes"])
    assert not (out / "runs" / "lvlm-qcd").exists()  # lvlm + QCD decodes with the method's model
    compare = (out / "compare" / "cobsat-compare.md").read_text()
    for label in ("text-bridge-hint-qcd", "lvlm-qcd", *PUBLISHED[2]):
        assert label in compare
    assert "Text bridge + hint + QCD (2026 follow-up, its method; avg only) (published) | - " in compare
    assert "| 0.693 |" in compare  # 2-shot only here; the CSV holds every published row
    assert '"Text bridge + hint + QCD (2026 follow-up, its method; avg only)",published,4,,avg,0.767' in (
        out / "compare" / "cobsat-compare.csv"
    ).read_text()


def test_task_format_extraction_with_hint_and_qcd(
    tiny_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
    from thinkdiff.data.feature_shards import FeatureShards
    from thinkdiff.data.sources import SkipLog, iter_samples, list_source_shards
    from thinkdiff.data.task_prompts import TASK_INSTRUCTION, group_task_prompts
    from thinkdiff.pipelines.constants import HINT_INSTRUCTION, hinted

    folder = tmp_path / "source"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 10, 200)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"thing {i}\n")
    settings = ExtractionSettings(
        max_new_tokens=5, task_shots=(2,), greedy=True, qcd_alpha=2.0, hint=HINT_INSTRUCTION
    )
    engine = make_engine("hf", "tiny:qwen2-vl", settings, device="cpu", dtype=torch.float32)
    asked: list[tuple[str, float]] = []
    original = LVLMFeatureExtractor.generate

    def recording(self, prompts, sampling=None, **kwargs):
        asked.extend((p[0], sampling.qcd_alpha) for p in prompts)
        return original(self, prompts, sampling, **kwargs)

    monkeypatch.setattr(LVLMFeatureExtractor, "generate", recording)
    extract_features(folder, tmp_path / "out", engine, settings, batch_size=2, progress=False)
    monkeypatch.undo()
    assert asked == [(hinted(TASK_INSTRUCTION, HINT_INSTRUCTION), 2.0)] * 2
    assert json.loads((tmp_path / "out" / "extraction.json").read_text())["hint"] == HINT_INSTRUCTION
    stored = [m["text"] for m in FeatureShards(tmp_path / "out").metadata(0)]
    samples = iter_samples(list_source_shards(folder)[0], SkipLog())
    hinted_items = [p.items for p in group_task_prompts(samples, (2,), instruction=hinted(TASK_INSTRUCTION, HINT_INSTRUCTION))]
    sampling = SamplingSettings(max_new_tokens=5, do_sample=False, qcd_alpha=2.0)
    assert stored == engine.extractor.generate(hinted_items, sampling, with_states=False).texts
    with pytest.raises(ValueError, match="task-format mode"):
        ExtractionSettings(hint=HINT_INSTRUCTION)
