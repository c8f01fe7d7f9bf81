"""Sardana's own scan window (``showscan online``) on a Door, saved as a PNG when asked: run under an
X display by tests/integration/test_sardana.py, which runs a scan through the Door meanwhile and
then creates the file ``TRIGGER``.

    python sardana_scan_plot.py DOOR OUTPUT.png TRIGGER
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(door: str, output: str, trigger: str) -> int:
    from sardana.taurus.qt.qtcore.tango.sardana import registerExtensions
    from sardana.taurus.qt.qtgui.extra_sardana.showscanonline import ScanWindow
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.application import TaurusApplication

    app = TaurusApplication(cmd_line_parser=None, app_name="scan-plot")
    registerExtensions()  # the Door as Sardana's Qt Door, as spock and showscan have it
    window = ScanWindow()
    window.setModel(door)
    window.resize(1100, 700)
    window.show()
    print("ready", flush=True)

    def check() -> None:
        if Path(trigger).exists():
            app.processEvents()
            window.grab().save(output)
            print(f"saved {output}", flush=True)
            app.quit()

    timer = Qt.QTimer()
    timer.timeout.connect(check)
    timer.start(100)
    return app.exec_()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
