"""The playground in a real browser: Debian's Chromium, headless, driven by Playwright against a real
`particalize serve --model tiny` process on a free loopback port that requires a signed API key. A person opens
/, gives the key and secret (the page signs each request itself, with WebCrypto), finds every input of the hosted
tool with its hosted default and the hosted example prompts, uploads an image, runs, watches the status and the
per-step progress bar reach the end, plays the video and downloads it; then cancels a queued task and kills a
running one from the page. When the WebSocket is refused the page polls Task/Detail instead. Screenshots of
each stage go to test-artifacts/browser/.

Needs /usr/bin/chromium (scripts/ensure-chromium.sh installs it); PARTICALIZE_TEST_BROWSER=0 skips."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from benchmarks.harness import ROOT, ServeProcess
from server.auth import sign
from tests.images import png_bytes

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
VIEWPORT = {"width": 1280, "height": 1700}
"""Tall enough for the whole page: a full_page screenshot in Chromium 156 under Playwright 1.65 leaves the page's
scrollY out of step with what is shown, and the next click lands beside its target."""
KEY, SECRET = "browser-key", "browser-secret-value"
_nonces = itertools.count(int(time.time() * 1000))
"""The test's own signed calls use millisecond nonces, as the page does (a nonce may repeat)."""

HOSTED_DEFAULTS = {
    "inputImageUrl": "",
    "prompt": "a dog is crystallizing, fracturing, and disintegrating into sharp, translucent shards. The form breaks "
              "apart in slow motion, exploding into glittering crystal fragments that scatter and fall to the ground.",
    "negativePrompt": "bad quality video",
    "fps": "16",
    "width": "0",
    "height": "0",
    "numFrames": "81",
    "steps": "30",
    "scale": "5.0",
    "flowShift": "5.0",
}
"""The published page's tool inputs and their defaults."""

HOSTED_EXAMPLES = [
    "Open hands cradle a glowing, translucent orb inscribed with the word \u201cBUZZ!\u201d",
    "Open hands cradle a glowing, translucent orb, It is disintegrating and turning into small white spheres",
    "The toronto cityscape model is destroyed, the cn tower structure is collapsing",
    "a man is petting a sitting dog. the dog suddenly disintegrates into dust",
    "model of the whitehouse structure is collapsing",
    "model of the big ben clock tower structure is collapsing",
]
"""The beginnings of the published page's distinct example prompts ("Tool Parameter Inspires")."""

QUICK = {"width": "32", "height": "32", "numFrames": "5", "steps": "3", "fps": "16", "seed": "7"}
LONG = {"width": "128", "height": "128", "numFrames": "81", "steps": "100", "fps": "16", "seed": "8"}
"""A run that ends in about a second on the tiny preset, and one that takes tens of seconds."""

VIDEO_READY = """() => { const v = document.getElementById('video');
  return !v.hidden && v.readyState >= 2 && v.videoWidth > 0 && v.duration > 0; }"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    if os.environ.get("PARTICALIZE_TEST_BROWSER", "1") == "0":
        pytest.skip("browser test disabled (PARTICALIZE_TEST_BROWSER=0)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/ensure-chromium.sh as root, or "
                    "`sudo apt-get install chromium`), or set PARTICALIZE_TEST_BROWSER=0 to skip the browser test.")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return CHROMIUM


SQUISH = {"prompt": "a cat is squished flat", "scale": "6.0", "steps": "20"}
"""The catalogue's second tool's own defaults (the picker shows them when it is chosen)."""


def catalogue(folder: Path) -> Path:
    """A catalogue of one more tool, remade/Squish, with a LoRA made for the tiny base and defaults of its own."""
    from diffusers import WanTransformer3DModel

    from pipeline.tiny import TINY_TRANSFORMER_CONFIG
    from tests.lora_files import make_weights, write_lora

    lora = write_lora(folder / "squish.safetensors", make_weights(WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)),
                      "kohya")
    defaults = "\n".join(f"{k} = {v}" if k != "prompt" else f'{k} = "{v}"' for k, v in SQUISH.items())
    path = folder / "tools.toml"
    path.write_text(f'[[tools]]\nslug = "remade/Squish"\ntitle = "Squish"\ndescription = "Squishes the subject."\n'
                    f'trigger = "sq41sh"\nloras = ["{lora}"]\n[tools.defaults]\n{defaults}\n', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: Path) -> Iterator[ServeProcess]:
    folder = tmp_path_factory.mktemp("browser-serve")
    serve = ServeProcess(folder, env={"PARTICALIZE_API_KEYS": f"{KEY}:{SECRET}",
                                      "PARTICALIZE_TOOLS_FILE": str(catalogue(folder))})
    try:
        serve.wait_ready(timeout=120)
        yield serve
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Playwright gives each launch a fresh temporary profile, so no --user-data-dir is needed."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def fresh_page(browser: Browser, server: ServeProcess) -> Iterator[Page]:
    """The playground as it first opens (asking for the API key); fails the test on any uncaught script error."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: print(f"console.{message.type}: {message.text}"))  # shown on failure
    page.goto(server.base + "/")
    expect(page.locator("#auth")).to_be_visible(timeout=30_000)
    yield page
    context.close()
    assert errors == [], f"uncaught script errors on the page: {errors}"


