"""The web page at `/`, driven in a real browser: Playwright for Python on Debian's chromium.

Skipped, saying why, where no chromium is installed; under CI=true a missing browser fails instead
(`.ci/run` installs it). One browser for the module; screenshots go to the run's work dir.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import start_api, stop, unique

CHROMIUM = os.environ.get("MEDIAGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        message = f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set MEDIAGEN_CHROMIUM)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(workdir: Path) -> Path:
    folder = workdir / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def page(browser: Any, api_url: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(api_url)
    page.wait_for_selector("#param-aspect_ratio")  # the form is drawn from GET /models
    yield page
    context.close()
    assert not errors, errors


def test_a_prompt_shows_its_progress_then_its_image(page: Any, shots: Path) -> None:
    page.fill("#prompt", unique("a lighthouse at dusk [[latency=2]]"))
    page.keyboard.press("Tab")
    page.click("#submit")

    page.wait_for_function("document.querySelector('#job-progress').value > 0", timeout=15_000)
    assert page.text_content("#job-status") == "running"
    page.wait_for_selector("#results img", timeout=20_000)
    page.wait_for_function("document.querySelector('#results img').naturalWidth > 0")
    assert page.text_content("#job-status") == "succeeded"
    page.wait_for_selector("#timeline li:has-text('Attempt 1')")
    page.screenshot(path=str(shots / "page.png"), full_page=True)


def test_a_bad_parameter_gets_its_message_next_to_its_field(page: Any, shots: Path) -> None:
    page.fill("#prompt", "a lighthouse, too many times")
    page.fill("#param-num_outputs", "9")
    page.click("#submit")

    error = page.locator("[id='parameters.num_outputs-error']")
    error.wait_for()
    assert "at most 4" in error.text_content()
    assert page.get_attribute("#param-num_outputs", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "param-num_outputs"
    assert page.is_hidden("#job")
    page.screenshot(path=str(shots / "invalid.png"))


def test_a_running_job_can_be_canceled(page: Any) -> None:
    page.fill("#prompt", unique("a very slow lighthouse [[latency=30]]"))
    page.click("#submit")
    page.wait_for_selector("#cancel:visible", timeout=15_000)
    page.wait_for_function("document.querySelector('#job-status').textContent === 'running'", timeout=15_000)

    page.click("#cancel")

    page.wait_for_function("document.querySelector('#job-status').textContent === 'canceled'", timeout=15_000)
    assert page.is_hidden("#cancel")


def test_the_gallery_pages_through_recent_jobs(page: Any, api_url: str) -> None:
    for n in range(9):  # more than a page, whatever ran before
        httpx.post(f"{api_url}/generate", json={"prompt": unique(f"a gallery lighthouse {n}")}).raise_for_status()
    page.reload()
    page.wait_for_selector("#gallery li:nth-child(8)")
    first = page.locator("#gallery li").count()
    assert first == 8

    page.click("#more")

    page.wait_for_function("document.querySelectorAll('#gallery li').length > 8")
    ids = page.eval_on_selector_all("#gallery button", "els => els.map(e => e.dataset.job)")
    assert len(ids) == len(set(ids))


def test_the_page_fits_a_phone_and_works_by_keyboard(browser: Any, api_url: str, shots: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(api_url)
    page.wait_for_selector("#param-aspect_ratio")

    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.id")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focused and outline != "none"
    for field in page.eval_on_selector_all(
        "#generate input, #generate select, #generate textarea", "e => e.map(x => x.id)"
    ):
        assert page.locator(f"label[for='{field}']").count() == 1, f"{field} has no label"
    page.screenshot(path=str(shots / "phone.png"), full_page=True)
    context.close()


def test_the_api_docs_work_offline(browser: Any, api_url: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    outside: list[str] = []
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(api_url)
            else (outside.append(route.request.url), route.abort())
        ),
    )
    page.goto(f"{api_url}/docs")
    page.wait_for_selector(".opblock-summary-path:has-text('/generate')", timeout=15_000)
    context.close()
    assert outside == []


KEY = "browser-key-123"


@pytest.fixture(scope="module")
def keyed_api(service_env: dict[str, str], workdir: Path) -> Iterator[str]:
    """An API with keys, where a video model is allowed too."""
    api = start_api(
        service_env,
        workdir / "api-browser-keyed.log",
        MEDIAGEN_API_KEYS=KEY,
        MEDIAGEN_ALLOWED_MODELS="black-forest-labs/flux-schnell,fake/tiny-video",
    )
    yield api.extra["url"]
    stop(api.proc)


def open_with_key(context: Any, url: str) -> Any:
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#key-box[open]")  # the API said 401: the page asks for a key
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#param-aspect_ratio")
    return page


def test_with_api_keys_the_key_lives_in_this_tab_only(browser: Any, keyed_api: str) -> None:
    context = browser.new_context()
    try:
        page = open_with_key(context, keyed_api)
        page.fill("#prompt", unique("a keyed lighthouse"))
        page.click("#submit")

        # Followed over fetch (EventSource sends no Authorization), the image fetched with the key too
        page.wait_for_function("document.querySelector('#job-status').textContent === 'succeeded'", timeout=20_000)
        page.wait_for_function("document.querySelector('#results img')?.naturalWidth > 0", timeout=10_000)
        assert page.evaluate("sessionStorage.getItem('mediagen.apiKey')") == KEY
        assert page.evaluate("localStorage.length") == 0
        assert KEY not in page.evaluate("document.cookie")
        other_tab = context.new_page()
        other_tab.goto(keyed_api)
        assert other_tab.evaluate("sessionStorage.getItem('mediagen.apiKey')") is None
    finally:
        context.close()


def test_a_video_model_shows_its_video(browser: Any, keyed_api: str) -> None:
    context = browser.new_context()
    try:
        page = open_with_key(context, keyed_api)
        page.select_option("#model", "fake/tiny-video")
        assert "Makes videos" in page.text_content("#model-info")
        page.fill("#prompt", unique("a short clip of a lighthouse"))
        page.click("#submit")

        video = page.wait_for_selector("#results video[src]", timeout=20_000)
        assert video.get_attribute("controls") is not None
        assert page.evaluate("document.querySelector('#results video').src.startsWith('blob:')")  # fetched with the key
    finally:
        context.close()
