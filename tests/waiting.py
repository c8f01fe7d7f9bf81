"""Moved to :mod:`tango_dectris_live.testing`; kept so that tests written before the move still import."""
from tango_dectris_live.testing import wait_for

__all__ = ["wait_for"]
