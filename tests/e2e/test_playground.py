"""The playground page in a real browser (the system chromium, driven by Playwright) against
`bentoml serve`: generation with live progress, cancelling, inpainting a painted mask, API keys.

Without chromium or Playwright these tests skip, except under CI (`CI=true`), where they fail.
`HYPERGEN_SCREENSHOTS=1` also refreshes the README's screenshots in `docs/`.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

DOCS = Path(__file__).resolve().parents[2] / "docs"
PROMPT = "a red circle on a blue background"
KEY = "sk-playground-test"
DESKTOP = {"width": 1000, "height": 800}
PHONE = {"width": 390, "height": 844}

# Runs in the page before its own script: keeps every status text and every image the preview
# showed, so a test can check what the user saw go by, not only the final state.
RECORDER = """
window.seen = { status: [], previews: [] };
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  const preview = document.getElementById("preview");
  new MutationObserver(() => window.seen.status.push(status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
  new MutationObserver(() => window.seen.previews.push(preview.getAttribute("src")))
    .observe(preview, { attributes: true, attributeFilter: ["src"] });
});
"""

# Every form control must have a label (or an accessible name) a screen reader can announce.
UNLABELLED_CONTROLS = """
[...document.querySelectorAll("input, select, textarea")]
  .filter((control) => control.labels.length === 0 && !control.getAttribute("aria-label"))
  .map((control) => control.id || control.outerHTML)
"""


@pytest.fixture(scope="module")
def browser():
    """The system chromium (Playwright cannot download its own browsers here)."""
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [name for name, absent in (("chromium", executable is None), ("playwright", sync_playwright is None)) if absent]
    if missing:
        message = f"browser tests need {' and '.join(missing)} (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    page.add_init_script(RECORDER)
    yield page
    context.close()


@pytest.fixture(scope="module")
def keyed_server(start_server):
    server = start_server({"HYPERGEN_API_KEYS": KEY})
    server.wait_ready()
    return server


def expect(*args, **kwargs):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


def pixels(source: str | bytes) -> np.ndarray:
    """Decoded RGB pixels of a data URL, base64 text or PNG bytes."""
    if isinstance(source, str):
        source = base64.b64decode(source.split(",", 1)[-1])
    return np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=np.int16)


def multipart_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The parts of a multipart body, by field name."""
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()}


def health(server) -> dict:
    return httpx.get(f"{server.base_url}/health", timeout=10).json()


