"""The search page in a real headless browser (Debian's chromium, driven by Playwright): upload an image,
see the grid the API answers, change the radius, click a result to search with it, and read errors."""
import os
import socket
import threading
import time

import httpx2
import pytest
import uvicorn

import serve
from test_serve import ENCODING, served  # noqa: F401  (the module-scoped fixture)

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"chromium is not installed ({CHROMIUM}; apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (only with a browser to drive)

# Headless chromium in a container without a GPU, and nothing fetched from outside.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def site(served):  # noqa: F811  (pytest's fixture by name)
    """serve.py's app on a free port of 127.0.0.1, in a thread; its base URL."""
    service = serve.build_service(["--index", served.index, "--model_path", served.snapshot, *ENCODING])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(serve.create_app(service), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    listener.close()


@pytest.fixture(scope="module")
def page(site):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(site)
        yield page
        browser.close()


def api_answer(site, query, **params):
    """What /api/search answers for an uploaded file or a database item, at the page's settings."""
    with httpx2.Client(base_url=site) as http:
        if isinstance(query, int):
            answer = http.post("/api/search", params={**params, "item": query})
        else:
            answer = http.post("/api/search", params=params, files={"image": (query.name, query.read_bytes())})
    assert answer.status_code == 200, answer.text
    return answer.json()


def grid_indices(page):
    return [int(index) for index in page.locator("#results .result").evaluate_all(
        "cards => cards.map(card => card.dataset.index)")]


def test_upload_change_radius_and_click_a_result(page, site, served, tmp_path):  # noqa: F811
    expect(page.locator("#stats")).to_contain_text("18 items, 16-bit codes")
    page.set_input_files("#file", str(served.query))
    expect(page.locator("#summary")).to_contain_text("ball of radius 2")
    expected = api_answer(site, served.query, radius=2, topk=20)
    expect(page.locator("#results .result")).to_have_count(len(expected["results"]))
    assert grid_indices(page) == [result["index"] for result in expected["results"]]
    expect(page.locator("#query-code")).to_have_text(" ".join([expected["code"][:8], expected["code"][8:]]))
    expect(page.locator("#query-image")).to_have_js_property("complete", True)

    page.select_option("#radius", "0")
    expected = api_answer(site, served.query, radius=0, topk=20)
    expect(page.locator("#summary")).to_contain_text("ball of radius 0")
    expect(page.locator("#results .result")).to_have_count(len(expected["results"]))
    assert grid_indices(page) == [result["index"] for result in expected["results"]]

    clicked = grid_indices(page)[-1]
    page.locator(f'#results .result[data-index="{clicked}"] button').click()
    expect(page.locator("#query-name")).to_contain_text(f"database item {clicked}")
    expected = api_answer(site, clicked, radius=0, topk=20)
    expect(page.locator("#results .result")).to_have_count(len(expected["results"]))
    assert grid_indices(page) == [result["index"] for result in expected["results"]]
    first = page.locator("#results .result").first
    assert "relevant" in first.get_attribute("class")           # labels are known for a database item
    expect(first.locator("img")).to_have_js_property("complete", True)
    assert first.locator("img").evaluate("image => image.naturalWidth") == 16
    screenshot = tmp_path / "search.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_shown_in_words(page, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a shopping list, not a picture")
    page.set_input_files("#file", str(not_an_image))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("not an image that PIL can read")
    page.click("#random")
    expect(page.locator("#query-name")).to_contain_text("database item")
    expect(page.locator("#error")).to_be_hidden()
