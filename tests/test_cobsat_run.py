"""CoBSAT end to end on a synthetic dataset: generation loop, tiny LLaVA judge, CLIP metric, CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from thinkdiff.cli import main
from thinkdiff.evaluation.cobsat import (
    LLAVA_PORT_NOTE,
    LLAVA_V1_SYSTEM,
    ClipScorer,
    CobsatDataset,
    LlavaJudge,
    build_prompts,
    generate_cobsat,
    judge_cobsat,
    judge_questions,
    output_path,
    parse_answer,
    read_judgements,
    score_records,
    write_synthetic_dataset,
)


class SolidGenerator:
    """Returns a solid image whose red channel is the seed: enough to test the loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str | Path], int]] = []

    def __call__(self, items: Sequence[str | Path], seed: int) -> Image.Image:
        self.calls.append((list(items), seed))
        return Image.new("RGB", (16, 16), (seed % 256, 40, 80))


class BatchSolidGenerator(SolidGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def generate_batch(
        self, batch: Sequence[Sequence[str | Path]], seeds: Sequence[int]
    ) -> list[Image.Image]:
        self.batches.append(len(batch))
        return [self(items, seed) for items, seed in zip(batch, seeds)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CobsatDataset:
    return CobsatDataset.load(write_synthetic_dataset(tmp_path_factory.mktemp("cobsat") / "datasets", size=8))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from thinkdiff.tiny import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def llava_judge(tiny_llava: Path) -> LlavaJudge:
    return LlavaJudge.from_pretrained(tiny_llava, device="cpu", max_new_tokens=4)


def test_generation_writes_the_scheme_and_resumes(dataset: CobsatDataset, tmp_path: Path) -> None:
    gen = SolidGenerator()
    report = generate_cobsat(gen, dataset, tmp_path, tasks=[5, 3], shots=[2, 4], indices=range(3))
    assert (report.total, report.written, report.skipped) == (12, 12, 0)
    image = tmp_path / "shot_2" / "task_5" / "0_car_3d_futuristic_icon.jpg"
    with Image.open(image) as im:
        assert im.format == "JPEG" and im.size == (16, 16)
    sidecar = json.loads(image.with_suffix(".json").read_text())
    assert sidecar["text_inputs"] == ["wireframe: ", "futuristic: ", "icon: "]
    assert sidecar["seed"] == 123 and sidecar["items"][1] == {"text": "Word 1: wireframe, "}
    assert not list(tmp_path.rglob("*.tmp"))
    # Every sample is reseeded with 123; image items are absolute paths into the dataset.
    items, seed = gen.calls[0]
    assert seed == 123 and all(p.is_file() for p in items if isinstance(p, Path))

    again = generate_cobsat(gen, dataset, tmp_path, tasks=[5, 3], shots=[2, 4], indices=range(3))
    assert (again.written, again.skipped) == (0, 12) and len(gen.calls) == 12
    image.unlink()
    assert generate_cobsat(gen, dataset, tmp_path, tasks=[5, 3], shots=[2, 4], indices=range(3)).written == 1


def test_generation_batches(dataset: CobsatDataset, tmp_path: Path) -> None:
    gen = BatchSolidGenerator()
    report = generate_cobsat(
        gen, dataset, tmp_path, tasks=[1], shots=[2], indices=range(10), batch_size=4, seed=7
    )
    assert report.written == 10 and gen.batches == [4, 4, 2]
    assert {seed for _, seed in gen.calls} == {7}
    with pytest.raises(ValueError, match="batch_size"):
        generate_cobsat(gen, dataset, tmp_path, batch_size=0)


def test_llava_judge_prompt_and_batching(llava_judge: LlavaJudge, dataset: CobsatDataset) -> None:
    q = judge_questions("color_object")["detail"]
    assert llava_judge.prompt(q) == f"{LLAVA_V1_SYSTEM} USER: <image>\n{q} ASSISTANT:"
    assert LLAVA_PORT_NOTE in llava_judge.info.notes
    images = [dataset.image("color_car/red_car.jpg"), dataset.image("style_hat/3d_hat.jpg")]
    questions = [q, judge_questions("style_object")["obj"]]
    # Left padding: a batch gives each pair the reply it gets alone (greedy).
    batched = llava_judge.answer(images, questions)
    assert batched == [llava_judge.answer([i], [qq])[0] for i, qq in zip(images, questions)]


def test_tiny_llava_judge_writes_jsonl_and_resumes(
    llava_judge: LlavaJudge, dataset: CobsatDataset, tmp_path: Path
) -> None:
    images, results = tmp_path / "images", tmp_path / "results"
    generate_cobsat(SolidGenerator(), dataset, images, tasks=[2], shots=[2], indices=range(3))
    output_path(images, next(build_prompts([2], [2], [2]))).unlink()  # one missing image
    report = judge_cobsat(llava_judge, images, results, tasks=[2], shots=[2], indices=range(3), batch_size=3)
    assert (report.asked, report.missing_images) == (4, 1)
    log_dir = results / "judgements" / "llava"
    assert json.loads((log_dir / "judge.json").read_text())["kind"] == "llava"
    records = read_judgements(log_dir)
    assert len(records) == 4
    for r in records.values():
        assert r["question"] == judge_questions("color_object")[r["question_kind"]]
        assert r["answer"] == parse_answer(r["reply"])
    assert judge_cobsat(llava_judge, images, results, tasks=[2], shots=[2], indices=range(3)).asked == 0
    cell = score_records(records, images, tasks=[2], shots=[2], indices=range(3))[(2, 2)]
    assert (cell.n, cell.judged, cell.missing) == (3, 2, 1)


def test_qwen2_vl_judge(dataset: CobsatDataset, tmp_path: Path) -> None:
    from thinkdiff.evaluation.cobsat import ChatVLMJudge, load_judge
    from thinkdiff.tiny import save_tiny_qwen2_vl

    judge = load_judge(save_tiny_qwen2_vl(tmp_path / "qwen2-vl"), device="cpu", max_new_tokens=3)
    assert isinstance(judge, ChatVLMJudge) and judge.info.kind == "chat-vlm"
    replies = judge.answer(
        [dataset.image("color_car/red_car.jpg")] * 2, list(judge_questions("color_object").values())
    )
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_clip_metric_logs_and_scores(dataset: CobsatDataset, tmp_path: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from thinkdiff.tiny.tokenizers import save_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(save_clip_tokenizer(tmp_path / "clip-tok"))
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    size = {"shortest_edge": 32}, {"height": 32, "width": 32}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size=size[0], crop_size=size[1]), tokenizer=tok
    )
    clip = ClipScorer(model, processor, "tiny-clip")

    images, results = tmp_path / "images", tmp_path / "results"
    generate_cobsat(SolidGenerator(), dataset, images, tasks=[1], shots=[2], indices=range(2))
    report = judge_cobsat(None, images, results, tasks=[1], shots=[2], indices=range(2), clip=clip)
    assert (report.asked, report.clip_scored) == (0, 2)
    records = read_judgements(results / "judgements" / "clip--tiny-clip")
    r = records[(2, 1, 0, "clip")]
    assert 1 <= r["pred_detail"] <= 10 and 1 <= r["pred_obj"] <= 10
    assert r["correct"] == (r["check_detail"] and r["check_obj"])
    cell = score_records(records, images, tasks=[1], shots=[2], indices=range(2), kinds=("clip",))[(2, 1)]
    assert cell.judged == 2
    assert (
        judge_cobsat(None, images, results, tasks=[1], shots=[2], indices=range(2), clip=clip).clip_scored
        == 0
    )


def test_cli_score_and_report(
    tiny_llava: Path, dataset: CobsatDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    generate_cobsat(SolidGenerator(), dataset, images, tasks=[1], shots=[2], indices=range(2))
    common = ["--tasks", "Color-I", "--shots", "2", "--num-prompts", "3"]
    rc = main(
        ["eval", "cobsat", "score", "--images", str(images), "--dataset", str(dataset.root), "--judge",
         str(tiny_llava), "--max-new-tokens", "2", "--batch-size", "4", "--device", "cpu", *common]
    )  # fmt: skip
    assert rc == 0
    out_dir = images / "eval-llava"
    md = (out_dir / "cobsat-results.md").read_text()
    assert LLAVA_PORT_NOTE in md and "| Color-I | 0." in md
    payload = json.loads((out_dir / "cobsat-results.json").read_text())
    cell = payload["cells"][0]
    assert (cell["n"], cell["judged"], cell["missing"]) == (3, 2, 1)
    assert "2-shot avg accuracy" in capsys.readouterr().out

    # Without selection options, report covers what the judging shards recorded (task 1, 2-shot, 0..2).
    (out_dir / "cobsat-results.md").unlink()
    assert main(["eval", "cobsat", "report", "--results", str(out_dir), "--images", str(images)]) == 0
    assert LLAVA_PORT_NOTE in (out_dir / "cobsat-results.md").read_text()
    payload = json.loads((out_dir / "cobsat-results.json").read_text())
    assert [(c["shot"], c["task_id"], c["n"]) for c in payload["cells"]] == [(2, 1, 3)]


def test_cli_prompts_and_errors(
    dataset: CobsatDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "cobsat", "prompts", "--tasks", "5", "--shots", "2", "4", "--num-prompts", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["shot"], r["index"]) for r in lines] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert lines[0]["text_inputs"] == ["wireframe: ", "futuristic: ", "icon: "]

    out = tmp_path / "prompts.jsonl"
    argv = [
        "eval",
        "cobsat",
        "prompts",
        "--dataset",
        str(dataset.root),
        "--format",
        "thinkdiff",
        "--out",
        str(out),
    ]
    assert main([*argv, "--prompt-range", "10:12"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 10 * 2
    assert Path(records[0]["meta"]["image_inputs"][0]).is_file()
    assert records[0]["items"][0]["text"].startswith("I give you several words and pictures.")

    # Bad input: one line on stderr, exit status 2.
    (tmp_path / "broken").mkdir()
    assert main(["eval", "cobsat", "check-dataset", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "500 of 500 images missing" in err[0]
    assert main(["eval", "cobsat", "prompts", "--prompt-range", "5:2"]) == 2
    assert main(["eval", "cobsat", "prompts", "--tasks", "Colour-I"]) == 2
    argv = [
        "eval",
        "cobsat",
        "generate",
        "--mode",
        "lvlm",
        "--model",
        str(tmp_path),
        "--dataset",
        str(dataset.root),
    ]
    assert main([*argv, "--out", str(tmp_path / "gen")]) == 2
    assert "not a ThinkDiff model folder" in capsys.readouterr().err


def test_judge_pads_images_to_square_like_llava() -> None:
    from thinkdiff.evaluation.cobsat.judge import _expand_to_square

    wide = Image.new("RGB", (6, 2), (255, 255, 255))
    square = _expand_to_square(wide, (122, 116, 104))
    assert square.size == (6, 6)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((0, 2)) == (255, 255, 255)
    assert _expand_to_square(square, (0, 0, 0)) is square


def test_judge_reads_images_through_the_project_loader(
    llava_judge: LlavaJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transparency lands on white and 16-bit is scaled, as for every model input (thinkdiff.imaging)."""
    import numpy as np

    seen: list[Image.Image] = []
    processor_cls = type(llava_judge.processor)
    original = processor_cls.__call__

    def spy(self, *args, **kwargs):
        seen.extend(kwargs["images"] if "images" in kwargs else args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(processor_cls, "__call__", spy)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(clear)  # fully transparent red
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 0x8000, np.uint16)).save(deep)  # 16-bit mid grey
    llava_judge.answer([clear, deep], [judge_questions("color_object")["detail"]] * 2)
    assert [np.asarray(im).tolist() for im in seen] == [
        np.full((8, 8, 3), 255).tolist(),
        np.full((8, 8, 3), 128).tolist(),
    ]
