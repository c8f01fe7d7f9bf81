"""The result image of the panel: one result attribute, a colour bar, NaN marked, the scan count.

:class:`ResultImageItem` is taurus_pyqtgraph's :class:`TaurusImageItem` (subscribed to the
attribute's change events by Taurus) with the coalescing of :mod:`.events`: it hands the newest
result to :class:`ResultImageView` at most ``max_rate`` times per second, which draws it. The
array drawn is the one the event carried (float64, NaN where the device had no frame), so what the
widget holds (``view.item.image``) can be compared with the device's attribute exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from taurus.core.taurusbasetypes import TaurusEventType
from taurus.external.qt import Qt
from taurus_pyqtgraph import TaurusImageItem

from .events import DEFAULT_MAX_RATE, AttributeWatcher, CoalescedEvents, plain_value

NAN_RGBA = (255, 0, 255, 255)  # magenta: in none of the colour maps offered, so a gap cannot pass for data
NAN_HTML = "#ff00ff"
COLOUR_MAPS = ("viridis", "inferno", "CET-L1", "CET-D1")  # CET-L1: grey; CET-D1: diverging, for com_x/com_y
# Colour levels: "robust" leaves out the brightest and darkest 0.5 % (a few hot or masked pixels
# would otherwise squeeze the rest of the image into one colour); "full" spans min..max.
LEVEL_MODES = {"0.5–99.5 %": (0.5, 99.5), "min–max": None}
_PERCENTILE_SAMPLES = 200_000  # percentiles from at most this many pixels: cheap enough at 10 draws/s

# How each quality of a result reads to a user, and its badge colour.
QUALITY_BADGES = {
    "ATTR_CHANGING": ("live", "#2563eb"),
    "ATTR_VALID": ("final", "#15803d"),
    "ATTR_WARNING": ("final, frames missing", "#c2410c"),
    "ATTR_ALARM": ("alarm", "#b91c1c"),
    "ATTR_INVALID": ("no result yet", "#6b7280"),
    "error": ("error", "#b91c1c"),
}


@dataclass(frozen=True)
class ResultValue:
    """One result as it arrived: ``data`` None when the device has none yet (INVALID quality)."""

    name: str
    data: np.ndarray | None
    quality: str  # the Tango quality's name, e.g. "ATTR_CHANGING"
    timestamp: float


class ResultImageItem(CoalescedEvents, TaurusImageItem):
    """TaurusImageItem whose events reach the Qt thread as the newest one, ``max_rate`` per second."""

    resultArrived = Qt.pyqtSignal(object)  # ResultValue
    failed = Qt.pyqtSignal(str)

    def __init__(self, max_rate: float = DEFAULT_MAX_RATE) -> None:
        TaurusImageItem.__init__(self, axisOrder="row-major")
        self._init_coalescing(max_rate)

    def handleEvent(self, evt_src: Any, evt_type: Any, evt_value: Any) -> None:
        """Replaces TaurusImageItem.handleEvent: the view draws (levels, NaN mark, caption)."""
        if evt_src is not self.getModelObj():
            return  # a late event of the result shown before
        if evt_type == TaurusEventType.Error:
            self.failed.emit(getattr(getattr(evt_value, "args", [None])[0], "desc", str(evt_value)))
            return
        if evt_type not in (TaurusEventType.Change, TaurusEventType.Periodic) or evt_value is None:
            return
        raw = plain_value(evt_value.rvalue)
        data = None if raw is None or np.size(raw) == 0 else np.asarray(raw, dtype=np.float64)
        stamp = evt_value.time.totime() if evt_value.time is not None else time.time()
        quality = getattr(evt_value.quality, "name", str(evt_value.quality))
        self.resultArrived.emit(ResultValue(evt_src.getSimpleName(), data, quality, stamp))


class ResultImageView(Qt.QWidget):
    """A result attribute chosen from a list, drawn with a colour bar; NaN in magenta; below it
    the quality, the value range and the scan positions processed of those expected."""

    def __init__(self, device: str, parent: Qt.QWidget | None = None, max_rate: float = DEFAULT_MAX_RATE) -> None:
        super().__init__(parent)
        self.device = device
        self.draws = 0
        self.shown: ResultValue | None = None

        self.selector = Qt.QComboBox()
        self.selector.setMinimumContentsLength(16)
        self.selector.setToolTip("Result attributes of the analyses the device runs (its 'analyses' setting)")
        self.selector.currentTextChanged.connect(self._select)
        self.colour_map = Qt.QComboBox()
        self.colour_map.addItems(COLOUR_MAPS)
        self.colour_map.currentTextChanged.connect(lambda name: self.colour_bar.setColorMap(name))
        top = Qt.QHBoxLayout()
        top.addWidget(_bold("Result"))
        top.addWidget(self.selector)
        top.addStretch(1)
        top.addWidget(Qt.QLabel("Colours"))
        top.addWidget(self.colour_map)
        self.level_mode = Qt.QComboBox()
        self.level_mode.addItems(LEVEL_MODES)
        self.level_mode.setToolTip("Colour range: without the 0.5 % extremes (hot pixels), or the full range")
        self.level_mode.currentTextChanged.connect(lambda _mode: self.shown is not None and self._draw(self.shown))
        top.addWidget(Qt.QLabel("Levels"))
        top.addWidget(self.level_mode)

        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("#1f2430")
        self.plot = self.graphics.addPlot()
        self.plot.setAspectLocked(True)
        self.plot.invertY(True)  # row 0 at the top, as the scan runs
        self.plot.setLabel("bottom", "column")
        self.plot.setLabel("left", "row")
        self.plot.setMenuEnabled(False)
        self.item = ResultImageItem(max_rate)
        self.nan_mark = pg.ImageItem(axisOrder="row-major")
        self.nan_mark.setZValue(self.item.zValue() + 1)
        self.plot.addItem(self.item)
        self.plot.addItem(self.nan_mark)
        self.colour_bar = pg.ColorBarItem(colorMap=COLOUR_MAPS[0], interactive=False, width=16)
        self.colour_bar.setImageItem(self.item, insert_in=self.plot)
        self.item.resultArrived.connect(self._draw)
        self.item.failed.connect(self._failed)

        self.badge = Qt.QLabel()
        self.badge.setAlignment(Qt.Qt.AlignCenter)
        widest = max(self.badge.fontMetrics().horizontalAdvance(text) for text, _ in QUALITY_BADGES.values())
        self.badge.setFixedWidth(widest + 32)
        self.caption = Qt.QLabel()
        self.positions = Qt.QLabel()
        self.positions.setToolTip("scan positions processed / expected; missing: positions without a frame "
                                  "(NaN in the scan-shaped results)")
        legend = Qt.QLabel(f'<span style="color:{NAN_HTML}">&#9632;</span> missing frame')
        legend.setToolTip("In a final result, scan positions whose frame never arrived are NaN and drawn in magenta; "
                          "while a series runs, positions not processed yet are NaN and left blank")
        bottom = Qt.QHBoxLayout()
        bottom.addWidget(self.badge)
        bottom.addWidget(self.caption, 1)
        bottom.addWidget(self.positions)
        bottom.addSpacing(12)
        bottom.addWidget(legend)

        layout = Qt.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.graphics, 1)
        layout.addLayout(bottom)

        self._counts = {name: AttributeWatcher(f"{device}/{name}", self, max_rate)
                        for name in ("frames_processed", "frames_expected", "frames_missing")}
        for watcher in self._counts.values():
            watcher.valueChanged.connect(self._show_positions)
        self._set_badge("ATTR_INVALID")
        self._show_positions()

    # -- which result -------------------------------------------------------------------------

    def set_results(self, names: list[str], preferred: str | None = None) -> None:
        """Offer ``names``; keep the one shown if it is still offered, else ``preferred`` or the first."""
        current = self.selector.currentText()
        if names == [self.selector.itemText(i) for i in range(self.selector.count())]:
            return
        choice = next((name for name in (current, preferred) if name in names), names[0] if names else "")
        self.selector.blockSignals(True)
        self.selector.clear()
        self.selector.addItems(names)
        self.selector.setCurrentText(choice)
        self.selector.blockSignals(False)
        if choice != current or not choice:
            self._select(choice)

    def result_name(self) -> str:
        return self.selector.currentText()

    def _select(self, name: str) -> None:
        self.shown = None
        self.item.clear()
        self.nan_mark.clear()
        self._set_badge("ATTR_INVALID")
        self.caption.setText(f"waiting for {name}" if name else "no result attribute offered")
        self.item.setModel(f"{self.device}/{name}" if name else "")

    # -- drawing --------------------------------------------------------------------------------

    def _draw(self, value: ResultValue) -> None:
        self.shown = value
        self._set_badge(value.quality)
        if value.data is None:
            self.item.clear()
            self.nan_mark.clear()
            self.caption.setText(f"{value.name}: no result yet (published once a series is processed)")
            return
        data = value.data
        nan = np.isnan(data)
        finite = data[np.isfinite(data)]
        low, high = colour_levels(finite, LEVEL_MODES[self.level_mode.currentText()])
        self.item.setImage(data, autoLevels=False, levels=(low, high))
        self.colour_bar.setLevels((low, high), update_items=False)
        # While a series runs, NaN is a position not processed yet: left blank (the background).
        # In the final result it is a position whose frame never came: marked.
        final = value.quality != "ATTR_CHANGING"
        nan_count = int(nan.sum())
        if final and nan_count:
            mark = np.zeros(data.shape + (4,), dtype=np.uint8)
            mark[nan] = NAN_RGBA
            self.nan_mark.setImage(mark, autoLevels=False, levels=(0, 255))
            self.nan_mark.show()
        else:
            self.nan_mark.clear()
        rows, columns = data.shape
        stamp = time.strftime("%H:%M:%S", time.localtime(value.timestamp))
        if not nan_count:
            nan_text = ""
        elif final:
            nan_text = f" · <b style='color:{NAN_HTML}'>{nan_count:,} NaN</b>"
        else:
            nan_text = f" · {nan_count:,} pending"
        value_range = f"{_number(finite.min())} … {_number(finite.max())}" if finite.size else "no finite value"
        self.caption.setText(f"{value.name} · {rows} × {columns} · {value_range}{nan_text} · {stamp}")
        self.draws += 1

    def _failed(self, message: str) -> None:
        self._set_badge("error")
        self.caption.setText(f"cannot read the result: {message}")

    def _set_badge(self, quality: str) -> None:
        text, colour = QUALITY_BADGES.get(quality, (quality, "#6b7280"))
        self.badge.setText(text)
        self.badge.setStyleSheet(f"QLabel {{ background: {colour}; color: white; border-radius: 4px; "
                                 f"padding: 2px 8px; font-weight: bold; }}")

    def _show_positions(self, *_ignored: object) -> None:
        def count(name: str) -> str:
            value = self._counts[name].value
            return "—" if value is None else f"{int(value):,}"
        missing = self._counts["frames_missing"].value
        text = f"scan positions <b>{count('frames_processed')}</b> / {count('frames_expected')}"
        if missing:
            text += f" · <b style='color:{NAN_HTML}'>{int(missing):,} missing</b>"
        self.positions.setText(text)

    def event_sources(self) -> list[Any]:
        """The Taurus components of this view that listen to the device (to check they use events)."""
        return [self.item, *self._counts.values()]


def colour_levels(finite: np.ndarray, percentiles: tuple[float, float] | None) -> tuple[float, float]:
    """(low, high) of the colour map for the finite values of an image; never an empty span."""
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if percentiles is not None and high > low:
        sample = finite[:: max(1, finite.size // _PERCENTILE_SAMPLES)]
        p_low, p_high = (float(v) for v in np.percentile(sample, percentiles))
        if p_high > p_low:
            low, high = p_low, p_high
    if high <= low:  # a flat image still gets a colour (the middle of the map)
        low, high = low - 0.5, high + 0.5
    return low, high


def _bold(text: str) -> Qt.QLabel:
    label = Qt.QLabel(text)
    font = label.font()
    font.setBold(True)
    label.setFont(font)
    return label


def _number(value: float) -> str:
    return f"{value:.6g}"
