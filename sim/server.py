"""The simulator as one object: REST server, state machine and stream sink, started and stopped
together. Every test fixture of the project starts the simulator through :class:`SimulatorServer`."""
from __future__ import annotations

import threading
from types import TracebackType

from sim.detector import SimulatedDetector
from sim.models import model_by_name
from sim.rest import SimplonHTTPServer
from sim.series import StreamSink
from sim.streams import DetectorStreamSink


def _make_sink(host: str, stream_port: int, stream2_port: int) -> StreamSink:
    """The stream sender used when none is given (the only place that chooses it)."""
    return DetectorStreamSink(host, stream_port, stream2_port)


class SimulatorServer:
    """A simulated DCU on ``host``: SIMPLON REST on ``port``, stream v1/v2 on the sink's ports
    (0 = any free port; the actual ports are known after :meth:`start`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, stream_port: int = 0, stream2_port: int = 0,
                 model: str = "QUADRO", sink: StreamSink | None = None, verbose: bool = False,
                 profile: str = "full") -> None:
        self.host = host
        self.port = port
        self.stream_port = stream_port
        self.stream2_port = stream2_port
        self.model = model_by_name(model)
        self.sink: StreamSink = sink if sink is not None else _make_sink(host, stream_port, stream2_port)
        self.detector = SimulatedDetector(self.model, self.sink)
        self.verbose = verbose
        # "minimal", "partial": DCUs with only part of SIMPLON (see sim.rest)
        self.profile = profile
        if profile == "partial":
            # LiberTEM-live's simulator has no state machine to initialize, and replays its
            # recordings with the global header's parts as separate messages
            self.detector.initialize()
            if "v1_framing" in self.sink.get_sim_config():
                self.detector.update_sim_config({"v1_framing": "split_header"})
        self._http: SimplonHTTPServer | None = None
        self._serving: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "SimulatorServer":
        """Bind the stream sockets and the HTTP port; returns once requests are accepted (the
        listening socket exists, so a connection made now is queued and answered)."""
        if self._http is not None:
            raise RuntimeError("the simulator is already started")
        self.stream_port, self.stream2_port = self.sink.bind()
        try:
            self._http = SimplonHTTPServer((self.host, self.port), self.detector, self.verbose, self.profile)
        except OSError:
            self.sink.close()
            raise
        self.port = self._http.server_address[1]
        self._serving = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                         name=f"simplon-rest-{self.port}", daemon=True)
        self._serving.start()
        return self

    def stop(self) -> None:
        """End a running series, stop serving, close the HTTP and stream sockets (idempotent)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.detector.shutdown()
        if self._http is not None:
            self._http.shutdown()
            self._http.close_connections()
            self._http.server_close()
        if self._serving is not None:
            self._serving.join()
        self.sink.close()

    def __enter__(self) -> "SimulatorServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
