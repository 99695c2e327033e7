"""The page in a real browser: Debian's headless Chromium, driven by selenium, on a live server.

Uploads a gallery photo, waits for the grid, checks the first result, its score and the copy
badges, clicks
"More like this", refuses a text file with a message, and saves screenshots (a laptop and a
phone-width window) into $SIAMESE_CV_SCREENSHOTS, or the test's temp folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from served import build_project, gallery_rows, stored_image

from siamese_cv.serve import Settings, create_app

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("SIAMESE_CV_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SIAMESE_CV_CHROMEDRIVER", "/usr/bin/chromedriver"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real uvicorn server of a tiny project on 127.0.0.1, in a thread; yields its URL."""
    import uvicorn

    root = build_project(tmp_path_factory)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(Settings(project_dir=root, reload_interval_s=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SIAMESE_CV_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_page_searches_an_uploaded_photo_and_more_like_this(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, root = server
    row = gallery_rows(root)[5]
    photo = tmp_path / "query.jpg"
    photo.write_bytes(stored_image(root, row["id"]))
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: "12 photos in 3 classes" in d.find_element(By.ID, "about").text)
    Select(browser.find_element(By.ID, "top")).select_by_visible_text("10")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .hit")) == 10)
    first = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[0]
    assert first.find_element(By.CSS_SELECTOR, ".label").text == row["label_name"]
    rank, score = first.find_element(By.CSS_SELECTOR, ".score").text.split(" · ")
    assert rank == "#1" and float(score) >= 0.999
    assert first.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "64"
    assert "Your photo: query.jpg" in browser.find_element(By.ID, "query-caption").text
    # the copies the API marks for this photo lead the grid, each with its badge and score
    api = httpx.post(
        url + "/api/search", files={"image": photo.read_bytes()}, data={"top": "10"}
    ).json()
    copies = [h for h in api["hits"] if h["copy"]]
    assert copies and copies[0]["id"] == row["id"]
    shown = browser.find_elements(By.CSS_SELECTOR, "#grid .hit.copy")
    assert shown == browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[: len(copies)]
    for hit, item in zip(copies, shown, strict=True):
        badge = item.find_element(By.CSS_SELECTOR, ".badge")
        assert badge.text == f"copy · {hit['copy_score']:.3f}"
        assert badge.get_attribute("title") == f"a copy of the query: {api['copy_rule']}"
    count = f"{len(copies)} {'copy' if len(copies) == 1 else 'copies'} of the query first"
    assert count in browser.find_element(By.ID, "summary").text
    folder = screenshot_dir(tmp_path)
    browser.save_screenshot(str(folder / "search.png"))

    second = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[1]
    second_id = second.find_element(By.TAG_NAME, "img").get_attribute("alt")
    second.find_element(By.CSS_SELECTOR, ".more").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "query-caption"), "Gallery photo"))
    caption = browser.find_element(By.ID, "query-caption").text
    assert caption.split("Gallery photo ")[1].split(" (")[0] in second_id
    top = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[0]
    assert top.find_element(By.CSS_SELECTOR, ".score").text == "#1 · 1.000"
    browser.save_screenshot(str(folder / "more_like_this.png"))

    text = tmp_path / "notes.jpg"
    text.write_text("not a photo at all\n")
    browser.find_element(By.ID, "file").send_keys(str(text))
    message = wait.until(seen.visibility_of_element_located((By.ID, "message")))
    assert message.text.startswith("Refused: image: not an image (text)")

    browser.set_window_size(390, 844)  # a phone-width window
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: not d.find_element(By.ID, "message").is_displayed())
    wait.until(lambda d: "query.jpg" in d.find_element(By.ID, "query-caption").text)
    grid = browser.find_element(By.ID, "grid")
    assert grid.size["width"] <= 390  # no sideways scrolling
    browser.save_screenshot(str(folder / "phone.png"))
    if folder != tmp_path:  # screenshots kept elsewhere: keep the query beside them
        shutil.copy(photo, folder / "query.jpg")
