"""``framebroker view``: real broker and viewer processes, a real headless Chromium.

The browser tests skip only when chromium and chromium-driver are not installed
(CI installs them: .ci/run). Waits are bounds on a hang, never performance thresholds.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from broker.client import Control
from broker.sources import check_synthetic, read_stamp, synthetic_frame
from conftest import cli, free_port, make_endpoints, run_cli

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1000")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the viewer's browser tests need chromium and chromium-driver "
           "(apt-get install -y chromium chromium-driver)")
SHAPE = (240, 320, 3)
HANG = 60.0  # seconds: a bound on a hang, not a performance threshold


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


class ViewProc:
    """A ``framebroker view`` process on a free loopback port."""

    def __init__(self, control: str, *args: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = cli("view", "--broker", control, "--http", self.url[7:], *args)

    def get(self, path: str) -> tuple[bytes, dict[str, str]]:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read(), dict(r.headers)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.get("/stats")[0])

    def wait_stats(self, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + HANG
        while True:
            assert self.proc.poll() is None, f"view exited: {self.proc.communicate()}"
            try:
                stats = self.stats()
                if ready(stats):
                    return stats
            except urllib.error.URLError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "the viewer never reached the awaited state"
            time.sleep(0.05)

    def png(self, query: str = "") -> tuple[np.ndarray, int]:
        body, headers = self.get("/frame.png" + query)
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        return image, int(headers["X-Frame-Id"])

    def finish(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=HANG)
        return self.proc.returncode, out, err


@pytest.fixture
def view_factory() -> Iterator[Callable[..., ViewProc]]:
    views: list[ViewProc] = []

    def start(control: str, *args: str) -> ViewProc:
        views.append(ViewProc(control, *args))
        return views[-1]

    yield start
    for v in views:
        if v.proc.poll() is None:
            v.proc.kill()
            v.proc.communicate()


def text(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).text


def wait_page(browser, ready: Callable[[Any], bool]) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, HANG, poll_frequency=0.1).until(ready)


def shown(browser) -> int:
    return int(text(browser, "shown"))


def screenshot(browser, element_id: str) -> np.ndarray:
    from selenium.webdriver.common.by import By

    png = browser.find_element(By.ID, element_id).screenshot_as_png
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def shows(browser, element_id: str, image: np.ndarray) -> bool:
    """The element displays ``image`` (pixel for pixel, up to JPEG decoder rounding)."""
    shot = screenshot(browser, element_id)
    return shot.shape == image.shape and np.abs(shot.astype(np.int16) - image).mean() < 1


def assert_shows_synthetic(browser, view: ViewProc, control: str) -> None:
    """With the broker paused, the page's image settles on the last frame's JPEG, which
    has that synthetic frame's disc in the same place, in the frame's colours."""
    ctl = Control(control)
    try:
        ctl.pause()
        view.wait_stats(lambda s: s["frame_id"] == ctl.status()["frames_sent"] - 1)
        fid = assert_frame_is_synthetic(view)
        jpeg, headers = view.get("/frame.jpg")
        assert int(headers["X-Frame-Id"]) == fid
        served = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        wait_page(browser, lambda d: text(d, "frame_id") == str(fid) and shows(d, "frame", served))
        ctl.resume()
    finally:
        ctl.close()
    ref = synthetic_frame(SHAPE, "uint8", fid)
    disc, ref_disc = served.min(axis=2) >= 240, ref.min(axis=2) >= 240  # the white disc
    # (it moves 1-2 px a frame: the same frame through JPEG overlaps 0.98, the next 0.90)
    overlap = (disc & ref_disc).sum() / (disc | ref_disc).sum()
    assert overlap > 0.95, f"the disc of frame {fid} is not where the page shows it ({overlap:.2f})"
    err, swapped = np.abs(served - ref).mean(), np.abs(served - ref[:, :, ::-1]).mean()
    assert err < swapped, "the page shows the frame's colour channels swapped"


def assert_frame_is_synthetic(view: ViewProc) -> int:
    frame, fid = view.png()
    assert frame.shape == SHAPE
    assert read_stamp(frame) == fid
    assert check_synthetic(frame, fid) == -1
    return fid


@needs_chromium
def test_page_shows_frames_then_disconnected_then_recovers(eps, broker_factory, view_factory,
                                                           browser) -> None:
    serve = ("--fps", "30", "--shape", "x".join(map(str, SHAPE)))
    view = view_factory(eps.control)  # before the broker: it waits, showing disconnected
    assert not view.wait_stats(lambda s: True)["connected"]
    browser.get(view.url + "/")
    wait_page(browser, lambda d: text(d, "conn") == "disconnected")

    broker = broker_factory(*serve)
    broker.wait_ready()
    wait_page(browser, lambda d: text(d, "conn") == "connected" and shown(d) > 0)
    first = shown(browser)
    wait_page(browser, lambda d: shown(d) > first)  # the stats panel's counter advances
    assert_frame_is_synthetic(view)
    assert_shows_synthetic(browser, view, eps.control)
    assert view.get("/fft.png")[0].startswith(b"\x89PNG")

    broker.proc.terminate()  # the broker goes away
    assert broker.finish()[0] == 0
    wait_page(browser, lambda d: text(d, "conn") == "disconnected")
    assert not view.stats()["connected"]

    before = shown(browser)
    broker_factory(*serve).wait_ready()  # a new broker (a new session) on the same endpoints
    wait_page(browser, lambda d: text(d, "conn") == "connected" and shown(d) > before)
    stats = view.stats()
    assert stats["connected"] and stats["sessions"] == 2
    assert_frame_is_synthetic(view)

    code, out, err = view.finish()
    assert code == 0, err
    assert "frames shown" in out and "broker sessions 2" in out, out


def test_view_follows_a_new_broker_on_other_data_endpoints(eps, broker_factory,
                                                          view_factory) -> None:
    """A broker that comes back behind the same control endpoint but publishes elsewhere:
    the viewer notices in the broker's status and subscribes there."""
    serve = ("--fps", "30", "--shape", "x".join(map(str, SHAPE)))
    first = broker_factory(*serve)
    first.wait_ready()
    view = view_factory(eps.control)
    view.wait_stats(lambda s: s["shown"] > 0)
    first.proc.terminate()
    assert first.finish()[0] == 0
    view.wait_stats(lambda s: not s["connected"])
    before = view.stats()["shown"]
    moved = dataclasses.replace(make_endpoints(), control=eps.control)
    broker_factory(*serve, endpoints=moved).wait_ready()
    view.wait_stats(lambda s: s["connected"] and s["shown"] > before and s["sessions"] == 2)
    assert_frame_is_synthetic(view)
    code, _, err = view.finish()
    assert code == 0 and f"subscribed to 'cam' at {moved.pub}" in err, err


