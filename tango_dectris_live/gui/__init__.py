"""The Taurus live panel of a DectrisLive device (``tango-dectris-live-panel DEVICE``).

A client of the device over Tango, like any other: it imports nothing from the product's layers,
and Qt, Taurus and pyqtgraph (the ``gui`` extra) only inside this package, so that the product
imports and runs without them. :mod:`.coalesce` is the one module here without Qt: the rule that
keeps the panel responsive at the device's full event rate, testable on its own.
"""
