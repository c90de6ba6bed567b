"""The run report in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium) opens the "semisup report" extra link of the run that ``semisup_rest_run``
triggered on a running ``airflow standalone``.

Auth is Airflow's own: the browser first gets the api-server's refusal, then logs in through the
simple auth manager's login form (which stores the JWT in the ``_token`` cookie, as for any user)
and is sent back to the report. The page must show the model comparison table with one row per
model, and every plot must be loaded and decoded (``naturalWidth > 0``). The screenshot is kept in
``test-artifacts/report_browser/`` (ignored by git; ``SEMISUP_TEST_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import io
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SEMISUP_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "report_browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MODELS = ("teacher", "baseline", "student_pretrained", "student", "oracle")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                              "chromium-driver; .ci/run installs them)"),
]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the 'test' extra)")
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager must never fetch a browser or a driver: explicit paths, and offline anyway
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-proxy-server", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 60, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message)


def test_report_renders_in_chromium(airflow_server, semisup_rest_run, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, run_id = airflow_server, semisup_rest_run["run_id"]
    assert semisup_rest_run["run"]["state"] == "success"
    # the URL the "semisup report" extra link of the evaluate task points at
    url = server.extra_links("semisup_retrain", run_id, "evaluate")["semisup report"]
    assert url.startswith(f"{server.url}/semisup/"), url

    # not logged in: the plugin view refuses, no report
    browser.get(url)
    assert "Models (held-out test set)" not in browser.page_source
    assert "Not authenticated" in browser.page_source or "Forbidden" in browser.page_source, browser.page_source[:500]

    # log in as a user would, through Airflow's login form, which redirects back to the report
    browser.get(f"{server.url}/auth/login?next={urllib.parse.quote(url, safe='')}")
    user = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=username]"),
                 message="no login form")[0]
    user.send_keys("viewer")
    browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(server.password("viewer"), Keys.ENTER)
    _wait(browser, lambda d: d.find_elements(By.TAG_NAME, "table"),
          message=f"the report did not open after login (at {browser.current_url})")
    assert browser.current_url == url
    assert browser.title == f"semisup run {run_id}"

    # the model comparison: the first table, one row per model with a top-1 percentage
    table = browser.find_elements(By.TAG_NAME, "table")[0]
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header[:3] == ["model", "arch", "top-1"], header
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in r.find_elements(By.TAG_NAME, "td")]
            for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert set(MODELS) <= set(rows), sorted(rows)
    for name in MODELS:
        assert rows[name][2].endswith("%") and 0 <= float(rows[name][2][:-1]) <= 100, rows[name]

    # every plot loaded and decoded by the browser, with a real size on the page
    _wait(browser, lambda d: d.execute_script("return [...document.images].every(i => i.complete)"),
          message="images still loading")
    images = browser.execute_script(
        "return [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,"
        " shown: i.getBoundingClientRect().width}))")
    assert {i["alt"] for i in images} >= {"per-class recall", "selected images per class"}, images
    bad = [i for i in images if not (i["w"] > 0 and i["h"] > 0 and i["shown"] > 0)]
    assert not bad, f"plots not rendered: {bad}"

    # the screenshot: the whole page, kept as a test artifact
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(height, 1000), 12000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    png = browser.get_screenshot_as_png()
    shot.write_bytes(png)
    print(f"\nreport screenshot: {shot} ({len(png)} bytes, page height {height}px)")
    # not a blank page: the plots put plenty of non-white pixels on it
    picture = Image.open(io.BytesIO(png)).convert("L")
    dark = sum(picture.histogram()[:200]) / (picture.width * picture.height)
    assert picture.width >= 1000 and dark > 0.01, (picture.size, dark)
