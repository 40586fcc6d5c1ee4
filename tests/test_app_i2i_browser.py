"""The sketch-to-image app in a real headless Chromium, on a tiny FLUX pipeline with random weights
and no sketch LoRA (so SDEdit, as on the demo model): draw a stroke, get a result while drawing,
download links, bad input. Screenshots go to build/test-artifacts."""

from __future__ import annotations

import time

import pytest
import torch
from browser_helpers import (
    fetch_image, require_browser, running_app, screenshot, wait_for, wait_for_download, wait_for_new_image,
    wait_for_text,
)
from PIL import Image


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    require_browser()
    from nunchaku.models.tiny import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("i2i")
    build_tiny_flux_pipeline(torch_dtype=torch.bfloat16).save_pretrained(root / "base")
    args = ["--model-path", str(root / "base"), "-p", "bf16", "--safety-checker", "keyword", "--device", "cpu"]
    with running_app("i2i/run_gradio.py", args, root / "app.log") as url:
        yield url


def _draw_stroke(browser, dx: int = 120, dy: int = 60) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    wait_for(browser, "#sketch button[aria-label=Brush]").click()  # the sketchpad starts with no tool
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()  # close the brush options panel
    canvas = wait_for(browser, "#sketch canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, -60, -40).click_and_hold() \
        .move_by_offset(dx // 2, dy // 2).move_by_offset(dx // 2, dy // 2).release().perform()


def test_drawing_gives_a_result_while_drawing(app_url, browser):
    browser.get(app_url)
    assert "SDEdit" in wait_for(browser, "#header").text  # the mode is explained
    prompt = wait_for(browser, "#prompt textarea")
    prompt.send_keys("a red circle")
    _draw_stroke(browser)  # no button press: the stroke itself asks for an image
    src = wait_for_new_image(browser, "#result img", None)
    image = fetch_image(src)
    assert image.size == (64, 64) and image.mode in ("RGB", "RGBA")
    assert len(set(image.convert("RGB").getdata())) > 10
    assert wait_for_text(browser, "BF16:")
    _draw_stroke(browser, dx=-100, dy=80)  # a second stroke gives a new result
    wait_for_new_image(browser, "#result img", src)
    for button, prefix in (("download-sketch", "sketch-"), ("download-result", "result-")):
        clicked = time.time()
        wait_for(browser, f"#{button}").click()
        saved = wait_for_download(prefix, clicked)
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(saved).size == (64, 64)
    screenshot(browser, "i2i_generated.png")


def test_empty_prompt_and_unsafe_prompt(app_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    wait_for(browser, "#prompt textarea")
    _draw_stroke(browser)
    assert wait_for_text(browser, "The prompt is empty", 90)
    screenshot(browser, "i2i_empty_prompt.png")
    wait_for(browser, "#prompt textarea").send_keys("a bloodbath of red")
    browser.find_element(By.ID, "generate").click()
    assert wait_for_text(browser, "flagged as unsafe", 120)
    assert "blocklisted word: bloodbath" in wait_for(browser, "#status").text
    screenshot(browser, "i2i_unsafe_prompt.png")
