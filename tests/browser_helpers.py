"""Launching an app in a subprocess and driving it from a real headless Chromium (Debian's
chromium + chromedriver, through Selenium). A plain module: pytest puts tests/ on sys.path."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("NUNCHAKU_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def require_browser() -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    pytest.importorskip("gradio", reason="needs gradio (pip install -e .[app])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(script: str, args: list[str], log_path: Path, timeout: float = 300):
    """Starts app/<script> with args on a free port; yields its URL once it answers."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app" / script), *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not come up: {log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


DOWNLOADS = ARTIFACTS / "downloads"


@contextmanager
def chromium():
    """Headless Chromium; files it downloads land in DOWNLOADS."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.add_experimental_option("prefs", {"download.default_directory": str(DOWNLOADS),
                                           "download.prompt_for_download": False})
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, css: str, timeout: float = 180):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_for_text(driver, text: str, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in driver.page_source:
            return True
        time.sleep(0.5)
    return False


def fetch_image(src: str):
    """The PIL image behind an <img> src (an http URL or a data: URL)."""
    import base64

    from PIL import Image

    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read()))


def wait_for_new_image(driver, css: str, previous: str | None, timeout: float = 180) -> str:
    """The src of the <img> under css once it differs from `previous`."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            src = driver.find_element(By.CSS_SELECTOR, css).get_attribute("src")
            if src and src != previous:
                return src
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no new image under {css} within {timeout} s")


def wait_for_download(name_prefix: str, after: float, timeout: float = 30) -> Path:
    """A file in DOWNLOADS whose name starts with name_prefix, completed after time `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in DOWNLOADS.glob(f"{name_prefix}*"):
            if not path.name.endswith(".crdownload") and path.stat().st_mtime >= after - 1:
                return path
        time.sleep(0.5)
    raise AssertionError(f"no download {name_prefix}* within {timeout} s (in {DOWNLOADS})")


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path