def sign_in(page: Page, secret: str = SECRET) -> None:
    page.fill("#api-key", KEY)
    page.fill("#api-secret", secret)
    page.click("#auth-apply")


@pytest.fixture
def page(fresh_page: Page) -> Page:
    """The playground with the API key given, its form built from Tool/Detail."""
    sign_in(fresh_page)
    expect(fresh_page.locator("body")).to_have_attribute("data-ready", "1", timeout=30_000)
    return fresh_page


def shot(page: Page, name: str) -> None:
    page.screenshot(path=ARTIFACTS / f"{name}.png")


def fill(page: Page, values: dict[str, str]) -> None:
    for name, value in values.items():
        page.fill(f"#in-{name}", value)


def task_detail(server: ServeProcess, taskid: str) -> dict[str, Any]:
    nonce = str(next(_nonces))
    headers = {"x-api-key": KEY, "x-nonce": nonce, "x-signature": sign(KEY, SECRET, nonce)}
    body = server.http.post("/v1/Task/Detail", json={"taskid": taskid}, headers=headers).json()
    assert body["result"] is True, body
    return body["tasklist"][0]


def shown_taskid(page: Page) -> str:
    expect(page.locator("#task-id")).to_have_text(re.compile(r"^#\d+$"))
    return page.locator("#task-id").inner_text().lstrip("#")


def upload(page: Page, name: str = "dog.png") -> None:
    page.set_input_files("#image-file", files=[{"name": name, "mimeType": "image/png",
                                                "buffer": png_bytes(64, 48, seed=3)}])
    expect(page.locator("#upload-state")).to_contain_text(f"uploaded {name}", timeout=20_000)


def test_the_page_asks_for_the_api_key_and_says_when_the_server_refuses_it(fresh_page: Page) -> None:
    page = fresh_page
    expect(page.locator("#run")).to_be_disabled()
    expect(page.locator("#message")).to_contain_text("Enter an API key")
    shot(page, "00-api-key-asked")
    sign_in(page, secret="not-the-secret")
    expect(page.locator("#message")).to_have_class("bad")
    expect(page.locator("#message")).to_contain_text("signature", ignore_case=True)
    expect(page.locator("#run")).to_be_disabled()
    sign_in(page)
    expect(page.locator("body")).to_have_attribute("data-ready", "1", timeout=30_000)
    expect(page.locator("#run")).to_be_enabled()
    expect(page.locator("#message")).to_have_text("")


