"""The web page (serve/page.py, serve/static/): its routes, and the real page in headless Chromium.

The browser tests serve the default model (EfficientNet-Lite0) under a real gunicorn, drive
Debian's chromium through Selenium, upload scikit-image's cat photo through the file input and read
the answer off the page, then upload a text file and read the error. Screenshots are kept in
test-artifacts/ (git-ignored) and in tmp_path. They skip, saying why, where chromium, chromedriver or
selenium is missing (`apt-get install -y chromium chromium-driver`, `pip install selenium`).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from servers import ROOT, Server

from serve.page import STATIC_DIR

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60


# ---- routes, through the test client (no browser) ------------------------------------------------


def test_index_and_assets(client):
    index = client.get("/")
    assert index.status_code == 200 and index.mimetype == "text/html"
    html = index.get_data(as_text=True)
    assert '<input id="file" type="file" accept="image/*"' in html
    assert 'accept="image/*" capture="environment"' in html
    assert "default-src 'none'" in index.headers["Content-Security-Policy"]
    assert index.headers["X-Content-Type-Options"] == "nosniff"
    for path, mimetype in [("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        asset = client.get(path)
        assert asset.status_code == 200 and asset.mimetype == mimetype, path
        assert asset.data == (STATIC_DIR / path.removeprefix("/ui/")).read_bytes()
    # The API around it is unchanged.
    assert client.get("/models").json["models"][0]["name"] == "tiny"


@pytest.mark.parametrize("path", [
    "/ui/../page.py", "/ui/..%2fpage.py", "/ui/%2e%2e/page.py", "/ui/../../README.md",
    "/ui/%2e%2e%2f%2e%2e%2fREADME.md", "/ui//etc/passwd", "/ui/..\\page.py", "/ui/missing.js",
])
def test_no_path_escapes_the_static_folder(client, path):
    answer = client.get(path, follow_redirects=True)  # werkzeug redirects "//" to "/" first
    assert answer.status_code == 404, path
    assert b"Blueprint" not in answer.data and b"torch-serve" not in answer.data


def test_page_fetches_nothing_from_elsewhere():
    # The only absolute URL allowed is the SVG namespace inside the inline icon (an identifier, not a fetch).
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert not re.findall(r"(?:https?:)?//(?!www\.w3\.org/2000/svg)[\w.-]+\.[a-z]{2,}/", text), name
        assert "@import" not in text and "@font-face" not in text, name


# ---- the page in headless Chromium ---------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """The default model under a real gunicorn, as `make serve` runs it."""
    server = Server({"SERVE_DEVICE": "cpu", "WEB_CONCURRENCY": "1"},
                    tmp_path_factory.mktemp("page") / "gunicorn.log", inherit_settings=False)
    yield server.url + "/"
    assert server.stop() == 0


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

    profile = tempfile.mkdtemp(prefix="page-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path too, Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def cat_file(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("page") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, "JPEG", quality=95)
    return path


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait_for_answer(driver) -> str:
    """Wait until the page shows a prediction or an error; return which ("done" or "error")."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: by_id(d, "main").get_attribute("data-state") in ("done", "error"))
    return by_id(driver, "main").get_attribute("data-state")


def upload(driver, path: Path) -> str:
    # Reset the state first, so a previous answer isn't taken for this one.
    driver.execute_script("document.getElementById('main').dataset.state = 'idle'")
    by_id(driver, "file").send_keys(str(path))
    return wait_for_answer(driver)


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    assert driver.save_screenshot(str(tmp_path / name))
    shutil.copyfile(tmp_path / name, ARTIFACTS / name)
    return ARTIFACTS / name


