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
    options.add_argument("--window-size=1400,1700")
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


def test_a_session_in_the_browser(browser, app, tmp_path) -> None:
    url, backend = app
    started = time.perf_counter()
    driver = browser
    driver.get(url)
    wait(driver, lambda d: shown(d, "#add-text"))

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

    click(driver, "generate")
    wait(driver, lambda d: "judge reads:" in d.find_element(By.ID, "details").text, timeout=60)
    wait(driver, lambda d: shown(d, "#output-image img"))
    details = driver.find_element(By.ID, "details").text
    # The verdict on the page is the judge's reading of the image the job wrote.
    png = next(Path(backend.out_dir).glob("*/thinkdiff-lvlm-5.png"))
    verdict = backend.world.judge.read([np.asarray(Image.open(png))])[0].to_dict()
    assert "judge reads: " + ", ".join(f"{k} {v}" for k, v in verdict.items()) in details
    assert "seed 5" in details and "stage times:" in details
    # The sequence the app ran is the one typed and uploaded.
    import json

    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert [i.get("text") for i in sidecar["inputs"]["items"]] == [texts[0], None, texts[1], None, texts[2]]
    kept = [Path(i["image"]) for i in sidecar["inputs"]["items"] if "image" in i]
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in images]
    assert "thinkdiff-lvlm-5.json" in page_text(driver).replace("\n", "")  # offered for download

    # A broken image: a readable message in the page, and the app keeps serving.
    click(driver, "add-image")
    wait(driver, lambda d: shown(d, "#row-5-image"))
    driver.find_element(By.CSS_SELECTOR, "#row-5-image input[type=file]").send_keys(str(broken_png(tmp_path)))
    wait(driver, lambda d: "not a readable image" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status").text
    assert "row 6 (broken.png)" in status and "Traceback" not in page_text(driver)
    click(driver, "generate")  # the emptied image row is named
    wait(driver, lambda d: "row 6 is an image row without an image" in page_text(d))
    click(driver, "row-5-remove")
    wait(driver, lambda d: not shown(d, "#row-5"))

    # One click loads a mini-CoBSAT example; with the text bridge beside it.
    click(driver, "load-example")
    wait(driver, lambda d: "the answer should show" in d.find_element(By.ID, "status").text)
    driver.find_element(By.CSS_SELECTOR, "#text-bridge input").click()
    click(driver, "generate")
    wait(driver, lambda d: "text-bridge" in d.find_element(By.ID, "details").text, timeout=60)
    wait(driver, lambda d: shown(d, "#bridge-image img"))
    details = driver.find_element(By.ID, "details").text
    assert ("CORRECT" in details or "WRONG" in details) and "(target: " in details
    # The history gallery holds the session's images: the first job's, then this one's two.
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history img")) >= 3)
    assert "Traceback" not in page_text(driver)

    # The earlier messages' toasts are closed for the picture (they were read above).
    for button in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
        if button.is_displayed():
            button.click()
    wait(driver, lambda d: not any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, ".toast-body")))
    driver.execute_script("window.scrollTo(0, 0)")
    for path in [tmp_path / "app.png", os.environ.get("THINKDIFF_APP_SCREENSHOT")]:
        if path:
            assert driver.save_screenshot(str(path))
    assert Image.open(tmp_path / "app.png").size[0] >= 1000
    print(f"browser session: {time.perf_counter() - started:.1f} s")  # kept under a minute