def test_the_page_offers_every_hosted_input_with_its_default_and_the_hosted_examples(page: Page) -> None:
    shot(page, "01-loaded")
    for name, default in HOSTED_DEFAULTS.items():
        expect(page.locator(f"#in-{name}")).to_have_value(default)
    expect(page.locator("#in-seed")).to_be_visible()
    examples = page.locator("#examples option")
    texts = [examples.nth(i).get_attribute("title") or "" for i in range(1, examples.count())]
    assert len(texts) == len(HOSTED_EXAMPLES), texts
    for text, beginning in zip(texts, HOSTED_EXAMPLES, strict=True):
        assert text.startswith(beginning), (text, beginning)
    # The hidden file input stays hidden (the drop zone's link opens it).
    expect(page.locator("#image-file")).to_be_hidden()

    page.select_option("#examples", index=1)
    expect(page.locator("#in-prompt")).to_have_value(re.compile("^" + re.escape(HOSTED_EXAMPLES[0])))
    expect(page.locator("#in-seed")).to_have_value("10700418")
    shot(page, "02-example-chosen")
    page.click("#reset")
    for name, default in HOSTED_DEFAULTS.items():
        expect(page.locator(f"#in-{name}")).to_have_value(default)
    expect(page.locator("#in-seed")).to_have_value("")
    for button in ("#run", "#kill", "#cancel", "#refresh"):
        expect(page.locator(button)).to_be_visible()
    expect(page.locator("#progress")).to_be_visible()
    expect(page.locator("#tasks")).to_be_visible()


def test_the_tool_picker_lists_the_served_tools_and_runs_the_chosen_one_with_its_defaults(
    page: Page, server: ServeProcess
) -> None:
    picker = page.locator("#tool")
    expect(picker).to_have_value("codexq/Particalize")
    options = picker.locator("option").evaluate_all("items => items.map(o => [o.value, o.textContent])")
    assert options == [["codexq/Particalize", "codexq/Particalize"], ["remade/Squish", "remade/Squish"]], options
    upload(page, "squish.png")
    image = page.locator("#in-inputImageUrl").input_value()
    page.select_option("#tool", "remade/Squish")
    expect(page.locator("#tool-about")).to_have_text("Squishes the subject.")
    for name, default in SQUISH.items():
        expect(page.locator(f"#in-{name}")).to_have_value(default)
    expect(page.locator("#in-negativePrompt")).to_have_value(HOSTED_DEFAULTS["negativePrompt"])
    expect(page.locator("#in-inputImageUrl")).to_have_value(image)  # the image stays when the tool changes
    shot(page, "09-tool-chosen")
    fill(page, QUICK)
    page.click("#run")
    expect(page.locator("#outcome")).to_have_text("succeeded", timeout=120_000)
    task = task_detail(server, shown_taskid(page))
    assert (task["modelslugowner"], task["modelslugproject"]) == ("remade", "Squish"), task
    assert task["parameters"]["prompt"] == SQUISH["prompt"] and task["parameters"]["scale"] == "6.0", task
    expect(page.locator(f"#tasks tr[data-taskid='{task['id']}']")).to_contain_text("remade/Squish")
    page.click("#reset")
    expect(page.locator("#in-prompt")).to_have_value(SQUISH["prompt"])
    page.select_option("#tool", "codexq/Particalize")
    for name, default in HOSTED_DEFAULTS.items():
        expect(page.locator(f"#in-{name}")).to_have_value(image if name == "inputImageUrl" else default)


def test_a_run_from_an_uploaded_image_shows_progress_to_the_end_and_a_playable_downloadable_video(
    page: Page, server: ServeProcess
) -> None:
    upload(page)
    expect(page.locator("#image-preview")).to_be_visible()
    expect(page.locator("#in-inputImageUrl")).to_have_value(re.compile(rf"^{re.escape(server.base)}/files/uploads/"))
    page.fill("#in-prompt", "a test card is disintegrating into particles")
    fill(page, QUICK)
    shot(page, "03-ready-to-run")
    page.click("#run")

    expect(page.locator("#outcome")).to_have_text("succeeded", timeout=120_000)
    expect(page.locator("#task-status")).to_have_text("task_postprocess_end")
    statuses = page.locator("#events li").evaluate_all("items => items.map(li => li.dataset.type)")
    for status in ("task_start", "task_output", "task_postprocess_end"):
        assert status in statuses, statuses
    assert statuses.index("task_start") < statuses.index("task_output") < statuses.index("task_postprocess_end")
    expect(page.locator("#events")).to_contain_text("step 3/3")
    assert page.locator("#progress").evaluate("p => p.value") == 100
    expect(page.locator("#progress-text")).to_contain_text("step 3/3 · 100%")

    page.wait_for_function(VIDEO_READY, timeout=30_000)
    video = page.locator("#video").evaluate(
        "v => ({width: v.videoWidth, height: v.videoHeight, duration: v.duration, error: v.error && v.error.code,"
        " src: v.currentSrc})"
    )
    assert video["error"] is None, video
    assert (video["width"], video["height"]) == (32, 32), video
    assert video["duration"] == pytest.approx(5 / 16, abs=0.07), video
    page.locator("#video").evaluate("v => v.play()")
    page.wait_for_function("() => document.getElementById('video').currentTime > 0", timeout=15_000)
    shot(page, "04-done-video")

    taskid = shown_taskid(page)
    task = task_detail(server, taskid)
    assert (task["status"], task["pexit"]) == ("task_postprocess_end", "0"), task
    assert video["src"] == task["outputs"][0]["url"]

    link = page.locator("#download")
    expect(link).to_be_visible()
    expect(link).to_have_attribute("href", task["outputs"][0]["url"])
    with page.expect_download() as download_info:
        link.click()
    downloaded = Path(download_info.value.path())
    assert download_info.value.suggested_filename.endswith(".mp4")
    assert downloaded.stat().st_size == int(task["outputs"][0]["size"])
    assert downloaded.read_bytes()[4:8] == b"ftyp"

    row = page.locator(f"#tasks tr[data-taskid='{taskid}']")
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("32x32, 5 frames")