def page_ready(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    # The model list comes from GET /models; the select is enabled once it has arrived.
    WebDriverWait(driver, WAIT_S).until(lambda d: by_id(d, "model").is_enabled())


@pytest.mark.browser
@pytest.mark.server
def test_cat_photo_and_a_bad_file_in_chromium(browser, live_server, cat_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page_ready(browser, live_server)
    assert browser.title == "Image classifier"
    model = Select(by_id(browser, "model"))
    assert model.first_selected_option.text == "efficientnet_lite0"
    assert "1,000 classes" in by_id(browser, "model-info").text

    state = upload(browser, cat_file)
    assert state == "done", by_id(browser, "error").text
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prediction .label")]
    probabilities = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prediction .probability")]
    assert len(labels) == 5 and all(re.fullmatch(r"<?\d+\.\d+%", p) for p in probabilities), (labels, probabilities)
    assert "cat" in labels[0].lower(), labels
    bar_widths = browser.execute_script(
        "return [...document.querySelectorAll('#results .bar-fill')].map(e => e.getBoundingClientRect().width)")
    assert bar_widths == sorted(bar_widths, reverse=True) and bar_widths[0] > 20, bar_widths
    latency = by_id(browser, "latency")
    assert latency.is_displayed() and re.search(r"Answered in \d+(\.\d)? ms", latency.text), latency.text
    assert browser.execute_script("const i = document.getElementById('preview'); return i.complete && i.naturalWidth") == 451
    assert not by_id(browser, "error").is_displayed()
    # Nothing went wrong in the page: no script error, no request refused by the CSP, no failed load.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    shot = screenshot(browser, tmp_path, "page.png")
    print(f"\ntop: {labels[0]} {probabilities[0]}; {latency.text}; screenshot {shot}")

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is a shopping list, not a photo\n")
    assert upload(browser, not_an_image) == "error"
    error = by_id(browser, "error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert "not an image" in by_id(browser, "error-message").text, error.text
    assert "invalid_image" in by_id(browser, "error-detail").text and "400" in by_id(browser, "error-detail").text
    assert not by_id(browser, "results").is_displayed() and not by_id(browser, "latency").is_displayed()
    screenshot(browser, tmp_path, "page-error.png")

    # A good photo after the error replaces the error with predictions again.
    assert upload(browser, cat_file) == "done"
    assert not by_id(browser, "error").is_displayed()


# A File made in the page from the photo's bytes, handed over the way a drop or a paste hands it.
DISPATCH_FILE = """
const [kind, b64] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
document.getElementById("main").dataset.state = "idle";
if (kind === "drop") {
  const zone = document.getElementById("dropzone");
  zone.dispatchEvent(new DragEvent("dragenter", {bubbles: true, cancelable: true, dataTransfer: transfer}));
  zone.dispatchEvent(new DragEvent("dragover", {bubbles: true, cancelable: true, dataTransfer: transfer}));
  zone.dispatchEvent(new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: transfer}));
} else {
  document.body.dispatchEvent(new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: transfer}));
}
"""


@pytest.mark.browser
@pytest.mark.server
@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_drop_and_paste_in_chromium(browser, live_server, cat_file, kind):
    import base64

    from selenium.webdriver.common.by import By

    page_ready(browser, live_server)
    browser.execute_script(DISPATCH_FILE, kind, base64.b64encode(cat_file.read_bytes()).decode())
    assert wait_for_answer(browser) == "done", by_id(browser, "error").text
    top = browser.find_element(By.CSS_SELECTOR, "#results .prediction .label").text
    assert "cat" in top.lower(), top
    assert "dropped.jpg" in by_id(browser, "file-info").text
    assert "dragging" not in by_id(browser, "dropzone").get_attribute("class")


@pytest.mark.browser
@pytest.mark.server
def test_phone_width_and_topk_in_chromium(browser, live_server, cat_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(390, 844)
    try:
        page_ready(browser, live_server)
        assert by_id(browser, "camera").get_attribute("capture") == "environment"
        topk = by_id(browser, "topk")
        topk.clear()
        topk.send_keys("3", Keys.TAB)  # the change event fires on leaving the field
        assert upload(browser, cat_file) == "done", by_id(browser, "error").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .prediction")) == 3
        # Nothing sticks out sideways at a phone's width.
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow}px wider than the viewport"
        screenshot(browser, tmp_path, "page-mobile.png")
    finally:
        browser.set_window_size(1280, 1000)


# ---- with API keys on: the page asks for one -----------------------------------------------------

PAGE_KEY = "page-test-key-000000000001"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """The tiny model under a real gunicorn that wants an API key (scope inference)."""
    import torch
    import yaml
    from conftest import tiny_model_config, tiny_net, write_config

    folder = tmp_path_factory.mktemp("page-keys")
    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    (folder / "keys.yaml").write_text(yaml.safe_dump({"page": {"key": PAGE_KEY, "scopes": ["inference"]}}))
    config = write_config(folder, [tiny_model_config(folder / "tiny.pth")])
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1", "SERVE_API_KEYS_FILE": str(folder / "keys.yaml")},
                    folder / "gunicorn.log")
    yield server.url + "/"
    assert server.stop() == 0


@pytest.mark.browser
@pytest.mark.server
def test_the_page_asks_for_an_api_key_on_401(browser, keyed_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def enter_key(key: str) -> None:
        WebDriverWait(browser, WAIT_S).until(lambda d: by_id(d, "key-form").is_displayed())
        by_id(browser, "api-key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()

    browser.get(keyed_server)
    enter_key("not-the-key-00000000000000")
    WebDriverWait(browser, WAIT_S).until(lambda d: "did not accept" in by_id(d, "key-note").text)
    assert not by_id(browser, "model").is_enabled()
    screenshot(browser, tmp_path, "page-key-asked.png")
    enter_key(PAGE_KEY)
    WebDriverWait(browser, WAIT_S).until(lambda d: by_id(d, "model").is_enabled())
    assert not by_id(browser, "key-form").is_displayed()
    red = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(red)
    assert upload(browser, red) == "done", by_id(browser, "error").text
    assert browser.find_element(By.CSS_SELECTOR, "#results .prediction .label").text == "red"
    assert browser.execute_script("return sessionStorage.getItem('torch-serve.api-key')") == PAGE_KEY
    # Kept for the tab: a reload doesn't ask again.
    page_ready(browser, keyed_server)
    assert not by_id(browser, "key-form").is_displayed()
    screenshot(browser, tmp_path, "page-with-key.png")


# ---- other tasks in the page: boxes, a mask, an embedding -----------------------------------------


@pytest.fixture(scope="module")
def task_server(tmp_path_factory):
    """A detector, a segmenter and an embedder whose answers are known (models/bright.py, the tiny net)."""
    import torch

    from conftest import tiny_model_config, tiny_net, write_config
    from models.bright import BrightBoxDetector, BrightSegmenter

    folder = tmp_path_factory.mktemp("page-tasks")
    torch.save(BrightBoxDetector().state_dict(), folder / "detector.pth")
    torch.save(BrightSegmenter().state_dict(), folder / "segmenter.pth")
    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    plain = {"mean": [0, 0, 0], "std": [1, 1, 1]}
    config = write_config(folder, [
        {"name": "boxes", "task": "detect", "runtime": "eager", "architecture": "models.bright:BrightBoxDetector", "device": "cpu",
         "checkpoint": str(folder / "detector.pth"), "labels": ["__background__", "bright"], "preprocess": plain},
        {"name": "regions", "task": "segment", "runtime": "eager", "architecture": "models.bright:BrightSegmenter", "device": "cpu",
         "checkpoint": str(folder / "segmenter.pth"), "labels": ["dark", "bright"],
         "preprocess": {"resize": 320, "crop": 320, **plain}},
        {**tiny_model_config(folder / "tiny.pth"), "name": "colours", "task": "embed"},
    ])
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1"}, folder / "gunicorn.log",
                    inherit_settings=False)
    yield server.url + "/"
    assert server.stop() == 0


def overlay_pixel(driver, x: int, y: int) -> list[int]:
    """The overlay canvas's RGBA at (x, y) in the image's own pixels."""
    return driver.execute_script(
        "return Array.from(document.getElementById('overlay').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data)",
        x, y)


@pytest.mark.browser
@pytest.mark.server
def test_boxes_mask_and_embedding_in_chromium(browser, task_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = tmp_path / "bright.png"
    image = Image.new("RGB", (480, 320), (30, 40, 60))
    image.paste((250, 240, 200), (120, 80, 300, 220))
    image.save(photo)
    browser.get_log("browser")  # drop what earlier tests left (a 401 the key test asked for)
    page_ready(browser, task_server)
    model = Select(by_id(browser, "model"))

    model.select_by_visible_text("boxes")
    assert "detect" in by_id(browser, "model-info").text and not by_id(browser, "topk").is_displayed()
    assert upload(browser, photo) == "done", by_id(browser, "error").text
    assert by_id(browser, "status").text == "1 found; most confident: bright (90.0%)."
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .label")] == ["bright"]
    assert by_id(browser, "overlay").is_displayed()
    assert overlay_pixel(browser, 120, 150)[3] == 255  # the box's left edge, drawn
    assert overlay_pixel(browser, 200, 150)[3] == 0  # inside the box: the photo shows through
    screenshot(browser, tmp_path, "page-detect.png")

    model.select_by_visible_text("regions")
    assert upload(browser, photo) == "done", by_id(browser, "error").text
    WebDriverWait(browser, WAIT_S).until(lambda d: by_id(d, "overlay").get_attribute("data-drawn") == "mask")
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prediction-row")]
    assert legend == ["dark\n83.6%", "bright\n16.4%"], legend  # 180 x 140 of 480 x 320 pixels
    inside, outside = overlay_pixel(browser, 200, 150), overlay_pixel(browser, 20, 20)
    assert inside[3] > 0 and outside[3] > 0 and inside[:3] != outside[:3]  # two classes, two colours
    screenshot(browser, tmp_path, "page-segment.png")

    model.select_by_visible_text("colours")
    assert upload(browser, photo) == "done"
    assert re.fullmatch(r"An embedding of 3 dimensions, L2 norm \d+\.\d{3}\.", by_id(browser, "status").text)
    assert by_id(browser, "summary").text.startswith("[") and not by_id(browser, "overlay").is_displayed()
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
