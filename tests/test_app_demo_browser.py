"""The README's quick start, in a real browser: both apps on the embedded demo model, offline.
A prompt typed in the text-to-image app must come back drawn (the demo checker accepts the INT4
and the BF16 image), and a sketch must give a picture. Screenshots go to build/test-artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import (
    chromium, fetch_image, require_browser, running_app, screenshot, wait_for, wait_for_new_image,
)

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
PROMPT = "a red circle above a blue square on a yellow background"


@pytest.fixture(scope="module")
def demo_ready():
    if not (DEMO / "svdq-int4").is_dir():
        pytest.skip("the demo model is not in assets/demo")
    require_browser()


def test_t2i_quick_start_draws_the_prompt(demo_ready, tmp_path):
    from selenium.webdriver.common.by import By

    from nunchaku.demo.checker import check_image

    args = ["-m", "demo", "-p", "int4", "bf16", "--device", "cpu"]
    with running_app("t2i/run_gradio.py", args, tmp_path / "app.log") as url, chromium() as browser:
        browser.get(url)
        header = wait_for(browser, "#header").text
        assert "Offline demo model" in header and "keyword list" in header
        wait_for(browser, "#prompt textarea").send_keys(PROMPT)
        browser.find_element(By.ID, "generate").click()
        for precision in ("int4", "bf16"):
            image = fetch_image(wait_for_new_image(browser, f"#image-{precision} img", None)).convert("RGB")
            assert image.size == (128, 128)
            verdict = check_image(PROMPT, image)
            assert verdict.passed, (precision, verdict)
        wait_for(browser, "#stats-bf16")
        screenshot(browser, "t2i_demo.png")


def test_i2i_quick_start_turns_a_sketch_into_a_picture(demo_ready, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    args = ["-m", "demo", "-p", "int4", "--device", "cpu"]
    with running_app("i2i/run_gradio.py", args, tmp_path / "app.log") as url, chromium() as browser:
        browser.get(url)
        assert "Offline demo model" in wait_for(browser, "#header").text
        prompt = wait_for(browser, "#prompt textarea")
        prompt.clear()
        prompt.send_keys("a large red circle on a white background")
        wait_for(browser, "#sketch button[aria-label=Brush]").click()
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        canvas = wait_for(browser, "#sketch canvas")
        chain = ActionChains(browser).move_to_element_with_offset(canvas, -30, -60).click_and_hold()
        for dx, dy in ((40, 10), (20, 40), (-10, 40), (-40, 10), (-30, -30), (0, -40), (30, -30)):
            chain = chain.move_by_offset(dx, dy)
        chain.release().perform()
        image = fetch_image(wait_for_new_image(browser, "#result img", None)).convert("RGB")
        assert image.size == (128, 128)
        assert len(set(image.getdata())) > 10
        screenshot(browser, "i2i_demo.png")
