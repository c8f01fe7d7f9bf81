"""Python face of the compiled receiver: ZeroMQ stream into shared-memory frame stacks."""
from .decode import decode_frames_into
from .framestack import FRAME_RECORD_DTYPE, FrameStackHandle, FrameStackLayout, SlotState, attach_segment, detach_all
from .receiver import (
    CONNECTIONS,
    TRANSPORTS,
    ReceiverError,
    ReceiverEvent,
    ReceiverMode,
    SeriesFinished,
    SeriesStarted,
    SeriesSummary,
    StackReady,
    StreamConnectError,
    StreamReceiver,
)
from .stats import RateMeter, ReceiverStats

__all__ = [
    "CONNECTIONS",
    "FRAME_RECORD_DTYPE",
    "FrameStackHandle",
    "FrameStackLayout",
    "RateMeter",
    "ReceiverError",
    "ReceiverEvent",
    "ReceiverMode",
    "ReceiverStats",
    "SeriesFinished",
    "SeriesStarted",
    "SeriesSummary",
    "SlotState",
    "StackReady",
    "StreamConnectError",
    "StreamReceiver",
    "TRANSPORTS",
    "attach_segment",
    "decode_frames_into",
    "detach_all",
]
