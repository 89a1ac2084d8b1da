"""The page at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A fake microphone plays a WAV file (Chromium's --use-file-for-fake-audio-capture), so the
recording path runs end to end: getUserMedia, the AudioWorklet, pcm16 over /v1/realtime.

With the demo model (models/qwen3-asr-demo) a held-out sentence goes through the microphone. The
fake device loops its file back to back, and that model, trained on single trimmed 1-4 s clips,
writes nonsense for a sentence heard twice or followed by even 0.1 s more silence (the official
package loading it writes the same nonsense), so the page's own text for a loop is no measure.
The test checks instead that the PCM the server received is the file, at the file's level, and
that one loop of it, cut where it matches the file best, gives the CLI's text of the file.
"""

from __future__ import annotations

import os
import shutil

import pytest

from selenium import webdriver  # the test extra; the browser itself may be missing: skipped below

from qasr.serve.service import Options
from support import DATA, RunningServer, cli_text

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
    driver = chromium(microphone)
    yield driver
    driver.quit()


def chromium(microphone):
    """Headless Chromium whose fake microphone plays (and loops) the wav `microphone`."""
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
    return webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))


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


@pytest.fixture(scope="module")
def sentence(held_out, demo_bundle):
    """(wav, text): the first held-out English clip that the CLI transcribes exactly."""
    for path, language, text in held_out(6):
        if language == "English" and cli_text("transcribe", path, "--model", demo_bundle) == text + "\n":
            return path, text
    pytest.fail("the demo model transcribes none of the held-out English clips exactly")


@pytest.fixture(scope="module")
def demo_page(demo_bundle, sentence):
    """(server with the demo model, Chromium whose microphone speaks the sentence)."""
    running = RunningServer(Options(model=str(demo_bundle), backend="onnxruntime"))
    driver = chromium(sentence[0])
    yield running, driver
    driver.quit()
    running.stop()


@pytest.fixture
def received(monkeypatch):
    """The pcm16 samples every realtime session of this process receives, in order of arrival."""
    import base64

    import numpy as np

    from qasr.serve.realtime import Session

    chunks, append = [], Session.append

    async def recording(self, audio):
        chunks.append(np.frombuffer(base64.b64decode(audio or ""), "<i2"))
        return await append(self, audio)

    monkeypatch.setattr(Session, "append", recording)
    return chunks


def best_match(heard, clip):
    """(offset, correlation): where a window of `heard` the length of `clip` matches it best."""
    import numpy as np

    dot = np.correlate(heard, clip, "valid")
    energy = np.sqrt(np.convolve(heard * heard, np.ones(len(clip)), "valid")) * np.linalg.norm(clip)
    score = dot / np.maximum(energy, 1e-9)
    best = int(np.argmax(score))
    return best, float(score[best])


def test_the_microphone_delivers_a_sentence_the_model_understands(demo_page, sentence, received, demo_bundle,
                                                                  tmp_path):
    import numpy as np
    import soundfile as sf

    server, driver = demo_page
    path, text = sentence
    clip, _ = sf.read(path, dtype="float32")
    driver.get(server.url + "/")
    record = by_id(driver, "record")
    wait(driver, lambda d: record.is_enabled())
    record.click()
    wait(driver, lambda d: sum(map(len, received)) >= 3 * len(clip), seconds=120)  # two whole loops at least
    record.click()
    wait(driver, lambda d: by_id(d, "record").text == "Record", seconds=120)
    assert by_id(driver, "transcript").get_attribute("value") and by_id(driver, "status").text == ""
    heard = np.concatenate(received).astype(np.float32) / 32768
    offset, match = best_match(heard, clip)
    loop = heard[offset:offset + len(clip)]
    assert match > 0.9, match  # the waveform, through 16 kHz -> device rate -> 16 kHz
    assert abs(np.sqrt(np.mean(loop**2)) / np.sqrt(np.mean(clip**2)) - 1) < 0.1  # and its level: no gain
    sf.write(tmp_path / "loop.wav", loop, 16000, subtype="PCM_16")
    spoken = cli_text("transcribe", tmp_path / "loop.wav", "--model", demo_bundle)
    assert spoken == text + "\n"
    assert console_errors(driver) == []
