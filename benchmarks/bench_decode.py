"""Single-core frame decoding, no receiver: frames/s of each decode path on one frame stack.

Paths, all decoding the same stack of bslz4 frames in shared memory into a preallocated array:

* ``dectris``: ``decode_frames_into``, the compiled loop calling dectris-compression's C
  ``compression_decompress_buffer`` per frame, straight from shared memory into the output.
* ``reference``: ``decode_frames_into_reference``, one ``dectris.compression.decompress`` Python
  call per frame plus a numpy copy.
* ``alone``: a tight Python loop of ``dectris.compression.decompress(blob, "bslz4", ...)`` on
  bytes objects, without an output array: what dectris-compression costs by itself. Its output
  is one bytes object that malloc hands back every time, so it stays in the core's cache.
* ``alone->out``: the same plus ``np.copyto`` of each frame into its row of the output array:
  the least a consumer of ``decompress`` pays to place the frames (``reference`` without the
  frame index).

Rates are frames per second of this process's CPU time (``time.process_time``; every path is
single-threaded), so time the process spends waiting for a core on a shared machine does not count;
caches and memory bandwidth are still shared, hence: each path runs for at least --seconds of CPU
time, --repeat times, the paths taking turns so that each meets the same background load, and the
best run is reported. Frames are sparse Poisson data, as in the tests. A stack holds as many
frames (16 to 1024) as fit in --stack-mib of decoded pixels: 64 MiB by default, so that, as in
the workers, the output array is not cache-resident and ``dectris`` pays for writing to memory
that ``alone`` never writes; with --stack-mib 1 the output of the small frames (96x96, 192x192)
stays in cache and ``dectris`` / ``alone`` compares the decoding alone.

    .venv/bin/python benchmarks/bench_decode.py [--seconds 0.3] [--repeat 5] [--stack-mib 64] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import dectris.compression
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tango_dectris_live.receiver import decode as decode_module  # noqa: E402
from tango_dectris_live.receiver import FrameStackHandle, FrameStackLayout  # noqa: E402
from tango_dectris_live.receiver.framestack import FRAME_RECORD_DTYPE, SharedFrameStacks, dtype_tag  # noqa: E402
from tango_dectris_live.stream import Algorithm  # noqa: E402
from tango_dectris_live.testing.stream_producer import compress, random_frames  # noqa: E402

CASES = [((96, 96), "uint16"), ((192, 192), "uint16"), ((512, 512), "uint16"), ((1062, 1028), "uint32")]


@contextmanager
def bslz4_stack(blobs: list[bytes], shape: tuple[int, int], dtype: str) -> Iterator[FrameStackHandle]:
    """A filled frame-stack slot holding ``blobs`` as the receiver lays them out."""
    layout = FrameStackLayout(num_slots=1, frame_stack_size=len(blobs), bytes_per_frame=max(map(len, blobs)) + 8)
    stacks = SharedFrameStacks(layout)
    try:
        slot = stacks.take_free_slot(0)
        base = slot * layout.slot_bytes
        records = np.frombuffer(stacks.buffer, FRAME_RECORD_DTYPE, count=len(blobs), offset=base)
        data = np.frombuffer(stacks.buffer, np.uint8, count=layout.data_bytes, offset=base + layout.index_bytes)
        offset = 0
        for number, blob in enumerate(blobs):
            data[offset:offset + len(blob)] = np.frombuffer(blob, np.uint8)
            records[number] = (number, offset, len(blob), Algorithm.BSLZ4.code, np.dtype(dtype).itemsize, 1,
                               dtype_tag(dtype))
            offset = (offset + len(blob) + 7) & ~7
        del records, data
        yield FrameStackHandle(segment=stacks.name, slot=slot, layout=layout, frames=len(blobs), first_frame=0,
                               last_frame=len(blobs) - 1, series=1, shape=shape, dtype=dtype, encoding="bslz4")
    finally:
        stacks.close()


def rate(decode_all: Callable[[], None], frames: int, seconds: float) -> float:
    """Frames per CPU second of one run calling ``decode_all`` (which decodes ``frames``) for
    >= ``seconds`` of CPU time."""
    calls = 0
    started = time.process_time()
    while True:
        decode_all()
        calls += 1
        elapsed = time.process_time() - started
        if elapsed >= seconds:
            return calls * frames / elapsed


def best_rates(paths: dict[str, Callable[[], None]], frames: int, seconds: float, repeat: int) -> dict[str, float]:
    """The best of ``repeat`` rates per path, the paths taking turns."""
    for decode_all in paths.values():
        decode_all()  # warm-up: scratch buffers, page faults in the output
    rates: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeat):
        for path, decode_all in paths.items():
            rates[path].append(rate(decode_all, frames, seconds))
    return {path: max(values) for path, values in rates.items()}


def measure(shape: tuple[int, int], dtype: str, stack_bytes: int, seconds: float, repeat: int) -> dict:
    itemsize = np.dtype(dtype).itemsize
    count = int(np.clip(stack_bytes // (shape[0] * shape[1] * itemsize), 16, 1024))
    frames = random_frames(count, shape, dtype, seed=count)
    blobs = [compress(frame, "bslz4") for frame in frames]
    assert struct.unpack_from(">Q", blobs[0])[0] == frames[0].nbytes
    out = np.empty((count, *shape), dtype)
    decompress = dectris.compression.decompress

    def alone() -> None:
        for blob in blobs:
            decompress(blob, "bslz4", elem_size=itemsize)

    def alone_to_out() -> None:
        for row, blob in zip(out, blobs):
            np.copyto(row, np.frombuffer(decompress(blob, "bslz4", elem_size=itemsize), dtype).reshape(shape))

    with bslz4_stack(blobs, shape, dtype) as handle:
        paths = {"dectris": lambda: decode_module.decode_frames_into(handle, 0, count, out),
                 "reference": lambda: decode_module.decode_frames_into_reference(handle, 0, count, out),
                 "alone": alone, "alone->out": alone_to_out}
        for path in ("dectris", "reference"):
            out[:] = 0
            paths[path]()
            if not np.array_equal(out, frames):
                raise AssertionError(f"{path} decoded {shape} {dtype} frames wrongly")
        rates = best_rates(paths, count, seconds, repeat)
    return {"shape": list(shape), "dtype": dtype, "frames_per_stack": count,
            "compressed_bytes_per_frame": sum(map(len, blobs)) / count,
            "frames_per_s": rates, "dectris_vs_alone": rates["dectris"] / rates["alone"],
            "dectris_vs_alone_to_out": rates["dectris"] / rates["alone->out"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum duration of one run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per path; the best is reported")
    parser.add_argument("--stack-mib", type=float, default=64, help="decoded size of a stack (MiB)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [measure(shape, dtype, int(args.stack_mib * (1 << 20)), args.seconds, args.repeat)
               for shape, dtype in CASES]
    paths = list(results[0]["frames_per_s"])
    print(f"single-core decode, frames per CPU second (best of {args.repeat} runs of >= {args.seconds} s)")
    print(f"{'frame':>18} {'KiB in':>7} " + " ".join(f"{p:>11}" for p in paths) + "  dectris/alone  /alone->out")
    for result in results:
        label = f"{result['shape'][0]}x{result['shape'][1]} {result['dtype']}"
        rates = " ".join(f"{result['frames_per_s'][p]:>11,.0f}" for p in paths)
        print(f"{label:>18} {result['compressed_bytes_per_frame'] / 1024:>7.1f} {rates}  "
              f"{result['dectris_vs_alone']:>14.2f} {result['dectris_vs_alone_to_out']:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "bench_decode", "seconds": args.seconds,
                                         "repeat": args.repeat, "stack_mib": args.stack_mib,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
