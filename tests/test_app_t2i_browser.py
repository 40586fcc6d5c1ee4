"""The text-to-image app in a real headless Chromium, on a tiny FLUX pipeline with random weights
(INT4 and BF16 side by side, a LoRA, the keyword safety checker): type, press, get images; bad
input gets a message. Screenshots go to build/test-artifacts."""

from __future__ import annotations

import re

import pytest
from browser_helpers import (
    fetch_image, require_browser, running_app, screenshot, wait_for, wait_for_new_image, wait_for_text,
)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    require_browser()
    from flux_helpers import save_tiny_flux_with_lora

    root = save_tiny_flux_with_lora(tmp_path_factory.mktemp("app"), "style.safetensors", lora_rank=8, lora_scale=0.3)
    args = ["--model-path", str(root / "base"), "--qmodel-path", str(root / "int4"), "-p", "int4", "bf16",
            "--safety-checker", "keyword", "--lora", f"Test style={root / 'style.safetensors'}", "--device", "cpu"]
    with running_app("t2i/run_gradio.py", args, root / "app.log") as url:
        yield url


def _generate(browser, prompt: str, previous: dict | None = None) -> dict:
    from selenium.webdriver.common.by import By

    box = wait_for(browser, "#prompt textarea")
    box.clear()
    box.send_keys(prompt)
    browser.find_element(By.ID, "generate").click()
    return {p: wait_for_new_image(browser, f"#image-{p} img", (previous or {}).get(p)) for p in ("int4", "bf16")}


def test_prompt_in_the_browser_gives_int4_and_bf16_images(app_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    header = wait_for(browser, "#header").text
    assert "CPU" in header and "keyword list" in header  # the device and the safety checker are named
    srcs = _generate(browser, "a red circle above a blue square")
    for precision, src in srcs.items():
        image = fetch_image(src)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert len(set(image.getdata())) > 10  # a real picture, not a blank
    stats = {p: browser.find_element(By.ID, f"stats-{p}").text for p in ("int4", "bf16")}
    assert re.fullmatch(r"INT4: \d+\.\d\d s", stats["int4"]) and re.fullmatch(r"BF16: \d+\.\d\d s", stats["bf16"])
    screenshot(browser, "t2i_generated.png")


def test_choosing_the_lora_changes_the_image(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(app_url)
    plain = _generate(browser, "a green star")
    plain_image = fetch_image(plain["int4"]).convert("RGB")
    menu = wait_for(browser, "#lora input")
    menu.click()
    option = wait_for(browser, "[role=option][aria-label='Test style'], li[data-value='Test style']", 30)
    option.click()
    menu.send_keys(Keys.ESCAPE)
    browser.find_element(By.ID, "generate").click()
    styled = {p: wait_for_new_image(browser, f"#image-{p} img", plain[p]) for p in ("int4", "bf16")}
    diff = sum(abs(a - b) for pa, pb in zip(plain_image.getdata(), fetch_image(styled["int4"]).convert("RGB").getdata())
               for a, b in zip(pa, pb))
    assert diff > 0, "the LoRA at strength 1 left the INT4 image unchanged"
    screenshot(browser, "t2i_lora.png")


def test_unsafe_prompt_is_replaced_and_flagged(app_url, browser):
    browser.get(app_url)
    _generate(browser, "a naked man holding a gun")
    assert wait_for_text(browser, "flagged as unsafe")
    status = wait_for(browser, "#status").text
    assert "blocklisted words: gun, naked" in status and "A peaceful world." in status
    screenshot(browser, "t2i_unsafe_prompt.png")


def test_empty_prompt_shows_a_clear_message(app_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    wait_for(browser, "#prompt textarea")
    browser.find_element(By.ID, "generate").click()
    found = wait_for_text(browser, "The prompt is empty", 60)
    screenshot(browser, "t2i_empty_prompt.png")
    assert found


@pytest.mark.parametrize("field,value,message", [
    ("size", "100", "must be a positive multiple of 16"),
    ("seed", "-5", "Seed must be between"),
])
def test_out_of_range_values_show_a_clear_message(app_url, browser, field, value, message):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(app_url)
    wait_for(browser, "#prompt textarea").send_keys("a red circle")
    box = wait_for(browser, f"#{field} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value, Keys.TAB)
    browser.find_element(By.ID, "generate").click()
    found = wait_for_text(browser, message, 60)
    screenshot(browser, f"t2i_bad_{field}.png")
    assert found, f"no message for {field} = {value}"
