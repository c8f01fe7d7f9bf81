"""A DectrisLive device to develop against without a detector (GUIs, macros, the itango console).

* :class:`~.realistic.RealisticStandIn` (``tango-dectris-live-standin``): the real DectrisLive
  server on a simulated DCU, registered in an embedded Tango database; live processing, events and
  saving behave as at the beamline.
* :mod:`.description`: the device's interface as a tango-simlib description (a fandango ``.fgo``
  export: every attribute and command with its types, unit and description), generated from a
  running stand-in and committed beside this package; the tests hold it against the docs and the
  running device.

A client-side tool like the demo: it starts processes and talks to them over Tango; nothing in
the product imports it.
"""
