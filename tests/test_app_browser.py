"""``thinkdiff app`` in a real headless browser: Debian's chromium driven by selenium + chromium-driver.

A person's session on the miniature world: build the sequence row by row (reorder and remove
included), upload two images, type three texts, Generate, read the judge's verdict; then upload a
broken image and read the message; then one click on an example. A screenshot is saved
(``THINKDIFF_APP_SCREENSHOT=docs/app.png`` writes the one the docs show).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_app import broken_png, serve  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")  # a laptop screen: results start below the fold
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    url, backend, demo = serve(tmp_path_factory.mktemp("app-browser-out"))
    yield url, backend
    demo.close()


def wait(driver, condition, timeout: float = 20):
    # Gradio redraws components on updates: a stale element is looked up again on the next poll.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda d: condition(d))


def shown(driver, css: str) -> bool:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def click(driver, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def test_a_session_in_the_browser(browser, app, tmp_path, capfd) -> None:
    url, backend = app
    started = time.perf_counter()
    driver = browser
    driver.get(url)
    wait(driver, lambda d: shown(d, "#add-text"))

    # The model list opens on the method, labelled as such with its measured score (from the report).
    from thinkdiff.miniworld.catalogue import world_models

    method = world_models(backend.world.root)[0]
    assert method.role == "method"
    assert "the method" in driver.find_element(By.CSS_SELECTOR, "#model input").get_attribute("value")
    note = driver.find_element(By.ID, "model-note").text
    assert "the method" in note and f"{method.score:.3f}" in note
    assert "The first job also loads the models" in page_text(driver)
    # The comparison is on by default; the rarely used settings are folded, with the real defaults.
    assert driver.find_element(By.CSS_SELECTOR, "#text-bridge input").is_selected()
    assert not any(
        e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, "#advanced textarea, #advanced input")
    )
    driver.find_element(By.CSS_SELECTOR, "#advanced button").click()
    wait(driver, lambda d: any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "#advanced input")))
    placeholders = {
        e.get_attribute("placeholder")
        for e in driver.find_elements(By.CSS_SELECTOR, "#advanced input, #advanced textarea")
    }
    defaults = backend.decoder_defaults(backend.model_choices()[0])
    for name in ("width", "steps", "true_cfg"):
        assert f"{defaults[name]:g} (default)" in placeholders, (name, placeholders)
    driver.find_element(By.CSS_SELECTOR, "#advanced button").click()

    # The sequence, row by row: text, image, text, image, text.
    for n, kind in enumerate(["text", "image", "text", "image", "text"]):
        click(driver, f"add-{kind}")
        wait(driver, lambda d, n=n, kind=kind: shown(d, f"#row-{n}-{kind}"))
    # Reorder: row 1 (image) up, then back down; remove an extra row.
    click(driver, "row-1-up")
    wait(driver, lambda d: shown(d, "#row-0-image") and shown(d, "#row-1-text"))
    click(driver, "row-0-down")
    wait(driver, lambda d: shown(d, "#row-0-text") and shown(d, "#row-1-image"))
    click(driver, "add-text")
    wait(driver, lambda d: shown(d, "#row-5-text"))
    click(driver, "row-5-remove")
    wait(driver, lambda d: not shown(d, "#row-5"))

    example = backend.example("Color-II", 2, 0)
    texts = [item for item in example["items"] if isinstance(item, str)]
    images = [item for item in example["items"] if not isinstance(item, str)]
    for row, text in zip((0, 2, 4), texts):
        driver.find_element(By.CSS_SELECTOR, f"#row-{row}-text textarea").send_keys(text)
    for row, path in zip((1, 3), images):
        driver.find_element(By.CSS_SELECTOR, f"#row-{row}-image input[type=file]").send_keys(str(path))
        wait(driver, lambda d, row=row: shown(d, f"#row-{row}-image img"))
    seed = driver.find_element(By.CSS_SELECTOR, "#seed input")
    seed.clear()
    seed.send_keys("5")

    driver.execute_script("window.scrollTo(0, 0)")
    first_job = time.perf_counter()
    click(driver, "generate")
    # The page scrolls to the results, which start below the fold.
    wait(driver, lambda d: d.execute_script("return window.scrollY") > 0)
    wait(driver, lambda d: "judge reads:" in d.find_element(By.ID, "details").text, timeout=90)
    wait(driver, lambda d: shown(d, "#output-image img") and shown(d, "#bridge-image img"))
    first_job = time.perf_counter() - first_job
    details = driver.find_element(By.ID, "details").text
    # The verdict on the page is the judge's reading of the image the job wrote.
    png = next(Path(backend.out_dir).glob("*/thinkdiff-lvlm-5.png"))
    verdict = backend.world.judge.read([np.asarray(Image.open(png))])[0].to_dict()
    assert "judge reads: " + ", ".join(f"{k} {v}" for k, v in verdict.items()) in details
    assert "seed 5" in details and "stage times:" in details and "text-bridge" in details
    # The sequence the app ran is the one typed and uploaded.
    import json

    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert [i.get("text") for i in sidecar["inputs"]["items"]] == [texts[0], None, texts[1], None, texts[2]]
    kept = [Path(i["image"]) for i in sidecar["inputs"]["items"] if "image" in i]
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in images]
    assert "thinkdiff-lvlm-5.json" in page_text(driver).replace("\n", "")  # offered for download
    shown_image = driver.find_element(By.CSS_SELECTOR, "#output-image img").get_attribute("src")

    # A broken image over a good one: a readable message, and the good image stays in its row.
    click(driver, "add-image")
    wait(driver, lambda d: shown(d, "#row-5-image"))
    driver.find_element(By.CSS_SELECTOR, "#row-5-image input[type=file]").send_keys(str(images[0]))
    wait(driver, lambda d: shown(d, "#row-5-image img"))
    good = driver.find_element(By.CSS_SELECTOR, "#row-5-image img").get_attribute("src")
    driver.find_element(By.CSS_SELECTOR, "#row-5-image input[type=file]").send_keys(str(broken_png(tmp_path)))
    wait(driver, lambda d: "not a readable image" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status").text
    assert "row 6 (broken.png)" in status and "Traceback" not in page_text(driver) and "Error:" not in status
    wait(driver, lambda d: shown(d, "#row-5-image img"))  # the good image is back
    assert (
        driver.find_element(By.CSS_SELECTOR, "#row-5-image img").get_attribute("src").rsplit("/", 1)[-1]
        == (good.rsplit("/", 1)[-1])
    )
    click(driver, "row-5-remove")
    wait(driver, lambda d: not shown(d, "#row-5"))

    # A user's mistake (Generate on an empty sequence): one line in the status; the last results
    # stay, with no error badge over them; clear empties the message.
    click(driver, "clear")
    wait(driver, lambda d: not shown(d, "#row-0"))
    assert driver.find_element(By.ID, "status").text == ""
    click(driver, "generate")
    wait(driver, lambda d: "the sequence is empty" in d.find_element(By.ID, "status").text)
    assert driver.find_element(By.CSS_SELECTOR, "#output-image img").get_attribute("src") == shown_image
    assert "Error" not in driver.find_element(By.ID, "results").text

    # One click on an example's thumbnail loads it (the text bridge stays beside it).
    driver.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item, #examples .thumbnail-item")[
        0
    ].click()
    wait(driver, lambda d: "the answer should show" in d.find_element(By.ID, "status").text)
    assert "Color-I, 2-shot, prompt 0" in driver.find_element(By.ID, "status").text
    assert driver.find_element(By.CSS_SELECTOR, "#text-bridge input").is_selected()
    click(driver, "generate")
    wait(driver, lambda d: "(target: " in d.find_element(By.ID, "details").text, timeout=60)
    details = driver.find_element(By.ID, "details").text
    assert ("CORRECT" in details or "WRONG" in details) and "text-bridge" in details
    # The history gallery holds the session's images: both jobs' two each.
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history img")) >= 4)
    assert "Traceback" not in page_text(driver)
    # The user's mistakes left no traceback in the server's log either.
    assert "Traceback" not in capfd.readouterr().err

    driver.set_window_size(1400, 2000)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    for path in [tmp_path / "app.png", os.environ.get("THINKDIFF_APP_SCREENSHOT")]:
        if path:
            assert driver.save_screenshot(str(path))
    assert Image.open(tmp_path / "app.png").size[0] >= 1000
    print(
        f"first job (models loading) {first_job:.1f} s; browser session {time.perf_counter() - started:.1f} s"
    )


def test_the_clip_example_in_the_browser(browser, app) -> None:
    """One click loads ThinkDiff-CLIP's example (one image, the calibrated CLIP aligner, its mode),
    with its one line on what was measured; Generate draws it and the judge reads it."""
    url, backend = app
    driver = browser
    driver.get(url)
    wait(driver, lambda d: shown(d, "#clip-example"))
    click(driver, "clip-example")
    wait(driver, lambda d: "ThinkDiff-CLIP: one image in" in d.find_element(By.ID, "status").text)
    assert "all four attributes kept" in driver.find_element(By.ID, "status").text
    wait(driver, lambda d: "clip-calibrated" in d.find_element(By.CSS_SELECTOR, "#model input").get_attribute("value"))
    wait(driver, lambda d: shown(d, "#row-0-image img") and not shown(d, "#row-1"))
    click(driver, "generate")
    wait(driver, lambda d: "(target: " in d.find_element(By.ID, "details").text, timeout=60)
    details = driver.find_element(By.ID, "details").text
    assert "clip" in details and ("CORRECT" in details or "WRONG" in details)
    assert next(Path(backend.out_dir).glob("*/thinkdiff-clip-*.png")).is_file()
