"""What a live acquisition runs on, built on demand: the stream receiver with its frame source, and
the worker pool's runner. An acquisition takes a factory, so that a test can hand it in-memory
frames instead of a ZeroMQ stream (``tango_dectris_live.testing``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tango_dectris_live.receiver import StreamReceiver

from .analyses import AnalysisRegistry
from .live_dataset import ReceiverFrameSource
from .runner import LiveRunner
from .series_control import StreamGeometry


class StreamPipelineFactory:
    """The real thing: a :class:`StreamReceiver` on the DCU's stream port of the series' format,
    and a :class:`LiveRunner` whose workers are separate processes."""

    def __init__(self, stream_host: str, stream_ports: Mapping[int, int], worker_start_method: str = "spawn") -> None:
        self.stream_host = stream_host
        self.stream_ports = dict(stream_ports)
        self.worker_start_method = worker_start_method

    def receiver(self, geometry: StreamGeometry, *, num_slots: int, frame_stack_size: int, bytes_per_frame: int,
                 timeout: float, transport: str, connection: str) -> Any:
        """A started receiver for streams of ``geometry``."""
        port = self.stream_ports[geometry.version]
        return StreamReceiver(
            f"tcp://{self.stream_host}:{port}", stream_version=geometry.version, frame_shape=geometry.frame_shape,
            dtype=geometry.dtype, num_slots=num_slots, frame_stack_size=frame_stack_size,
            bytes_per_frame=bytes_per_frame, timeout=timeout, transport=transport, connection=connection).start()

    def source(self, receiver: Any) -> ReceiverFrameSource:
        return ReceiverFrameSource(receiver)

    def runner(self, workers: int, registry: AnalysisRegistry) -> LiveRunner:
        return LiveRunner(workers, registry, start_method=self.worker_start_method)
