"""The text-to-image app in a real headless Chromium (Debian's chromium + chromedriver through
Selenium), on a tiny FLUX pipeline with random weights: type, press, get images; bad input."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("NUNCHAKU_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    pytest.importorskip("gradio", reason="needs gradio (pip install -e .[app])")
    from flux_helpers import quantize_pipeline

    from nunchaku.models.flux_loading import save_quantized_transformer
    from nunchaku.models.tiny import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("app")
    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    pipe.save_pretrained(root / "base")
    quantize_pipeline(pipe)
    save_quantized_transformer(root / "int4", pipe.transformer)
    port = _free_port()
    log = open(root / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app" / "t2i" / "run_gradio.py"), "--model-path", str(root / "base"),
         "--qmodel-path", str(root / "int4"), "-p", "int4", "bf16", "--no-safety-checker", "--port", str(port),
         "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited: {(root / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the app did not come up: {(root / 'app.log').read_text()[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, css, timeout=180):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def test_prompt_in_the_browser_gives_int4_and_bf16_images(app_url, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    assert "CPU" in _wait(browser, "#header").text  # the header names the device
    _wait(browser, "#prompt textarea").send_keys("a red circle above a blue square")
    browser.find_element(By.ID, "generate").click()
    for precision in ("int4", "bf16"):
        src = _wait(browser, f"#image-{precision} img").get_attribute("src")
        image = Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read()))
        assert image.size == (64, 64) and image.mode == "RGB"
        assert len(set(image.getdata())) > 10  # a real picture, not a blank
    stats = {p: browser.find_element(By.ID, f"stats-{p}").text for p in ("int4", "bf16")}
    assert re.fullmatch(r"INT4: \d+\.\d\d s", stats["int4"]) and re.fullmatch(r"BF16: \d+\.\d\d s", stats["bf16"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "t2i_generated.png"))


def test_empty_prompt_shows_a_clear_message(app_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    _wait(browser, "#prompt textarea")
    browser.find_element(By.ID, "generate").click()
    deadline = time.time() + 60
    while time.time() < deadline and "The prompt is empty" not in browser.page_source:
        time.sleep(0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "t2i_empty_prompt.png"))
    assert "The prompt is empty" in browser.page_source