def test_uint16_frames_fixed_range_and_auto_contrast(eps, broker_factory, view_factory) -> None:
    """Gray uint16 frames: ``?raw=1`` is the received frame, bit for bit; the displayed
    frame is the fixed range mapped onto 0..255, or spans 0..255 with auto contrast."""
    broker_factory("--fps", "30", "--shape", "120x160", "--dtype", "uint16").wait_ready()
    fixed = view_factory(eps.control, "--range", "0:4095")
    auto = view_factory(eps.control)
    for view in (fixed, auto):
        view.wait_stats(lambda s: s["shown"] > 0)
    ctl = Control(eps.control)
    ctl.pause()  # the same frame stays on display while we fetch it
    ctl.close()
    for view in (fixed, auto):
        deadline = time.monotonic() + HANG
        while True:  # until both images come from one frame
            (raw, rid), (shown_frame, sid) = view.png("?raw=1"), view.png()
            if rid == sid == view.stats()["frame_id"]:
                break
            assert time.monotonic() < deadline, "the viewer's frame never settled"
        assert raw.dtype == np.uint16 and raw.shape == (120, 160)
        assert check_synthetic(raw, rid) == -1
        assert shown_frame.dtype == np.uint8 and shown_frame.shape == (120, 160)
        if view is fixed:
            expected = np.clip(raw * (255 / 4095) + 0.5, 0, 255).astype(np.uint8)
            assert np.abs(shown_frame.astype(int) - expected).max() <= 1
            assert view.stats()["range_mode"] == "fixed"
        else:
            assert shown_frame.min() == 0 and shown_frame.max() == 255
            assert view.stats()["range_mode"] == "auto"


def test_view_refuses_a_network_address_and_a_busy_port(eps) -> None:
    res = run_cli("view", "--broker", eps.control, "--http", f"0.0.0.0:{free_port()}")
    assert res.returncode == 2 and "refusing to serve the page on 0.0.0.0" in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("view", "--broker", eps.control, "--http", f"127.0.0.1:{port}")
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in res.stderr


def test_view_shows_the_fft_workers_spectrum_from_a_sink(eps, broker_factory,
                                                         view_factory) -> None:
    """With workers running (``--fft-output magnitude``) and a sink publishing its ordered
    results, the page's spectrum is the workers' result for the frame it names, pixel
    for pixel up to float rounding, not one the viewer computed."""
    from broker.view import spectrum_image

    shape = (120, 160)
    b = broker_factory("--fps", "30", "--shape", "x".join(map(str, shape)), "--wait-workers", "1")
    publish = f"tcp://127.0.0.1:{free_port()}"
    worker = cli("worker", "--broker", eps.control, "--planner", "estimate", "--fft-output",
                 "magnitude", "--timeout", "60")
    sink = cli("sink", "--broker", eps.control, "--publish", publish, "--timeout", "60")
    # at --scale 0.5 a spectrum the viewer computed itself would be 60x80
    view = view_factory(eps.control, "--results", publish, "--scale", "0.5")
    try:
        view.wait_stats(lambda s: "FFT worker" in (s["fft_source"] or ""))
        ctl = Control(eps.control)
        ctl.pause()
        view.wait_stats(lambda s: s["frame_id"] == ctl.status()["frames_sent"] - 1)
        ctl.close()
        stats = view.stats()
        fid = int(stats["fft_source"].split("#")[1].split(",")[0])
        body, _ = view.get("/fft.png")
        shown_fft = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        frame = synthetic_frame(shape, "uint8", fid).astype(np.float64)
        expected = spectrum_image(np.log1p(np.abs(np.fft.rfft2(frame))), shape[1])
        assert shown_fft.shape == expected.shape == (*shape, 3)
        # the next frame's spectrum is 0.11 away on this measure, float rounding far less
        assert np.abs(shown_fft.astype(np.int16) - expected).mean() < 0.05
        assert stats["results_received"] > 0
    finally:
        b.kill()
        for p in (worker, sink):
            p.kill()
            p.communicate()
