"""The page at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A fake microphone plays a WAV file (Chromium's --use-file-for-fake-audio-capture), so the
recording path runs end to end: getUserMedia, the AudioWorklet, pcm16 over /v1/realtime.

With the demo model (models/qwen3-asr-demo) the microphone says a held-out sentence, with 1.5 s
of silence before it and 1 s after, once (the file name's `%noloop` suffix; by default Chromium
loops the file back to back). The page's transcript must be the sentence, word for word, which
is what `qasr transcribe` writes for the same file; the PCM the server received must contain the
sentence at the file's level (no gain from the browser's voice processing) and nothing after it.
The demo model was fine-tuned on clips with such margins (docs/demo-model.md, "Silence and
repeats"); the recording's length varies with the machine's speed, so the test waits on the
samples the server has received, never on time.
"""

from __future__ import annotations

import os
import shutil

import pytest

from selenium import webdriver  # the test extra; the browser itself may be missing: skipped below

from support import DATA, cli_text, served

EN = DATA / "en_16k_s16.wav"
TOKENS = 12
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
SCREENSHOT = os.environ.get("QASR_SCREENSHOT")  # where to save a picture of the page (docs/server.png)


@pytest.fixture(scope="module")
def server(bundle):
    with served(bundle("tiny-untied"), aligner=str(bundle("tiny-aligner")), max_new_tokens=TOKENS,
                api_key="page-key") as running:
        yield running


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


LEAD, TAIL = 1.5, 1.0  # seconds of zeros around the sentence in the microphone's file


@pytest.fixture(scope="module")
def sentence(held_out, demo_bundle, tmp_path_factory):
    """(wav, speech, text): the first held-out English sentence, with LEAD and TAIL seconds of zeros
    around it, that the CLI transcribes exactly; `speech` is the sentence without the margins."""
    import soundfile as sf

    from qasr.models.demo_data import with_quiet
    from qasr.runtime.audio import load_audio

    folder = tmp_path_factory.mktemp("sentence")
    for index, (path, language, text) in enumerate(held_out(6)):
        speech = load_audio(path)
        wav = folder / f"{index}.wav"
        sf.write(wav, with_quiet(speech, LEAD, TAIL), 16000, subtype="PCM_16")
        if language == "English" and cli_text("transcribe", wav, "--model", demo_bundle) == text + "\n":
            return wav, speech, text
    pytest.fail("the demo model transcribes none of the held-out English sentences exactly")


@pytest.fixture(scope="module")
def demo_page(demo_bundle, sentence):
    """(server with the demo model, Chromium whose microphone says the sentence once: %noloop)."""
    with served(demo_bundle) as running:
        driver = chromium(f"{sentence[0]}%noloop")
        yield running, driver
        driver.quit()


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


def below_4khz(x):
    """`x` (16 kHz) without its content above 4 kHz. The browser resamples the file to the device's
    rate and back; its filters damp the top of the band (above 7 kHz a third of the amplitude
    passes) and turn the phase of what is left above 4 kHz (a match of 0.81 there), while below
    4 kHz, 95 % of the sentence's energy, the waveform comes through (a match of 0.988, against
    0.972 over the whole band). The check is on the waveform that carries the words."""
    import numpy as np

    spectrum = np.fft.rfft(x)
    spectrum[len(x) // 4:] = 0
    return np.fft.irfft(spectrum, len(x)).astype(np.float32)


def best_match(heard, clip):
    """(offset, correlation): where a window of `heard` the length of `clip` matches it best."""
    import numpy as np

    dot = np.correlate(heard, clip, "valid")
    energy = np.sqrt(np.convolve(heard * heard, np.ones(len(clip)), "valid")) * np.linalg.norm(clip)
    score = dot / np.maximum(energy, 1e-9)
    best = int(np.argmax(score))
    return best, float(score[best])


def test_the_microphone_shows_the_words_of_a_sentence(demo_page, sentence, received):
    import numpy as np

    server, driver = demo_page
    _, speech, text = sentence
    samples = int(16000 * (LEAD + TAIL)) + len(speech)
    driver.get(server.url + "/")
    record = by_id(driver, "record")
    wait(driver, lambda d: record.is_enabled())
    record.click()
    # The file plays once from when the page opens the microphone; the page sends from a little
    # later, so a second more than the file means the whole file has played (then zeros follow).
    wait(driver, lambda d: sum(map(len, received)) >= samples + 16000, seconds=120)
    record.click()
    wait(driver, lambda d: by_id(d, "record").text == "Record", seconds=120)
    heard = np.concatenate(received).astype(np.float32) / 32768
    low, speech_low = below_4khz(heard), below_4khz(speech)
    offset, match = best_match(low, speech_low)
    said = low[offset:offset + len(speech)]
    assert match > 0.95, match  # the whole sentence, through 16 kHz -> device rate -> 16 kHz
    assert abs(np.sqrt(np.mean(said**2)) / np.sqrt(np.mean(speech_low**2)) - 1) < 0.1  # and its level: no gain
    assert np.abs(heard[offset + len(speech):]).max() < 0.01  # heard once: quiet after it (%noloop)
    assert by_id(driver, "transcript").get_attribute("value") == text  # the CLI's text of the file
    assert by_id(driver, "status").text == ""
    assert console_errors(driver) == []
