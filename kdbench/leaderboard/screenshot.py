"""A picture of ``index.html`` as a browser draws it, for a README or a paper's supplement
(``kdbench leaderboard RUNS -o OUT --screenshot`` writes ``OUT/index.png``), and the browser
the page's own test drives.

The browser is headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages, or
any on ``PATH``), driven through Selenium (``pip install 'kdbench[screenshot]'``): the
maintained WebDriver client, instead of hand-written DevTools-protocol code. Nothing here is
needed to write the page itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from kdbench.api import UserError

WIDTH = 1366  # the narrow laptop window the page is designed for
MAX_HEIGHT = 8000  # a taller page is cut there (the top holds the tables and plots)


def _find(name: str, debian_path: str) -> str | None:
    return shutil.which(name) or (debian_path if Path(debian_path).exists() else None)


def screenshot_tools() -> tuple[str, str]:
    """(chromium, chromedriver) paths, with Selenium importable; a :class:`UserError` naming what
    to install when one is missing. Starts no browser."""
    chromium = _find("chromium", "/usr/bin/chromium")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver_path is None:
        raise UserError("a screenshot needs headless Chromium and its driver, and "
                        f"{'chromium' if chromium is None else 'chromedriver'} was not found: "
                        "apt-get install -y chromium chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise UserError("a screenshot drives Chromium through Selenium, which is not installed: "
                        "pip install 'kdbench[screenshot]'") from None
    return chromium, driver_path


def headless_chromium(width: int = WIDTH, height: int = 900):
    """A Selenium WebDriver of headless Chromium at ``width`` × ``height`` (the caller quits it);
    a :class:`UserError` naming what to install when the browser or Selenium is missing."""
    chromium, driver_path = screenshot_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def capture(driver, png: Path, width: int = WIDTH, max_height: int = MAX_HEIGHT) -> Path:
    """Save the page open in ``driver`` as ``png``: ``width`` wide, as tall as the page (at most
    ``max_height``), from its top."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(int(height), max_height))
    driver.execute_script("window.scrollTo(0, 0)")
    png = Path(png)
    if not driver.save_screenshot(str(png)):
        raise UserError(f"Chromium could not write the screenshot {png}: is its folder writable?")
    return png


def save_screenshot(page: Path, png: Path, width: int = WIDTH, max_height: int = MAX_HEIGHT) -> Path:
    """Open ``page`` (an ``index.html``) from ``file://`` in headless Chromium and save it as
    ``png`` (see :func:`capture`)."""
    driver = headless_chromium(width)
    try:
        driver.get(Path(page).resolve().as_uri())
        return capture(driver, png, width, max_height)
    finally:
        driver.quit()
