"""CoBSAT protocol: prompt list, k-shot prompts, judge questions and reply parsing (no torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from thinkdiff.evaluation.cobsat import (
    TASK_COLUMN_ORDER,
    TASKS,
    build_prompt,
    build_prompts,
    judge_questions,
    parse_answer,
    prompts_list,
)

REFERENCE = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "cobsat" / "prompts_list_default.json"
)
# SHA-256 of prompts_list_default.json's list in compact JSON: checks the list even without the file.
REFERENCE_SHA256 = "2b9bb57fa0fbef66772c9c875434507619a088f331a97bc671547dfc1f2d5af1"

ENDING = ". Answer the number only and do not include any other texts (e.g., 1)."


def _as_json_list() -> list[dict[str, list[int]]]:
    return [{"x_list": x, "theta_list": t} for x, t in prompts_list()]


def test_prompt_list_matches_reference_hash() -> None:
    compact = json.dumps(_as_json_list(), separators=(",", ":")).encode()
    assert hashlib.sha256(compact).hexdigest() == REFERENCE_SHA256


@pytest.mark.skipif(not REFERENCE.is_file(), reason="shared reference file not present")
def test_prompt_list_matches_reference_file() -> None:
    assert _as_json_list() == json.loads(REFERENCE.read_text())


def test_prompt_list_leaves_global_random_alone() -> None:
    import random

    random.seed(7)
    expected = random.random()
    random.seed(7)
    prompts_list()
    assert random.random() == expected


def test_tasks_and_column_order() -> None:
    assert [TASKS[t].name for t in TASK_COLUMN_ORDER] == [
        "Color-I", "Background-I", "Style-I", "Action-I", "Texture-I",
        "Color-II", "Background-II", "Style-II", "Action-II", "Texture-II",
    ]  # fmt: skip
    assert TASKS[4].x_category == "animal" and TASKS[4].theta_category == "background"
    assert TASKS[4].theme == "background_animal"


def test_two_shot_style_i_with_3d_as_wireframe() -> None:
    # Prompt 0: x = [8, 7, 5, ...], theta = [7, 6, 3, 4, ...]; theta = object[theta[3]] = car.
    p = next(build_prompts([5], [2], [0]))
    assert p.text_inputs == ("wireframe: ", "futuristic: ", "icon: ")
    assert p.image_inputs == ("style_car/3d_car.jpg", "style_car/futuristic_car.jpg")
    assert (p.target_detail, p.target_obj) == ("icon", "car")
    assert p.true_labels == {"detail": 6, "obj": 5}
    assert p.stem == "0_car_3d_futuristic_icon"
    assert p.thinkdiff_items(instruction=None) == [
        "Word 1: wireframe, ",
        Path("style_car/3d_car.jpg"),
        "\n\nWord 2: futuristic, ",
        Path("style_car/futuristic_car.jpg"),
        "\n\nWord 3: icon, ",
    ]
    assert p.benchmark_items("/data") == [
        "wireframe: ",
        Path("/data/style_car/3d_car.jpg"),
        "futuristic: ",
        Path("/data/style_car/futuristic_car.jpg"),
        "icon: ",
    ]


def test_four_shot_style_i() -> None:
    p = next(build_prompts([5], [4], [0]))  # theta = object[theta[5] = 0] = leaf
    assert p.text_inputs == ("wireframe: ", "futuristic: ", "icon: ", "old: ", "pixel: ")
    assert p.image_inputs == (
        "style_leaf/3d_leaf.jpg",
        "style_leaf/futuristic_leaf.jpg",
        "style_leaf/icon_leaf.jpg",
        "style_leaf/old_leaf.jpg",
    )
    assert p.true_labels == {"detail": 3, "obj": 1}
    assert p.stem == "0_leaf_3d_futuristic_icon_old_pixel"


def test_two_shot_background_i_with_park_as_amusement_park() -> None:
    # Prompt 1: x = [7, 4, 3, ...], theta = [3, 4, 8, 1, ...]; theta = animal[1] = tiger.
    p = next(build_prompts([3], [2], [1]))
    assert p.text_inputs == ("space: ", "amusement park: ", "volcano: ")
    assert p.image_inputs == ("background_tiger/space_tiger.jpg", "background_tiger/park_tiger.jpg")
    assert p.stem == "1_tiger_space_park_volcano"
    assert p.true_labels == {"detail": 4, "obj": 2}


def test_four_shot_background_ii() -> None:
    p = next(build_prompts([4], [4], [1]))  # theta = background[theta[5] = 2] = glacier
    assert p.text_inputs == ("cow: ", "monkey: ", "pig: ", "dog: ", "sheep: ")
    assert p.image_inputs == (
        "background_cow/glacier_cow.jpg",
        "background_monkey/glacier_monkey.jpg",
        "background_pig/glacier_pig.jpg",
        "background_dog/glacier_dog.jpg",
    )
    assert (p.target_detail, p.target_obj) == ("glacier", "sheep")
    assert p.true_labels == {"detail": 3, "obj": 3}
    assert p.stem == "1_glacier_cow_monkey_pig_dog_sheep"


def test_two_shot_style_ii_file_names_keep_3d() -> None:
    # Prompt 13: x = [6, 0, 5, ...], theta = [9, 6, 2, 8, ...]; theta = style[8] = 3d.
    p = next(build_prompts([6], [2], [13]))
    assert p.text_inputs == ("book: ", "leaf: ", "box: ")
    assert p.image_inputs == ("style_book/3d_book.jpg", "style_leaf/3d_leaf.jpg")
    assert p.stem == "13_3d_book_leaf_box"
    assert p.true_labels == {"detail": 9, "obj": 6}


def test_build_prompt_validates() -> None:
    with pytest.raises(ValueError, match="shot=9"):
        build_prompt(1, 9, 0, list(range(10)), list(range(10)))
    with pytest.raises(ValueError, match="task_id=11"):
        build_prompt(11, 2, 0, list(range(10)), list(range(10)))
    with pytest.raises(ValueError, match=r"0\.\.999"):
        list(build_prompts([1], [2], [1000]))


def test_judge_questions_character_for_character() -> None:
    color = judge_questions("color_object")
    assert color["detail"] == (
        "What is the color (of the main object) in this image? Answer from the following options:  "
        "(1)yellow (2)white (3)red (4)purple (5)pink (6)orange (7)green (8)brown (9)blue (10)black" + ENDING
    )
    assert color["obj"] == (
        "What is the main object in this image? Answer from the following options:  "
        "(1)leaf (2)hat (3)cup (4)chair (5)car (6)box (7)book (8)ball (9)bag (10)apple" + ENDING
    )
    background = judge_questions("background_animal")
    assert background["detail"] == (
        "What is the background (of the main object) in this image? Answer from the following options:  "
        "(1)beach (2)desert (3)glacier (4)volcano (5)amusement park (6)gym (7)waterfall (8)space (9)cave "
        "(10)seafloor" + ENDING
    )
    assert background["obj"] == (
        "What is the main object in this image? Answer from the following options:  "
        "(1)zebra (2)tiger (3)sheep (4)pig (5)monkey (6)lion (7)dog (8)cow (9)cat (10)bird" + ENDING
    )
    assert "(8)futuristic (9)wireframe (10)old." in judge_questions("style_object")["detail"]
    assert judge_questions("action_animal")["detail"].startswith("What is the action (of the main object)")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("3", 3),
        ("Answer: 10", 10),
        ("(7)", 7),
        ("1 and 2", -1),  # digits concatenate to 12: out of range
        ("none", -1),
        ("", -1),
        ("0", -1),
        ("The answer is 5.", 5),
    ],
)
def test_parse_answer(reply: str, expected: int) -> None:
    assert parse_answer(reply) == expected