def save_screenshot(page, name: str) -> None:
    if os.environ.get("HYPERGEN_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=DOCS / name, full_page=True)


def test_root_redirects_to_the_playground_and_the_docs_stay(default_server):
    for path in ("/", "/playground"):
        response = httpx.get(default_server.base_url + path)
        assert response.status_code == 307 and response.headers["location"] == "/playground/"
    page = httpx.get(f"{default_server.base_url}/playground/")
    assert page.status_code == 200 and "<title>HyperGen playground</title>" in page.text
    assert httpx.get(f"{default_server.base_url}/docs").status_code == 200
    assert "/playground/" not in httpx.get(f"{default_server.base_url}/openapi.json").json()["paths"]


def test_generate_shows_progress_previews_and_the_images_the_api_returns(page, default_server, client):
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(default_server.base_url)
    generate = page.get_by_role("tabpanel", name="Generate")
    expect(page.get_by_label("Model")).to_have_value("hypergen-tiny-sd")
    generate.get_by_label("Prompt", exact=True).fill(PROMPT)
    generate.get_by_label("Steps").fill("20")
    generate.get_by_label("Seed").fill("1234")
    generate.get_by_label("Images").fill("2")
    # The model's card offers its schedulers and only the sizes it makes (the demo model: up to 128x128).
    assert "euler_a" in generate.get_by_label("Scheduler").locator("option").all_inner_texts()
    assert page.evaluate("[...document.querySelectorAll('#sizes option')].map(o => o.value)") == ["64x64", "128x128"]
    generate.get_by_role("button", name="Generate").click()

    expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 20/20 steps, 2 images"), timeout=60_000)
    seen = page.evaluate("window.seen")
    steps = [int(match[1]) for text in seen["status"] if (match := re.fullmatch(r"Step (\d+)/20", text))]
    assert steps[-1] == 20 and steps == sorted(steps) and len(steps) >= 10  # progress arrived live
    cards = page.locator("#gallery .card")
    expect(cards).to_have_count(2)
    shown = {int(card.locator("dt:text-is('Seed') + dd").inner_text()): card.locator("img").get_attribute("src") for card in cards.all()}
    assert sorted(shown) == [1234, 1235]  # image i of a request uses seed + i
    previews = [url for url in seen["previews"] if url not in shown.values()]
    assert len(previews) >= 3  # partial images were shown before the results

    api = client.images.generate(
        model="hypergen-tiny-sd", prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 1234, "num_inference_steps": 20},
    )  # fmt: skip
    for index, seed in enumerate((1234, 1235)):
        assert np.array_equal(pixels(shown[seed]), pixels(api.data[index].b64_json))

    first = cards.filter(has_text="1234")
    with page.expect_download() as download:
        first.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "hypergen-1234.png"
    assert np.array_equal(pixels(Path(download.value.path()).read_bytes()), pixels(shown[1234]))
    save_screenshot(page, "playground-generate.png")

    # Clicking an image puts its settings back into the form.
    generate.get_by_label("Prompt", exact=True).fill("something else")
    generate.get_by_label("Seed").fill("7")
    first.get_by_role("button", name=re.compile("^Reuse the settings")).click()
    expect(generate.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    expect(generate.get_by_label("Seed")).to_have_value("1234")
    expect(generate.get_by_label("Steps")).to_have_value("20")
    expect(generate.get_by_label("Images")).to_have_value("1")
    # "Edit" takes an image over to the Edit tab, at its own size.
    first.get_by_role("button", name=re.compile("^Edit this image")).click()
    expect(page.get_by_role("tab", name="Edit")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#mask-canvas")).to_be_visible()
    assert page.evaluate("[document.getElementById('edit-canvas').width, document.getElementById('edit-canvas').height]") == [64, 64]
    assert all(url.startswith((default_server.base_url, "ws://127.0.0.1", "data:")) for url in requested)


def test_cancel_stops_a_long_generation_and_frees_its_slot(page, default_server):
    def abandoned() -> int:
        return sum("status=499" in line and "steps=147" in line for line in default_server.log().splitlines())

    page.goto(f"{default_server.base_url}/playground/")
    generate = page.get_by_role("tabpanel", name="Generate")
    generate.get_by_label("Steps").fill("147")
    generate.get_by_label("Size (WxH)").fill("128x128")
    generate.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step [1-9]\d*/147$"), timeout=60_000)
    assert health(default_server)["in_flight"] == 1

    generate.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(generate.get_by_role("button", name="Generate")).to_be_enabled()
    expect(generate.get_by_role("button", name="Cancel")).to_be_disabled()
    deadline = time.monotonic() + 30
    while (health(default_server)["in_flight"] or abandoned() == 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    state = health(default_server)
    assert state["in_flight"] == 0 and state["queue_depth"] == 0
    assert abandoned() == 1  # the server logged the request as left by its client
    expect(page.locator("#gallery .card")).to_have_count(0)
    assert page.locator("#generate-error").inner_text() == ""


def test_a_painted_mask_inpaints_only_the_painted_area(page, default_server, tmp_path):
    scene = Image.new("RGB", (64, 64), (30, 60, 200))
    scene.paste((220, 30, 30), (8, 16, 28, 48))
    scene.save(tmp_path / "scene.png")
    page.goto(f"{default_server.base_url}/playground/")
    page.get_by_role("tab", name="Edit").click()
    edit = page.get_by_role("tabpanel", name="Edit")
    edit.get_by_label("Image", exact=True).set_input_files(tmp_path / "scene.png")
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    # A horizontal stroke across the middle, from the red block into the blue background.
    page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.75 * box["width"], box["y"] + 0.5 * box["height"], steps=12)
    page.mouse.up()
    edit.get_by_label("Prompt", exact=True).fill("a green circle on a blue background")
    edit.get_by_label("Steps").fill("10")
    edit.get_by_label("Seed").fill("3")
    sent = []

    def capture(route):
        # Only interception sees the body: a request event leaves out a FormData's blobs.
        sent.append(multipart_fields(route.request.headers["content-type"], route.request.post_data_buffer))
        route.continue_()

    page.route("**/v1/images/edits", capture)
    edit.get_by_role("button", name="Edit", exact=True).click()
    result = page.locator("#edit-results .card img")
    expect(result).to_have_count(1, timeout=60_000)
    expect(page.locator("#edit-status")).to_have_text(re.compile(r"^Done: 1 image"))
    save_screenshot(page, "playground-edit.png")

    fields = sent[0]
    assert fields["prompt"] == b"a green circle on a blue background" and fields["seed"] == b"3"
    # (The uploaded file's bytes are not visible to interception; the result below shows they arrived.)
    assert fields["response_format"] == b"b64_json" and "image" in fields
    mask = Image.open(io.BytesIO(fields["mask"]))
    assert mask.mode == "RGBA" and mask.size == (64, 64)
    alpha = np.asarray(mask.getchannel("A"))
    assert set(np.unique(alpha)) == {0, 255}  # fully transparent where painted, opaque elsewhere
    assert alpha[32, 10] == alpha[32, 45] == 0 and alpha[2, 2] == alpha[60, 60] == alpha[32, 62] == 255
    painted = alpha == 0

    difference = np.abs(pixels(result.get_attribute("src")) - np.asarray(scene, dtype=np.int16))
    assert difference[~painted].max() == 0  # outside the painted stroke: exactly as uploaded
    assert difference[painted].mean() > 20  # inside it: regenerated


def test_the_api_key_is_asked_for_checked_and_used(page, keyed_server):
    page.goto(keyed_server.base_url)
    message = page.locator("#key-message")
    expect(message).to_have_text("This server needs an API key.")
    page.get_by_label("API key").fill("sk-wrong")
    page.get_by_role("button", name="Use key").click()
    expect(message).to_have_text("Incorrect API key provided.")
    assert page.evaluate("sessionStorage.getItem('hypergen-api-key')") is None

    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(message).to_contain_text("Key accepted")
    expect(page.get_by_label("Model")).to_have_value("hypergen-tiny-sd")
    generate = page.get_by_role("tabpanel", name="Generate")
    generate.get_by_label("Steps").fill("2")
    generate.get_by_role("button", name="Generate").click()
    expect(page.locator("#gallery .card")).to_have_count(1, timeout=60_000)
    assert KEY not in page.url and page.evaluate("sessionStorage.getItem('hypergen-api-key')") == KEY

    # A key that stops working mid-session: the WebSocket's error reaches the page.
    page.evaluate("sessionStorage.setItem('hypergen-api-key', 'sk-revoked')")
    generate.get_by_role("button", name="Generate").click()
    expect(page.locator("#generate-error")).to_have_text("Incorrect API key provided.")
    expect(page.locator("#gallery .card")).to_have_count(1)


def test_the_page_is_labelled_keyboard_usable_and_fits_a_phone(browser, default_server):
    context = browser.new_context(viewport=PHONE, has_touch=True)
    page = context.new_page()
    page.goto(f"{default_server.base_url}/playground/")
    expect(page.get_by_label("Model")).to_have_value("hypergen-tiny-sd")
    assert page.evaluate(UNLABELLED_CONTROLS) == []
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(fits)

    page.get_by_role("tab", name="Generate").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Edit")).to_be_focused()
    expect(page.get_by_role("tab", name="Edit")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tabpanel", name="Edit")).to_be_visible()
    expect(page.get_by_role("tabpanel", name="Generate")).to_be_hidden()
    assert page.evaluate(fits)
    page.keyboard.press("ArrowLeft")
    expect(page.get_by_role("tabpanel", name="Generate")).to_be_visible()
    context.close()
