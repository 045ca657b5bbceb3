"""The LVLM prompt renders byte for byte as the authors' release renders it; the mini world keeps
the instruction its VLM was trained on (recorded in its folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from thinkdiff.models.lvlm import PROMPT_FILE, LVLMFeatureExtractor, own_instruction, recorded_instruction
from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION, HINT_INSTRUCTION, hinted
from thinkdiff.pipelines.requests import cobsat_items
from thinkdiff.tiny.qwen import save_tiny_qwen_vl

# The release's multi-image test script (scripts/test/test_mllama_t5_decoder_flux_multi_image.py,
# lines 137-208: the question, then "Word 1: white, " + white_car.jpg, "\n\nWord 2: blue, " +
# blue_car.jpg, "\n\nWord 3: red, ", system "You are a helpful assistant.", add_vision_id=True),
# rendered by Qwen2-VL-7B-Instruct's chat template, written out by hand.
RELEASE_PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me "
    "a detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt "
    "and start the answer with 'Create an image'.\n"
    "\n"
    "Word 1: white, Picture 1: <|vision_start|><|image_pad|><|vision_end|>\n"
    "\n"
    "Word 2: blue, Picture 2: <|vision_start|><|image_pad|><|vision_end|>\n"
    "\n"
    "Word 3: red, <|im_end|>\n"
    "<|im_start|>assistant\n"
)

# The instruction the mini world's VLM learnt (one added token): the release's without its blank line.
OLD_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me "
    "a detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt "
    "and start the answer with 'Create an image'."
)

WHITE_CAR = Image.new("RGB", (56, 56), (240, 240, 240))
BLUE_CAR = Image.new("RGB", (56, 56), (20, 40, 200))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def extractor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LVLMFeatureExtractor:
    folder = save_tiny_qwen_vl(tmp_path_factory.mktemp("lvlm") / request.param, kind=request.param, seed=0)
    return LVLMFeatureExtractor.from_pretrained(folder, device="cpu")


def test_release_example_renders_byte_for_byte(extractor: LVLMFeatureExtractor) -> None:
    items = cobsat_items(["white", "blue", "red"], [WHITE_CAR, BLUE_CAR], instruction=DEFAULT_INSTRUCTION)
    assert extractor.chat_text(items) == RELEASE_PROMPT


def test_cobsat_protocol_items_render_as_the_release(extractor: LVLMFeatureExtractor, tmp_path: Path) -> None:
    from thinkdiff.evaluation.cobsat.protocol import CobsatPrompt

    prompt = CobsatPrompt(
        task_id=1,
        shot=2,
        index=0,
        x_items=("white", "blue", "red"),
        theta="car",
        text_inputs=("white: ", "blue: ", "red: "),
        image_inputs=("color_car/white_car.jpg", "color_car/blue_car.jpg"),
    )
    for rel in prompt.image_inputs:  # the benchmark's own files, here tiny stand-ins
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        WHITE_CAR.save(tmp_path / rel)
    assert extractor.chat_text(prompt.thinkdiff_items(tmp_path)) == RELEASE_PROMPT


def test_hint_joins_the_last_sentence_before_the_blank_line() -> None:
    body = DEFAULT_INSTRUCTION.removesuffix("\n\n")
    assert hinted(DEFAULT_INSTRUCTION, HINT_INSTRUCTION) == f"{body} {HINT_INSTRUCTION}\n\n"
    assert hinted(DEFAULT_INSTRUCTION, None) == DEFAULT_INSTRUCTION
    assert hinted(OLD_INSTRUCTION, HINT_INSTRUCTION) == f"{OLD_INSTRUCTION} {HINT_INSTRUCTION}"
    # The 2026 follow-up's early commit (4fd1494) placed its note exactly there.
    note = "Note: Focus mainly on understanding and following the meaning of the final text when creating your description."
    assert hinted(DEFAULT_INSTRUCTION, note).endswith("'Create an image'. Note: Focus mainly on understanding and "
                                                      "following the meaning of the final text when creating your "
                                                      "description.\n\n")


def test_own_instruction_replaces_the_release_one_hint_kept() -> None:
    assert own_instruction(DEFAULT_INSTRUCTION, OLD_INSTRUCTION) == OLD_INSTRUCTION
    assert own_instruction(hinted(DEFAULT_INSTRUCTION, HINT_INSTRUCTION), OLD_INSTRUCTION) == hinted(
        OLD_INSTRUCTION, HINT_INSTRUCTION
    )
    for other in ("Word 1: red, ", "\n\nWord 2: blue, ", OLD_INSTRUCTION, DEFAULT_INSTRUCTION + "x"):
        assert own_instruction(other, OLD_INSTRUCTION) == other
    assert own_instruction(DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION) == DEFAULT_INSTRUCTION


def test_recorded_instruction_file(tmp_path: Path) -> None:
    assert recorded_instruction(tmp_path) is None
    assert recorded_instruction("Qwen/Qwen2-VL-7B-Instruct") is None
    (tmp_path / PROMPT_FILE).write_text(json.dumps({"instruction": "Say it."}))
    assert recorded_instruction(tmp_path) == "Say it."
    for bad in ("{", "[1]", '{"instruction": ""}', '{"instruction": 3}'):
        (tmp_path / PROMPT_FILE).write_text(bad)
        with pytest.raises(ValueError, match=PROMPT_FILE):
            recorded_instruction(tmp_path)


def test_mini_world_prompts_render_as_before() -> None:
    """The mini VLM was trained on the instruction without the blank line: its folder records it,
    and a prompt written with the release's instruction renders exactly as the mini world's did."""
    from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompts
    from thinkdiff.miniworld.models import MiniWorld, default_weights_dir
    from thinkdiff.miniworld.text import MINI_INSTRUCTION

    world = MiniWorld(default_weights_dir())
    vlm = world.vlm
    assert vlm.instruction == MINI_INSTRUCTION == OLD_INSTRUCTION
    prompt = next(build_prompts([next(iter(MINI_TASKS))], [2], [0]))
    x0, x1, x2 = prompt.x_items
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    before = (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{OLD_INSTRUCTION}"
        f"Word 1: {x0}, Picture 1: {image}\n\nWord 2: {x1}, Picture 2: {image}\n\nWord 3: {x2}, <|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert vlm.chat_text(prompt.items(DEFAULT_INSTRUCTION)) == before
    hint = hinted(DEFAULT_INSTRUCTION, HINT_INSTRUCTION)
    assert vlm.chat_text(prompt.items(hint)) == before.replace(OLD_INSTRUCTION, f"{OLD_INSTRUCTION} {HINT_INSTRUCTION}")
    # The instruction stays one token of the VLM's vocabulary.
    ids = vlm.prepare_inputs([prompt.items(DEFAULT_INSTRUCTION)])["input_ids"][0].tolist()
    assert vlm.processor.tokenizer.convert_tokens_to_ids(OLD_INSTRUCTION) in ids
    # Without its record the VLM would read the release's blank line: the record is what keeps it.
    vlm.instruction = None
    try:
        assert vlm.chat_text(prompt.items(DEFAULT_INSTRUCTION)) != before
    finally:
        vlm.instruction = MINI_INSTRUCTION


def test_a_job_file_exported_before_the_blank_line_is_refused(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job file whose items start with the instruction as written before it ended with its blank
    line would give the LVLM the instruction twice (the pipeline adds the current one): refused in
    one line that says how to re-export it, before anything is generated. A current export runs."""
    from thinkdiff.cli import main
    from thinkdiff.evaluation.cobsat import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "datasets")
    jobs = tmp_path / "jobs.jsonl"
    export = ["eval", "cobsat", "prompts", "--format", "thinkdiff", "--dataset", str(dataset), "--out", str(jobs)]
    assert main([*export, "--tasks", "1", "--shots", "2", "--prompt-range", "0:1"]) == 0
    current = json.loads(jobs.read_text())
    assert current["items"][0] == {"text": DEFAULT_INSTRUCTION}
    generate = ["generate", "--mode", "text-bridge", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:flux", "--steps", "1"]
    generate += ["--height", "64", "--width", "64", "--num-tokens", "2", "--jobs", str(jobs)]
    old_body = DEFAULT_INSTRUCTION.rstrip()
    for old in (old_body, f"{old_body} {HINT_INSTRUCTION}"):
        jobs.write_text(json.dumps({**current, "items": [{"text": old}, *current["items"][1:]]}) + "\n")
        capsys.readouterr()
        assert main([*generate, "--out", str(tmp_path / "old")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{jobs} line 1" in err[0] and "eval cobsat prompts" in err[0], err
        assert not (tmp_path / "old").exists()
    jobs.write_text(json.dumps(current) + "\n")
    assert main([*generate, "--out", str(tmp_path / "new")]) == 0
    assert len(list((tmp_path / "new").glob("*.png"))) == 1
