"""viewer.html in a real headless Chromium: OpenSeadragon loads and draws the DZI tiles.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``)
and Selenium (the ``test`` extra); skipped with the reason otherwise. The DZI is
served from 127.0.0.1, since browsers do not fetch tiles for a page opened as a file.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import numpy as np
import pytest
import pyvips

from ofstitch import formats, render

CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                         "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver on PATH (Debian: apt-get install chromium "
           "chromium-driver; .ci/run installs them when it runs as root)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def served_dzi(make_synthetic, tmp_path):
    """A DZI of a small synthetic mosaic and its viewer, served on 127.0.0.1."""
    scan = make_synthetic("viewer-scan", grid=(3, 3), tile_shape=(240, 320), noise=0.0,
                          vignetting=0.0, extension=".png", layout="filename", seed=2)
    site = tmp_path / "site"
    site.mkdir()
    mosaic = render.Mosaic([scan.folder / n for n in scan.names], scan.truth_px,
                           scan.tile_shape)
    mosaic.write(lambda im: formats.write_dzi(im, site / "scan_stitched.dzi", tile_size=128,
                                              pixel_size_um=0.83))
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{formats.VIEWER_NAME}", mosaic
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                    "(pip install -e '.[test]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=900,700", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # a browser that cannot start here is not our failure
        pytest.skip(f"Chromium did not start: {str(exc).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()


def test_viewer_draws_the_mosaic_with_openseadragon(served_dzi, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    url, mosaic = served_dzi
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return !!(window.viewer && viewer.world.getItemCount() > 0"
        " && viewer.world.getItemAt(0).getFullyLoaded());"))
    assert browser.execute_script("return window.ofstitchTilesLoaded;") > 0
    size = browser.execute_script(
        "var s = viewer.world.getItemAt(0).source; return [s.height, s.width];")
    assert tuple(size) == mosaic.size
    # Everything came from our server: no CDN, no network.
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; });")
    assert urls and all(u.startswith(url.rsplit("/", 1)[0]) for u in urls), urls
    # The canvas shows the tissue: not the page's background, and with texture.
    shot = pyvips.Image.new_from_buffer(browser.get_screenshot_as_png(), "").numpy()[..., :3]
    h, w = shot.shape[:2]
    centre = shot[h // 2 - 100:h // 2 + 100, w // 2 - 150:w // 2 + 150].astype(float)
    background = np.array([17, 17, 17])
    assert np.abs(centre - background).sum(axis=2).mean() > 60
    assert centre.std() > 10
