"""The live console, used as a person would: headless Chromium (Debian's `chromium` and `chromium-driver`)
on a real worker fed through the real broker.

Screenshots land in the test's folder (printed), and in PYTEST_RTREC_SCREENSHOTS when set (the
docs' pictures are refreshed that way).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.kafka_local import LocalKafka
from infra.processes import free_port
from streams.clients.kafka_io import publish_events
from streams.recommend import now_ms
from tests.harness import Pipeline, http_get

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
STREAM_PER_S = 40

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium and chromium-driver (.ci/run does)")
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("console")
    running = Pipeline(kafka.config.bootstrap, models_dir, home, http_port=free_port(), console=True)
    running.start()
    try:
        running.publish_catalog()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def stream(pipeline: Pipeline) -> Iterator[None]:
    """Generated events at a steady pace while the test looks, and a few malformed ones."""
    stop = threading.Event()
    events = pipeline.workload.stream(100_000, clock=now_ms)

    def feed() -> None:
        while not stop.wait(1 / 4):
            publish_events(
                pipeline.producer,
                pipeline.settings.events_topic,
                [next(events).event for _ in range(STREAM_PER_S // 4)],
            )
            pipeline.producer.flush()

    for n in range(3):
        pipeline.send_raw(f"user-bad-{n}".encode(), b"\x81\xa1v\x09")  # schema version 9: dead-lettered
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield
    finally:
        stop.set()
        feeder.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[WebDriver, str], None]:
    folder = tmp_path_factory.mktemp("screenshots")
    extra = os.environ.get("PYTEST_RTREC_SCREENSHOTS")
    print(f"console screenshots in {folder}")

    def take(driver: WebDriver, name: str) -> None:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(int(height) + 160, 800), 2400))  # the whole page, within reason
        driver.save_screenshot(str(folder / f"{name}.png"))
        driver.set_window_size(1400, 1000)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / f"{name}.png", Path(extra) / f"console-{name}.png")

    return take


def _until(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return found


def _number(driver: WebDriver, element_id: str) -> float | None:
    text = driver.find_element(By.ID, element_id).text.replace(",", "").removesuffix(" ms")
    return None if text in ("", "–") else float(text)


def _no_console_errors(driver: WebDriver) -> None:
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def _has_list(pipeline: Pipeline, user_id: str) -> bool:
    return http_get(pipeline.settings.http_port, f"/users/{user_id}/recommendations")[0] == 200


def _base(pipeline: Pipeline) -> str:
    return f"http://127.0.0.1:{pipeline.settings.http_port}"


def test_the_pipeline_page_shows_the_live_numbers_rising(
    pipeline: Pipeline, stream: None, browser: WebDriver, screenshots: Callable[[WebDriver, str], None]
) -> None:
    browser.get(f"{_base(pipeline)}/console")
    first = _until(lambda: _number(browser, "total-events"), "events counted on the page")
    _until(lambda: (_number(browser, "total-events") or 0) > first, "the events count to rise", timeout_s=30)
    _until(lambda: (_number(browser, "events-per-s") or 0) > 0, "a rate of events")
    _until(lambda: _number(browser, "p99") is not None, "the event-to-list latency")
    _until(lambda: (_number(browser, "total-lists") or 0) > 0, "lists sent")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-rates polyline"), "the rates are charted"
    lag = _until(lambda: browser.find_element(By.ID, "lag").text.strip("– \n"), "the lag table")
    assert pipeline.settings.events_topic in lag
    reasons = _until(
        lambda: "events: field 'v'" in browser.find_element(By.ID, "reasons").text, "dead letters by reason"
    )
    assert reasons
    time.sleep(6)  # a few seconds of history on the charts
    screenshots(browser, "pipeline")
    _no_console_errors(browser)


def test_the_user_explorer_shows_the_window_and_the_list_with_reasons(
    pipeline: Pipeline, stream: None, browser: WebDriver, screenshots: Callable[[WebDriver, str], None]
) -> None:
    user = pipeline.workload.user_id(3)
    _until(lambda: _has_list(pipeline, user), "a list for the user", timeout_s=90)
    browser.get(f"{_base(pipeline)}/console/users")
    field = browser.find_element(By.NAME, "user")
    field.send_keys(user)
    field.submit()
    _until(lambda: browser.find_elements(By.ID, "list"), "the user's list")
    assert browser.find_element(By.ID, "user").text == user
    rows = browser.find_elements(By.CSS_SELECTOR, "#list tr")[1:]
    assert len(rows) == pipeline.settings.top_k
    titles = {i.title for i in pipeline.workload.catalog}
    reasons = [row.find_element(By.CSS_SELECTOR, "td.reason").text for row in rows]
    # Reasons name what the user did by the items' titles.
    assert all(r.startswith("because you ") and any(t in r for t in titles) for r in reasons), reasons
    window = browser.find_elements(By.CSS_SELECTOR, "#window tr.held")
    assert window and len(window) <= pipeline.settings.window_size
    assert all(cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#window tr.held td:nth-child(3)"))
    assert browser.find_elements(By.CSS_SELECTOR, "#changes tr")[1:], "how the list changed with their last events"
    screenshots(browser, "user")

    rows[0].find_element(By.CSS_SELECTOR, "td:nth-child(2) a").click()
    neighbours = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#neighbours tr")[1:], "the item's neighbours")
    assert len(neighbours) == 10 and browser.find_element(By.ID, "item").text in titles
    screenshots(browser, "item")
    _no_console_errors(browser)


def test_dead_letters_are_listed_with_their_reason_and_place(
    pipeline: Pipeline, stream: None, browser: WebDriver, screenshots: Callable[[WebDriver, str], None]
) -> None:
    def listed() -> list[str]:
        browser.get(f"{_base(pipeline)}/console/dead-letters")
        return [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#letters tr")[1:]]

    rows = _until(lambda: len(listed()) >= 3 and listed(), "three dead letters")
    assert all(pipeline.settings.events_topic in row and "unsupported schema version" in row for row in rows), rows
    screenshots(browser, "dead-letters")
    _no_console_errors(browser)


def test_forgetting_a_user_from_the_console_asks_for_confirmation_and_erases_them(
    pipeline: Pipeline, stream: None, browser: WebDriver
) -> None:
    quiet = 500  # a user the stream does not touch, so nothing of theirs arrives after the forget
    user = pipeline.workload.user_id(quiet)
    pipeline.send_events([g.event for g in pipeline.workload.scripted_user(quiet, [("camping", 4)], clock=now_ms)])
    _until(lambda: _has_list(pipeline, user), "a list for the user", timeout_s=90)
    page = f"{_base(pipeline)}/console/users/{user}"
    browser.get(page)
    confirm = browser.find_element(By.ID, "confirm-forget")
    assert not confirm.is_displayed()  # behind the "Forget this user…" disclosure
    browser.find_element(By.CSS_SELECTOR, "#forget summary").click()
    confirm.click()
    assert user in _until(lambda: browser.find_elements(By.ID, "forgotten"), "the confirmation")[0].text

    def erased() -> bool:
        browser.get(page)
        problems = browser.find_elements(By.ID, "problem")
        return bool(problems) and "forgotten" in problems[0].text

    _until(erased, "the user's window to be erased")
    _no_console_errors(browser)