def test_a_queued_task_is_cancelled_and_a_running_one_killed_from_the_page(page: Page, server: ServeProcess) -> None:
    upload(page)
    fill(page, LONG)
    page.click("#run")
    long_id = shown_taskid(page)
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"step \d+/100"), timeout=120_000)
    expect(page.locator("#kill")).to_be_enabled()
    shot(page, "05-long-running")

    # A second task waits behind the running one: Cancel removes it from the queue.
    fill(page, QUICK)
    page.click("#run")
    expect(page.locator("#task-id")).not_to_have_text(f"#{long_id}")
    queued_id = shown_taskid(page)
    expect(page.locator("#task-status")).to_have_text("task_queue", timeout=20_000)
    expect(page.locator("#cancel")).to_be_enabled()
    expect(page.locator("#kill")).to_be_disabled()
    page.click("#cancel")
    expect(page.locator("#outcome")).to_have_text("cancelled", timeout=20_000)
    expect(page.locator("#task-status")).to_have_text("task_cancel")
    assert task_detail(server, queued_id)["status"] == "task_cancel"
    shot(page, "06-queued-cancelled")

    # Back to the running task from the recent list: Kill stops it within a step.
    page.locator(f"#tasks tr[data-taskid='{long_id}'] button").click()
    expect(page.locator("#task-id")).to_have_text(f"#{long_id}")
    expect(page.locator("#kill")).to_be_enabled(timeout=20_000)
    page.click("#kill")
    expect(page.locator("#outcome")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#task-status")).to_have_text("task_cancel")
    expect(page.locator("#video")).to_be_hidden()
    expect(page.locator("#download")).to_be_hidden()
    killed = task_detail(server, long_id)
    assert killed["status"] == "task_cancel", killed
    assert killed["outputs"] == [], killed
    last_step = page.locator("#events li[data-type='task_output']").last.inner_text()
    assert not last_step.endswith("step 100/100"), last_step
    page.click("#refresh")
    expect(page.locator(f"#tasks tr[data-taskid='{long_id}']")).to_contain_text("cancelled")
    expect(page.locator(f"#tasks tr[data-taskid='{queued_id}']")).to_contain_text("cancelled")
    shot(page, "07-running-killed")


def test_when_the_socket_is_refused_the_page_polls_task_detail_to_the_video(page: Page) -> None:
    page.route_web_socket(re.compile(r"/ws$"), lambda socket: socket.close())
    upload(page, "polled.png")
    fill(page, {**LONG, "steps": "12"})  # a few seconds: the once-a-second polls see it running
    page.click("#run")
    expect(page.locator("#live-mode")).to_have_text("polling Task/Detail", timeout=20_000)
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"step \d+/12"), timeout=60_000)
    expect(page.locator("#outcome")).to_have_text("succeeded", timeout=120_000)
    assert page.locator("#progress").evaluate("p => p.value") == 100
    page.wait_for_function(VIDEO_READY, timeout=30_000)
    assert page.locator("#video").evaluate("v => [v.videoWidth, v.videoHeight]") == [128, 128]
    shot(page, "08-polled-done")
