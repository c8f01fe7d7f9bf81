"""Client-side helpers for tests, the demo and the benchmarks (as ophyd-async ships ``tango/testing``).

* :func:`acquire`: one live acquisition through a device (Start, final result, State ON);
* :func:`wait_for`: polling with a deadline, the one way to wait for something to happen;
* :class:`EventRecorder` / :class:`ChangeEvent`: what a subscribed Tango client receives;
* :func:`result_attributes`: a device's result attributes of the analyses it runs;
* :func:`stop_leftovers`: ending the processes a run started, by pid;
* :mod:`.stream_producer`: a small DCU stand-in that PUSHes stream v1/v2 messages, written from the
  SIMPLON documentation and not from the receiver's code.

Nothing in the product imports this package; it imports nothing from the product (the layering
test checks both).
"""
from .acquire import acquire
from .attributes import result_attributes
from .events import ChangeEvent, EventRecorder
from .processes import stop_leftovers
from .waiting import wait_for

__all__ = ["ChangeEvent", "acquire", "EventRecorder", "result_attributes", "stop_leftovers", "wait_for"]
