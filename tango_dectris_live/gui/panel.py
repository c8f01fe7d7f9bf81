"""``tango-dectris-live-panel DEVICE``: the Taurus live panel of a DectrisLive device.

One window: State, Status and ``acquisition_status``; the commands (Initialize, Start, Listen,
Stop, Abort); the result image chosen from the device's ``result_attributes`` (colour bar, NaN in
magenta, scan positions processed); progress and rates; the live-processing settings.

Everything that changes during a scan comes from the device's change events, through Taurus,
coalesced to at most ``--max-redraw-rate`` redraws per second per widget (see :mod:`.events`), so
that the panel keeps up at the device's full event rate. Taurus would fall back to polling an
attribute without events; the panel listens only to attributes the device pushes, and reads the
settings (which have no events) only when the device's State changes or the user writes one.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import tango
import taurus
from taurus.core.tango.tangovalidator import TangoDeviceNameValidator
from taurus.external.qt import Qt
from taurus.qt.qtgui.application import TaurusApplication
from taurus.qt.qtgui.button import TaurusCommandButton

from .events import DEFAULT_MAX_RATE, AttributeWatcher, CoalescedLabel, EventProgressBar
from .image import ResultImageView
from .settings import LiveSettingsForm

DEVICE_CLASS = "DectrisLive"
COMMANDS = (
    ("Initialize", "Initialize the detector (State INIT, then ON)"),
    ("Start", "Active acquisition: arm, trigger, receive and process one series of nav_shape positions"),
    ("Listen", "Passive: process every series someone else arms, until Stop"),
    ("Stop", "End live processing gracefully: what arrived is processed and published"),
    ("Abort", "Abort the detector and the live processing (pending frames are dropped)"),
)
# Progress rows: attribute, label. All of them push change events.
PROGRESS_ROWS = (
    ("series_id", "Series"),
    ("frames_expected", "Positions expected"),
    ("frames_received", "Frames received"),
    ("frames_processed", "Frames processed"),
    ("frames_missing", "Frames missing"),
    ("receive_rate", "Receive rate"),
    ("process_rate", "Process rate"),
    ("backlog", "Backlog (slots)"),
    ("pipeline_hint", "Bottleneck"),
)


class PanelStartError(RuntimeError):
    """The panel cannot open on the device given; the message says why and what to give instead."""


def resolve_device(name: str) -> str:
    """The full Taurus name (``tango://host:port/a/b/c``) of a running DectrisLive device."""
    validator = TangoDeviceNameValidator()
    full = validator.getNames(name)[0] if validator.isValid(name) else None
    if not full or not full.startswith("tango://") or full.count("/") != 5:
        raise PanelStartError(f"{name!r} is not a Tango device name: give domain/family/member (with TANGO_HOST "
                              f"set) or tango://host:port/domain/family/member")
    try:
        proxy = tango.DeviceProxy(full)
        proxy.ping()
        device_class = proxy.info().dev_class
    except tango.DevFailed as exc:
        raise PanelStartError(f"device {full} does not answer: {exc.args[0].desc.strip()}") from None
    if device_class != DEVICE_CLASS:
        raise PanelStartError(f"{full} is a {device_class} device, not a {DEVICE_CLASS}")
    return full


class LivePanel(Qt.QMainWindow):
    """The live panel of one DectrisLive device (``device``: a full Taurus device name)."""

    def __init__(self, device: str, result: str | None = None, max_rate: float = DEFAULT_MAX_RATE,
                 parent: Qt.QWidget | None = None) -> None:
        super().__init__(parent)
        self.device = device
        self._preferred_result = result
        taurus_device = taurus.Device(device)
        self.proxy: tango.DeviceProxy = taurus_device.getDeviceProxy()
        short_name = taurus_device.getSimpleName()
        self.setWindowTitle(f"{short_name} — DectrisLive live panel")

        self.state = CoalescedLabel(f"{device}/State", max_rate=max_rate, bg_role="value")
        self.state.setMinimumWidth(110)
        self.state.setAlignment(Qt.Qt.AlignCenter)
        self.acquisition_status = CoalescedLabel(f"{device}/acquisition_status", max_rate=max_rate)
        self.acquisition_status.setAlignment(Qt.Qt.AlignLeft | Qt.Qt.AlignVCenter)
        self.commands = {}
        for command, tip in COMMANDS:
            button = TaurusCommandButton(command=command, text=command)
            button.setToolTip(tip)
            button.setMinimumWidth(90)
            button.setModel(device)
            self.commands[command] = button

        self.image = ResultImageView(device, max_rate=max_rate)
        self.progress = EventProgressBar(f"{device}/progress", max_rate=max_rate)
        self.progress_labels = {name: CoalescedLabel(f"{device}/{name}", max_rate=max_rate)
                                for name, _label in PROGRESS_ROWS}
        for label in self.progress_labels.values():
            label.setAlignment(Qt.Qt.AlignRight | Qt.Qt.AlignVCenter)
        self.progress_labels["pipeline_hint"].setAlignment(Qt.Qt.AlignLeft | Qt.Qt.AlignVCenter)
        self.progress_labels["pipeline_hint"].setWordWrap(True)
        self.status = CoalescedLabel(f"{device}/Status", max_rate=max_rate)
        self.status.setAlignment(Qt.Qt.AlignLeft | Qt.Qt.AlignTop)
        self.status.setWordWrap(True)

        self.settings = LiveSettingsForm(self.proxy)
        self.settings.resultsChanged.connect(lambda names: self.image.set_results(names, self._preferred_result))
        # The settings have no change events: read them when the device's State changes.
        self._state_watcher = AttributeWatcher(f"{device}/State", self, max_rate)
        self._state_watcher.valueChanged.connect(lambda *_: self.settings.refresh())

        self.setCentralWidget(self._layout(short_name))
        self.events_info = Qt.QLabel()
        self.statusBar().addPermanentWidget(self.events_info)
        self.image.item.resultArrived.connect(self._count_events)
        self.settings.refresh()
        self.resize(1360, 860)

    def _layout(self, short_name: str) -> Qt.QWidget:
        title = Qt.QLabel(f"<span style='font-size:15pt; font-weight:600'>{short_name}</span>"
                          f"<br><span style='color:#4b5563'>{self._detector_description()}</span>")
        header = Qt.QHBoxLayout()
        header.addWidget(title)
        header.addSpacing(24)
        header.addWidget(_caption("State"))
        header.addWidget(self.state)
        header.addSpacing(12)
        header.addWidget(_caption("Live"))
        header.addWidget(self.acquisition_status, 1)
        buttons = Qt.QHBoxLayout()
        for button in self.commands.values():
            buttons.addWidget(button)
        buttons.addStretch(1)

        progress_box = Qt.QGroupBox("Progress")
        progress_form = Qt.QFormLayout(progress_box)
        progress_form.addRow("Processed", self.progress)
        for name, label in PROGRESS_ROWS:
            progress_form.addRow(label, self.progress_labels[name])
        side = Qt.QVBoxLayout()
        side.addWidget(progress_box)
        side.addWidget(self.settings)
        side.addStretch(1)
        side_widget = Qt.QWidget()
        side_widget.setLayout(side)
        side_widget.setMinimumWidth(380)
        side_widget.setMaximumWidth(460)

        middle = Qt.QHBoxLayout()
        middle.addWidget(self.image, 1)
        middle.addWidget(side_widget)
        status_box = Qt.QGroupBox("Status")
        status_layout = Qt.QVBoxLayout(status_box)
        status_layout.addWidget(self.status)

        central = Qt.QWidget()
        layout = Qt.QVBoxLayout(central)
        layout.addLayout(header)
        layout.addLayout(buttons)
        layout.addLayout(middle, 1)
        layout.addWidget(status_box)
        return central

    def _detector_description(self) -> str:
        """The detector's own description (static: read once)."""
        try:
            return f"DectrisLive · {self.proxy.read_attribute('description').value}"
        except tango.DevFailed:
            return "DectrisLive · detector not connected"

    def _count_events(self, *_ignored: object) -> None:
        events = self.image.item.events
        self.events_info.setText(f"{self.image.result_name()}: {events.received} events received, "
                                 f"{self.image.draws} drawn")

    def closeEvent(self, event: Qt.QCloseEvent) -> None:
        """Detach every Taurus component: their event subscriptions end with the window."""
        for component in self.event_sources():
            component.setModel("")
        super().closeEvent(event)

    def event_sources(self) -> list[Any]:
        """Every Taurus component of the panel that listens to the device."""
        return [self.state, self.acquisition_status, self.progress.watcher, self.status, self._state_watcher,
                *self.progress_labels.values(), *self.commands.values(), *self.image.event_sources()]


def _caption(text: str) -> Qt.QLabel:
    label = Qt.QLabel(text)
    label.setStyleSheet("QLabel { color: #4b5563; }")
    return label


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tango-dectris-live-panel",
        description="Taurus live panel of a DectrisLive device: result images, progress, State/Status, "
                    "live-processing settings and commands, all updated from the device's change events.")
    parser.add_argument("device", help="the device: domain/family/member (through TANGO_HOST) or "
                                       "tango://host:port/domain/family/member")
    parser.add_argument("--result", help="result attribute to show first (default: the first result of the "
                                         "analyses the device runs)")
    parser.add_argument("--max-redraw-rate", type=float, default=DEFAULT_MAX_RATE, metavar="PER_SECOND",
                        help="most redraws per second of each widget (default %(default)g); the newest value "
                             "is drawn, whatever the device's event rate")
    args = parser.parse_args(argv)
    if not args.max_redraw_rate > 0:
        parser.error(f"--max-redraw-rate must be > 0, got {args.max_redraw_rate}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        device = resolve_device(args.device)
    except PanelStartError as exc:
        print(f"tango-dectris-live-panel: {exc}", file=sys.stderr)
        return 2
    app = TaurusApplication([sys.argv[0]], cmd_line_parser=None, app_name="tango-dectris-live-panel",
                            org_name="tango-dectris-live")
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl+C in the terminal closes the panel
    panel = LivePanel(device, result=args.result, max_rate=args.max_redraw_rate)
    panel.show()
    return app.exec_()


if __name__ == "__main__":
    sys.exit(main())
