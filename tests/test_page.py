"""The page at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A fake microphone plays a WAV file (Chromium's --use-file-for-fake-audio-capture), so the
recording path runs end to end: getUserMedia, the AudioWorklet, pcm16 over /v1/realtime.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from selenium import webdriver  # the test extra; the browser itself may be missing: skipped below

from qasr.serve.service import Options
from serving import RunningServer, cli_text

DATA = Path(__file__).parent / "data"
EN = DATA / "en_16k_s16.wav"
TOKENS = 12
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
SCREENSHOT = os.environ.get("QASR_SCREENSHOT")  # where to save a picture of the page (docs/server.png)


@pytest.fixture(scope="module")
def server(bundle):
    running = RunningServer(Options(model=str(bundle("tiny-untied")), aligner=str(bundle("tiny-aligner")),
                                    backend="onnxruntime", max_new_tokens=TOKENS, api_key="page-key"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def microphone(speech, tmp_path_factory):
    """12 s of speech for the fake microphone (Chromium loops it)."""
    import soundfile as sf

    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    sf.write(path, speech(12), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(microphone):
    from selenium.webdriver.chrome.options import Options as ChromeOptions
    from selenium.webdriver.chrome.service import Service as DriverService

    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, server):
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear()")  # the page keeps the key for the tab: ask again
    driver.refresh()
    wait(driver, lambda d: by_id(d, "key-form").is_displayed())
    by_id(driver, "key").send_keys("page-key")
    by_id(driver, "key-form").submit()
    wait(driver, lambda d: by_id(d, "info-backend").text == "onnxruntime")


def test_an_upload_shows_the_cli_text(server, browser, bundle):
    expected = cli_text("transcribe", EN, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS)
    open_page(browser, server)
    assert by_id(browser, "transcribe").get_attribute("disabled")
    by_id(browser, "file").send_keys(str(EN))
    wait(browser, lambda d: "channel" in by_id(d, "file-facts").text)
    button = by_id(browser, "transcribe")
    wait(browser, lambda d: button.is_enabled())
    button.click()
    wait(browser, lambda d: by_id(d, "progress").text.startswith("done"))
    assert by_id(browser, "transcript").get_attribute("value") + "\n" == expected
    facts = by_id(browser, "facts").text
    assert "16000 Hz" in facts and "1 channel" in facts and "RTF" in facts
    downloads = by_id(browser, "downloads").text
    assert all(name in downloads for name in ("txt", "json", "srt", "vtt"))
    assert button.is_enabled()
    assert by_id(browser, "info-memory").text.endswith("MB")
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
    assert console_errors(browser) == []


def test_the_microphone_text_updates_while_it_talks(server, browser):
    open_page(browser, server)
    record = by_id(browser, "record")
    wait(browser, lambda d: record.is_enabled())
    record.click()
    wait(browser, lambda d: record.text == "Stop")
    seen = []

    def grown(d):
        text = by_id(d, "transcript").get_attribute("value")
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        return len(seen) >= 2

    wait(browser, grown, seconds=90)  # text, then more text, while the fake microphone plays
    assert not by_id(browser, "transcribe").is_enabled() or record.text == "Stop"
    record.click()
    wait(browser, lambda d: d.find_element("id", "record").text == "Record", seconds=60)
    final = by_id(browser, "transcript").get_attribute("value")
    assert final and by_id(browser, "status").text == ""
    assert console_errors(browser) == []
