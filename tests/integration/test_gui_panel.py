"""The Taurus live panel (``tango-dectris-live-panel``) and the stock Taurus commands, on a live
DectrisLive device, on a virtual X screen.

Xvfb runs the screen; the simulator, an embedded Tango database and the server run as a user
would start them, and the panel finds the device through TANGO_HOST. The panel runs in this process
(so that the test reads what its image widget holds); the entry point and the stock ``taurus``
commands run as subprocesses. The first tests check the panel's Qt-free rules without a screen.

Xvfb is started with ``-terminate``: it ends when its last client disconnects. This process's Qt
connection is one of them and lives until the process ends (a QApplication cannot be torn down
safely, and Qt aborts when its X server goes away), so Xvfb ends with the test process. A second
client (``xprop -spy``) holds the screen while the probes and subprocesses come and go, and is
stopped with the module.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tango
from tango import DevState

from sim.server import SimulatorServer
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase, stop_process
from tango_dectris_live.gui.coalesce import LatestEvents
from tango_dectris_live.gui.settings_text import (
    SettingTextError,
    format_setting,
    parse_setting,
    results_of,
)
from tango_dectris_live.testing import EventRecorder, wait_for
from tango_dectris_live.testing.xvfb import start_xvfb

from .live_reference import simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Screenshots go to the docs only when asked (TANGO_DECTRIS_LIVE_SCREENSHOTS=docs/images): a test run
# leaves the working tree as it was
DOCS_IMAGES = Path(os.environ.get("TANGO_DECTRIS_LIVE_SCREENSHOTS") or tempfile.mkdtemp(prefix="taurus-shots-"))
BIN = Path(sys.executable).parent
DEVICE = "test/dectris/panel"
NAV = (6, 8)
COUNT = int(np.prod(NAV))
TIMEOUT = 90.0
ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"))  # ARINA binned: 96 x 96 uint16
SCREEN = "1600x1000x24"


# ---- the Qt-free rules ------------------------------------------------------------------------------

def test_latest_events_keep_the_newest_of_each_kind_at_a_bounded_rate():
    now = [100.0]
    events = LatestEvents(0.1, clock=lambda: now[0])
    assert events.put("change", 1) is True  # the first after a delivery: schedule one
    assert events.put("change", 2) is False  # one is pending: replaced, no second wake-up
    assert events.put("error", "e") is False
    assert events.put("change", 3) is False
    assert events.delay() == 0.0  # never delivered: at once
    assert events.take() == ["e", 3]  # the newest of each kind, in the order the newest came
    assert events.put("change", 4) is True
    now[0] += 0.04
    assert events.delay() == pytest.approx(0.06)  # not before 0.1 s after the last delivery
    now[0] += 0.2
    assert events.delay() == 0.0
    assert events.take() == [4]
    assert (events.received, events.delivered, events.deliveries) == (5, 3, 2)
    with pytest.raises(ValueError, match=">= 0 seconds"):
        LatestEvents(-1.0)


def test_setting_texts():
    assert format_setting("integers", [6, 8]) == "6 × 8"
    assert format_setting("integers", []) == ""
    assert format_setting("names", ["sum", "bf"]) == "sum, bf"
    assert format_setting("numbers", [95.5, 97.0]) == "95.5, 97"
    assert format_setting("number", 12.0) == "12"
    for text in ("6 × 8", "6x8", "6, 8", " 6 8 "):
        assert parse_setting("integers", text) == [6, 8], text
    assert parse_setting("integers", "") == []  # empty: from the detector
    assert parse_setting("names", "sum, bf adf") == ["sum", "bf", "adf"]
    assert parse_setting("numbers", "95.5, 97") == [95.5, 97.0]
    assert parse_setting("number", " 4.5 ") == 4.5
    with pytest.raises(SettingTextError, match="whole numbers like '6 × 8'"):
        parse_setting("integers", "6 × 8.5")
    with pytest.raises(SettingTextError, match="a finite number"):
        parse_setting("number", "nan")
    with pytest.raises(SettingTextError, match="a number is expected"):
        parse_setting("number", "")


def test_results_of_the_selected_analyses_from_the_device_listing():
    listing = ["sum: sum_image", "com: com_x_image, com_y_image", "bf: bf_image"]
    assert results_of(["com", "sum"], listing) == ["com_x_image", "com_y_image", "sum_image"]
    assert results_of(["unknown"], listing) == []


# ---- the screen, the device, the Qt application ---------------------------------------------------

@dataclass(frozen=True)
class Screen:
    display: str
    keeper: subprocess.Popen


def _qt_xcb_problem(display: str) -> str | None:
    """Why Qt cannot open a window on ``display`` (None: it can): a probe in a subprocess."""
    code = ("from PyQt5.QtWidgets import QApplication; "
            "app = QApplication(['probe', '-platform', 'xcb']); print(app.platformName())")
    probe = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DISPLAY=display), check=False,
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 0:
        return None
    from PyQt5.QtCore import QLibraryInfo

    plugin = Path(QLibraryInfo.location(QLibraryInfo.PluginsPath)) / "platforms" / "libqxcb.so"
    missing = sorted(set(re.findall(r"(\S+) => not found", subprocess.run(
        ["ldd", str(plugin)], check=False, capture_output=True, text=True).stdout)))
    return (f"Qt's xcb platform does not start (missing: {', '.join(missing) or 'see its output'}; Debian: "
            f"libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0, tools/debian-packages/gui.txt): "
            f"{probe.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def screen() -> Iterator[Screen]:
    xvfb, xprop = shutil.which("Xvfb"), shutil.which("xprop")
    if xvfb is None or xprop is None or shutil.which("xwininfo") is None:
        pytest.skip("the GUI tests need Xvfb (Debian xvfb) and xprop/xwininfo (Debian x11-utils): "
                    "tools/debian-packages/gui.txt")
    pytest.importorskip("taurus_pyqtgraph", reason="the gui extra (taurus, taurus_pyqtgraph, PyQt5) is missing")
    display, _ = start_xvfb(SCREEN, terminate=True)
    keeper = subprocess.Popen([xprop, "-display", display, "-root", "-spy"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        # xprop prints the root window's properties once connected: from then on it holds the screen
        ready, _, _ = select.select([keeper.stdout], [], [], 30)
        assert ready and keeper.stdout.readline(), f"xprop could not connect to {display}"
        problem = _qt_xcb_problem(display)
        if problem:
            pytest.skip(problem)
        yield Screen(display, keeper)
    finally:
        stop_process(keeper)


@dataclass(frozen=True)
class Live:
    sim: SimulatorServer
    tango_host: str
    proxy: tango.DeviceProxy


def configure_simulator(sim: SimulatorServer, **settings) -> None:
    requests.put(f"{sim.rest_url}/sim/api/config", json=settings, timeout=30).raise_for_status()


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The simulator (ARINA, binned 96 × 96, initialised, ints) and DectrisLive in a server
    registered in an embedded Tango database, started with its entry point."""
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        rest = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), *ARINA96):
            requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        configure_simulator(sim, pacing="max", nav_shape=list(NAV))
        with EmbeddedTangoDatabase() as db:
            db.register_device("panel", DEVICE, {
                "DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1})
            db.start_server("panel", DEVICE)
            proxy = tango.DeviceProxy(f"tango://{db.tango_host}/{DEVICE}")
            wait_for(lambda: proxy.state() == DevState.ON, 60, lambda: f"State ON ({proxy.status()})")
            proxy.analyses = ["sum", "sumsig"]
            proxy.nav_shape = list(NAV)
            yield Live(sim, db.tango_host, proxy)


@pytest.fixture(scope="module")
def qt_app(screen, live):
    """This process's TaurusApplication on the Xvfb screen, with TANGO_HOST the embedded database."""
    import taurus
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.application import TaurusApplication

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TANGO_HOST", live.tango_host)
        patch.setenv("DISPLAY", screen.display)
        patch.setenv("QT_QPA_PLATFORM", "xcb")
        app = Qt.QApplication.instance() or TaurusApplication([sys.argv[0]], cmd_line_parser=None)
        factory = taurus.Factory("tango")
        if factory.get_default_tango_host() != live.tango_host:
            factory.set_default_tango_host(live.tango_host)  # a factory made earlier read another TANGO_HOST
        yield app


def wait_gui(app, condition: Callable[[], object], timeout: float, what: str | Callable[[], str]) -> float:
    """Run the Qt event loop until ``condition()`` holds (TimeoutError naming ``what`` after
    ``timeout`` s). Returns the longest the loop was late for a 20 ms timer meanwhile: how long the
    panel was unable to answer a click."""
    from taurus.external.qt import Qt

    deadline = time.monotonic() + timeout
    worst = 0.0
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        loop = Qt.QEventLoop()
        Qt.QTimer.singleShot(20, loop.quit)
        started = time.perf_counter()
        loop.exec_()
        worst = max(worst, time.perf_counter() - started - 0.020)
    return worst


@pytest.fixture
def panel(qt_app, live):
    from tango_dectris_live.gui.panel import LivePanel, resolve_device

    window = LivePanel(resolve_device(DEVICE))  # the short name, through TANGO_HOST
    window.opened_at = time.monotonic()
    window.show()
    wait_gui(qt_app, lambda: window.image.result_name(), 30, "the panel's list of results")
    yield window
    window.close()
    window.deleteLater()
    wait_gui(qt_app, lambda: True, 1, "")


def show_result(app, window, name: str) -> None:
    window.image.selector.setCurrentText(name)
    wait_gui(app, lambda: window.image.shown is not None and window.image.shown.name == name, 30,
             f"{name} shown")


def start_from_the_panel(app, window, proxy: tango.DeviceProxy, result: str,
                         meanwhile: Callable[[], None] = lambda: None) -> float:
    """Click Start; wait for the device's data-ready event of ``result`` (its final value is then
    published), calling ``meanwhile`` at each turn. Returns wait_gui's worst lateness."""
    assert proxy.state() == DevState.ON, proxy.status()  # else Start is refused, in a modal message box

    with EventRecorder(proxy, data_ready=(result,)) as log:
        window.commands["Start"].click()
        return wait_gui(app, lambda: meanwhile() or log.data_ready(result), TIMEOUT,
                        lambda: f"the final {result} ({proxy.status()})")


def assert_events_only(window) -> None:
    """Every attribute the panel listens to is subscribed to change events, and Taurus polls none."""
    import taurus
    from taurus.core.tango import TangoAttribute

    models = [source.getModelObj() for source in window.event_sources()]
    attributes = [model for model in models if isinstance(model, TangoAttribute)]
    assert len(attributes) == len(models) - len(window.commands)  # the command buttons' model is the device
    assert [a.getSimpleName() for a in attributes if not a.isUsingEvents()] == []
    polled = [name for name, attr in taurus.Factory("tango").getExistingAttributes().items()
              if attr.isPollingActive()]
    assert polled == [], f"Taurus polls {polled}"


# ---- the panel ----------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_the_panel_shows_the_final_result_of_an_acquisition_started_from_its_button(qt_app, live, panel):
    configure_simulator(live.sim, pacing="max", nav_shape=list(NAV), faults=[])
    live.proxy.nav_shape = list(NAV)
    show_result(qt_app, panel, "sum_image")
    start_from_the_panel(qt_app, panel, live.proxy, "sum_image")
    final = live.proxy.sum_image
    wait_gui(qt_app, lambda: panel.image.shown.quality == "ATTR_VALID"
             and np.array_equal(panel.image.item.image, final), 30,
             lambda: f"the panel's sum_image to be the final one (shown: {panel.image.shown.quality})")
    np.testing.assert_array_equal(panel.image.item.image, final)
    truth = simulator_ground_truth(live.sim, NAV)
    np.testing.assert_array_equal(final, truth.sum_frames(range(COUNT)))
    wait_gui(qt_app, lambda: panel.progress_labels["frames_processed"].text() == str(COUNT), 30,
             "the frames processed label")
    assert panel.progress.text() == "100.0 %"
    assert_events_only(panel)


@pytest.mark.timeout(180)
def test_missing_frames_are_marked_and_redraws_are_coalesced_at_the_full_event_rate(qt_app, live, panel, capsys):
    from tango_dectris_live.gui.image import NAN_RGBA

    nav, dropped = (40, 50), [5, 77, 1500]
    proxy = live.proxy
    configure_simulator(live.sim, pacing="frame_time", nav_shape=list(nav),
                        faults=[{"kind": "drop", "frames": dropped}])
    proxy.frame_time = 0.002  # 2000 frames in 4 s: many intermediate results
    proxy.count_time = 0.0018
    proxy.frame_stack_size = 8
    proxy.result_event_rate = 100.0  # the device's most
    proxy.nav_shape = list(nav)
    max_rate = 1.0 / panel.image.item.events.min_interval
    DOCS_IMAGES.mkdir(exist_ok=True)
    live_shots: list[int] = []
    live_views: list[bool] = []  # per live result seen with pending (NaN) positions: were they marked?

    def grab_a_live_view() -> None:
        """Note how pending positions are drawn while the series runs; once, half-way through,
        save the panel for the docs."""
        shown = panel.image.shown
        if shown is not None and shown.quality == "ATTR_CHANGING" and shown.data is not None \
                and np.isnan(shown.data).any():
            live_views.append(panel.image.nan_mark.image is not None)
        if not live_shots and shown is not None and shown.quality == "ATTR_CHANGING" and shown.data is not None \
                and 0.3 < np.isnan(shown.data).mean() < 0.6:
            live_shots.append(panel.image.draws)
            panel.grab().save(str(DOCS_IMAGES / "taurus-panel-live.png"))

    try:
        show_result(qt_app, panel, "sumsig_image")
        worst = start_from_the_panel(qt_app, panel, proxy, "sumsig_image", grab_a_live_view)
        final = proxy.sumsig_image
        wait_gui(qt_app, lambda: panel.image.shown.quality == "ATTR_WARNING"
                 and np.array_equal(panel.image.item.image, final, equal_nan=True), 30,
                 lambda: f"the panel's final sumsig_image (shown: {panel.image.shown.quality})")
    finally:
        configure_simulator(live.sim, pacing="max", nav_shape=list(NAV), faults=[])
        proxy.frame_stack_size = 0
        proxy.result_event_rate = 10.0
        proxy.nav_shape = list(NAV)
    np.testing.assert_array_equal(panel.image.item.image, final)  # NaN where NaN
    expected_nan = np.zeros(nav, dtype=bool)
    expected_nan[np.unravel_index(dropped, nav)] = True
    assert np.array_equal(np.isnan(final), expected_nan)
    marked = np.all(panel.image.nan_mark.image == NAN_RGBA, axis=-1)
    assert np.array_equal(marked, expected_nan) and panel.image.nan_mark.isVisible()
    assert f"{len(dropped)} missing" in panel.image.positions.text()
    assert live_views and not any(live_views)  # pending positions are left blank, not marked missing
    # Coalescing: deliveries at least 1/max_rate apart, whatever the device's event rate.
    events = panel.image.item.events
    assert events.deliveries <= (time.monotonic() - panel.opened_at) * max_rate + 1
    assert_events_only(panel)
    processed = proxy.frames_processed
    wait_gui(qt_app, lambda: f"<b>{processed:,}</b> / {nav[0] * nav[1]:,}" in panel.image.positions.text()
             and panel.progress.text() == f"{proxy.progress:.1f} %"
             and panel.progress_labels["backlog"].text() == str(proxy.backlog), 30, "the final counts drawn")
    assert panel.grab().save(str(DOCS_IMAGES / "taurus-panel.png"))
    with capsys.disabled():
        print(f"\n[gui] sumsig_image at result_event_rate 100: {events.received} events received, "
              f"{events.deliveries} redraws; the Qt loop was at most {worst * 1000:.0f} ms late")


def test_a_setting_written_in_the_panel_reaches_the_device_and_a_refusal_is_shown(qt_app, live, panel):
    field = panel.settings.fields["nav_shape"]
    field.setText("4 × 6")
    field.returnPressed.emit()
    assert list(live.proxy.nav_shape) == [4, 6]
    assert field.text() == "4 × 6"  # read back from the device
    field = panel.settings.fields["bf_radius"]
    before = live.proxy.bf_radius
    field.setText("-3")
    field.returnPressed.emit()
    assert "BF radius refused: bf_radius must be a finite radius >= 0" in panel.settings.message.text()
    assert live.proxy.bf_radius == before and field.text() == format_setting("number", before)
    live.proxy.nav_shape = list(NAV)


def test_the_panel_refuses_what_is_not_a_running_dectrislive_device(live, monkeypatch, capsys):
    from tango_dectris_live.gui.panel import main

    monkeypatch.setenv("TANGO_HOST", live.tango_host)
    assert main(["no/such/device"]) == 2
    assert "does not answer" in capsys.readouterr().err
    assert main([f"tango://{live.tango_host}/sys/database/2"]) == 2
    assert "is a DataBase device, not a DectrisLive" in capsys.readouterr().err


# ---- subprocesses on the screen: the entry point and the stock taurus commands --------------------------

@dataclass(frozen=True)
class Window:
    id: str
    name: str
    width: int
    height: int


_CHILD = re.compile(r'^\s*(0x[0-9a-f]+) (?:"(.*)"|\(has no name\)):.*?(\d+)x(\d+)[+-]\d+[+-]\d+', re.MULTILINE)


def windows_of(display: str, pid: int) -> list[Window]:
    """The top-level windows that process ``pid`` shows on ``display``, largest first; not Qt's
    helper windows (1 × 1, and the 3 × 3 "Qt Selection Owner")."""
    env = dict(os.environ, DISPLAY=display)
    tree = subprocess.run(["xwininfo", "-root", "-children"], check=True, capture_output=True, text=True,
                          env=env).stdout
    found = []
    for window_id, name, width, height in _CHILD.findall(tree):
        if int(width) < 32 or int(height) < 32:
            continue
        owner = subprocess.run(["xprop", "-id", window_id, "_NET_WM_PID"], check=False, capture_output=True,
                               text=True, env=env)  # a window gone meanwhile: no owner
        if owner.stdout.strip().endswith(f"= {pid}"):
            found.append(Window(window_id, name, int(width), int(height)))
    return sorted(found, key=lambda window: -window.width * window.height)


def seen_by_the_device(proxy: tango.DeviceProxy, pid: int) -> bool:
    """Whether the device's black box has a request of the client process ``pid``."""
    return any(f"PID {pid})" in line for line in proxy.black_box(50))


def grab_settled(app, screen_: Screen, pid: int, path: Path, settle: bool = True) -> None:
    """Save the area of process ``pid``'s window once it is drawn: many colours, and (``settle``)
    two grabs 0.3 s apart equal, size included (its values filled in, its layout grown; a trend
    scrolls, it never settles)."""
    from taurus.external.qt import Qt

    if app.platformName() != "xcb":
        return  # a QApplication made before this module, elsewhere: no view of this screen
    screen = app.primaryScreen()
    grabs: list[Qt.QImage] = []

    def settled() -> bool:
        window = windows_of(screen_.display, pid)[0]  # no window manager: at 0, 0
        image = screen.grabWindow(0, 0, 0, window.width, window.height).toImage()
        grabs.append(image)
        drawn = len(np.unique(_pixels(image))) > 8  # more than a background and a frame
        return drawn and (not settle or (len(grabs) > 1 and image == grabs[-2]))

    wait_for(settled, 20, f"the window of {pid} drawn", interval=0.3)
    assert grabs[-1].save(str(path))


def _pixels(image) -> np.ndarray:
    """A QImage's pixels as 32-bit RGB values (rows, columns)."""
    from taurus.external.qt import Qt

    image = image.convertToFormat(Qt.QImage.Format_RGB32)
    bits = image.constBits()
    bits.setsize(image.sizeInBytes())
    rows = np.frombuffer(bits, dtype=np.uint8).reshape(image.height(), image.bytesPerLine())
    return rows[:, : image.width() * 4].copy().view(np.uint32)


def user_env(display: str, live: Live) -> dict[str, str]:
    env = dict(os.environ, DISPLAY=display, TANGO_HOST=live.tango_host, QT_QPA_PLATFORM="xcb")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def start_on_screen(args: list[str], screen: Screen, live: Live, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=user_env(screen.display, live), stdout=out, stderr=subprocess.STDOUT)


def opened(proc: subprocess.Popen, screen: Screen, live: Live, log: Path, title: str | None = None) -> Window:
    """The process's window, once it shows one (titled ``title``, when given: a Taurus window gets
    its title only once it has connected) and the device saw its requests."""
    def ready() -> Window | None:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
        windows = [w for w in windows_of(screen.display, proc.pid) if title is None or w.name == title]
        return windows[0] if windows and seen_by_the_device(live.proxy, proc.pid) else None
    return wait_for(ready, 60, lambda: f"a window of {proc.args} ({log.read_text(errors='replace')[-2000:]})",
                    interval=0.2)


@pytest.mark.timeout(120)
def test_the_entry_point_opens_the_panel_on_a_device_named_through_tango_host(screen, live, tmp_path):
    log = tmp_path / "panel.log"
    proc = start_on_screen([str(BIN / "tango-dectris-live-panel"), DEVICE], screen, live, log)
    try:
        window = opened(proc, screen, live, log)
        assert window.name == f"{DEVICE} — DectrisLive live panel"
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        stop_process(proc)


# The stock commands that work on the device: each opens its window, talks to the device, stays up
# and prints no traceback (docs/taurus.md lists them): arguments, window title, screenshot.
STOCK = {
    "form": (["form", DEVICE], "TaurusForm", None),
    "form-attributes": (["form", *(f"{DEVICE}/{name}" for name in (
        "analyses", "nav_shape", "progress", "frames_missing", "acquisition_status", "State"))], "TaurusForm", None),
    "device": (["device", DEVICE], DEVICE.upper(), "taurus-device.png"),
    "trend": (["trend", f"{DEVICE}/progress", f"{DEVICE}/receive_rate"], "TaurusTrend", "taurus-trend.png"),
}
SLOW_NAV = (40, 50)  # paced at 1 ms: a 2 s series that a trend draws as it runs


def paced_acquisition(live: Live) -> None:
    """A series paced at the frame time, so that progress and rates change for a while."""
    from tango_dectris_live.testing import acquire

    configure_simulator(live.sim, pacing="frame_time", nav_shape=list(SLOW_NAV), faults=[])
    live.proxy.nav_shape = list(SLOW_NAV)
    live.proxy.frame_time = 0.001
    live.proxy.count_time = 0.0009
    try:
        acquire(live.proxy, TIMEOUT)
    finally:
        configure_simulator(live.sim, pacing="max", nav_shape=list(NAV), faults=[])
        live.proxy.nav_shape = list(NAV)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(STOCK))
def test_a_stock_taurus_command_opens_on_the_device(qt_app, screen, live, tmp_path, name):
    args, title, screenshot = STOCK[name]
    log = tmp_path / f"taurus-{name}.log"
    proc = start_on_screen([str(BIN / "taurus"), *args], screen, live, log)
    try:
        assert opened(proc, screen, live, log, title).name == title
        if name == "trend":
            paced_acquisition(live)
        if screenshot:
            grab_settled(qt_app, screen, proc.pid, DOCS_IMAGES / screenshot, settle=name != "trend")
        assert proc.poll() is None
        output = log.read_text(errors="replace")
        assert "Traceback" not in output and "CRITICAL" not in output, output
    finally:
        stop_process(proc)


@pytest.mark.timeout(120)
def test_taurus_image_is_not_available_with_the_gui_extra(screen, live, tmp_path):
    """``taurus image`` has one implementation, plotpy's, which the gui extra does not install
    (taurus_pyqtgraph registers none): it exits with an error. The "Show" button of an image row
    in ``taurus form``/``taurus device`` opens the same plotpy dialog."""
    import importlib

    with pytest.raises(ImportError, match="plotpy"):
        importlib.import_module("taurus.qt.qtgui.extra_plotpy")
    log = tmp_path / "taurus-image.log"
    proc = start_on_screen([str(BIN / "taurus"), "image", f"{DEVICE}/sum_image"], screen, live, log)
    try:
        returncode = proc.wait(60)
    finally:
        stop_process(proc)
    assert returncode != 0
    assert "Cannot load plotpy" in log.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_taurus_trend_cannot_draw_a_result_image(screen, live, tmp_path):
    """A trend takes scalars (or spectra): on an IMAGE result it warns on every value."""
    from tango_dectris_live.testing import acquire

    acquire(live.proxy, TIMEOUT, result="sumsig_image")  # so that the result has a value
    log = tmp_path / "taurus-trend-image.log"
    proc = start_on_screen([str(BIN / "taurus"), "trend", f"{DEVICE}/sumsig_image"], screen, live, log)
    try:
        wait_for(lambda: "Problem updating buffer" in log.read_text(errors="replace"), 60,
                 lambda: f"the trend's warning ({log.read_text(errors='replace')[-1000:]})")
    finally:
        stop_process(proc)
