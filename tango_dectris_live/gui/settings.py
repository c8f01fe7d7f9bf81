"""The live-processing settings of the device, shown and edited in the panel.

The device pushes no change events for these attributes (they change only when a client writes
them), so Taurus would poll them. The form reads them instead when something says they may have
changed: the panel opening, a State change event of the device (every Start and end of a series),
a write from this form, and the refresh button. Never on a timer.
"""
from __future__ import annotations

import tango
from taurus.external.qt import Qt

from .settings_text import (
    SETTINGS,
    SettingTextError,
    format_setting,
    parse_setting,
    results_of,
)

_INFORMATION = ("available_analyses", "result_attributes")


class LiveSettingsForm(Qt.QGroupBox):
    """A field per setting; Enter writes it, a refused value is explained under the fields.

    ``resultsChanged(list[str])``: the result attributes of the analyses the device runs, after
    every read (the image view offers them).
    """

    resultsChanged = Qt.pyqtSignal(list)

    def __init__(self, proxy: tango.DeviceProxy, parent: Qt.QWidget | None = None) -> None:
        super().__init__("Live processing", parent)
        self.proxy = proxy
        self.reads = 0
        self.fields: dict[str, Qt.QLineEdit] = {}
        form = Qt.QFormLayout()
        form.setFieldGrowthPolicy(Qt.QFormLayout.AllNonFixedFieldsGrow)
        for setting in SETTINGS:
            field = Qt.QLineEdit()
            field.setPlaceholderText(setting.hint)
            field.setToolTip(f"{setting.attribute}: {setting.hint}. Enter writes it to the device.")
            field.returnPressed.connect(lambda name=setting.attribute: self.write(name))
            self.fields[setting.attribute] = field
            label = setting.label + (f" ({setting.unit})" if setting.unit else "")
            form.addRow(label, field)
        self.available = Qt.QLabel()
        self.available.setWordWrap(True)
        self.available.setStyleSheet("QLabel { color: #4b5563; }")
        self.message = Qt.QLabel()
        self.message.setWordWrap(True)
        refresh = Qt.QPushButton("Read again")
        refresh.setToolTip("Read the settings from the device now (another client may have changed them)")
        refresh.clicked.connect(self.refresh)
        bottom = Qt.QHBoxLayout()
        bottom.addWidget(self.message, 1)
        bottom.addWidget(refresh, 0, Qt.Qt.AlignTop)
        layout = Qt.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.available)
        layout.addLayout(bottom)

    def refresh(self) -> None:
        """Read every setting once; a field being edited keeps what the user typed."""
        names = [setting.attribute for setting in SETTINGS] + list(_INFORMATION)
        try:
            replies = self.proxy.read_attributes(names)
        except tango.DevFailed as exc:
            self._say(f"cannot read the settings: {exc.args[0].desc}", error=True)
            return
        self.reads += 1
        values = {name: None if reply.has_failed else reply.value for name, reply in zip(names, replies)}
        failed = [name for name, reply in zip(names, replies) if reply.has_failed]
        for setting in SETTINGS:
            field = self.fields[setting.attribute]
            field.setEnabled(setting.attribute not in failed)
            if field.hasFocus() and field.isModified():
                continue
            field.setText(format_setting(setting.kind, values[setting.attribute]))
            field.setModified(False)
        available = list(values["available_analyses"] or ())
        self.available.setText("Available analyses: " + (", ".join(available) or "—"))
        analyses = list(values["analyses"] or ())
        self.resultsChanged.emit(results_of(analyses, list(values["result_attributes"] or ())))
        if failed:
            self._say(f"cannot read {', '.join(failed)} (is the device configured? see its Status)", error=True)

    def write(self, attribute: str) -> None:
        """Write the field of ``attribute``; the device's refusal (its message) is shown."""
        setting = next(s for s in SETTINGS if s.attribute == attribute)
        field = self.fields[attribute]
        try:
            value = parse_setting(setting.kind, field.text())
            self.proxy.write_attribute(attribute, value)
        except SettingTextError as exc:
            self._say(f"{setting.label}: {exc}", error=True)
            return
        except tango.DevFailed as exc:
            self._say(f"{setting.label} refused: {exc.args[0].desc}", error=True)
            field.setModified(False)
            self.refresh()
            return
        field.setModified(False)
        self._say(f"{setting.label} set to {field.text() or 'automatic'}", error=False)
        self.refresh()

    def _say(self, text: str, error: bool) -> None:
        self.message.setStyleSheet(f"QLabel {{ color: {'#b91c1c' if error else '#15803d'}; }}")
        self.message.setText(text)
