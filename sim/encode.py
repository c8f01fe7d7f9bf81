"""Byte encoders of the simulated DCU: frame compression, stream v1 parts, stream v2 CBOR messages.

Everything here is a pure function from values to bytes, so the Python send path, the compiled fast
path and the tests all produce (and check) the same bytes. The layouts follow SIMPLON.md §3–§5 and
the real captures in ``shared/testdata``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Sequence

# The simulator encodes a series' frames when it is armed, and bitshuffle's OpenMP team then spins
# on the CPU for milliseconds after each call (libgomp's default wait policy): measured with
# `perf record -a` over benchmarks/bench_pipeline.py --scenario arina96, ~8 ms of a core at every
# arm, in the first milliseconds of the series the benchmark times. A DCU costs the receiving host
# nothing, so let the team sleep as soon as it is idle (read once, when libgomp loads with
# bitshuffle; a value the user sets wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bitshuffle  # noqa: E402  (after the OpenMP setting above)
import cbor2
import lz4.block
import numpy as np

#: Block size a DCU writes into the bslz4 header (bitshuffle's default block, in bytes).
BSLZ4_BLOCK_BYTES = 8192
#: Block size of the LZ4 "HDF5 framing" used by stream v2 ``lz4`` (HDF5 filter 32004 default).
LZ4_HDF5_BLOCK_BYTES = 1 << 30
#: Stream v2 rationals use the EIGER2 50 MHz timebase.
V2_TIMEBASE = 50_000_000
SELF_DESCRIBE_PREFIX = b"\xd9\xd9\xf7"

COMPRESSIONS = ("bslz4", "lz4", "none")
DTYPES = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4")}
TYPED_ARRAY_TAG = {np.dtype("<u1"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70,
                   np.dtype("<f4"): 85}

# v1 header parts that never go into the config dict (they travel as their own blobs).
V1_CONFIG_EXCLUDED = ("flatfield", "pixel_mask", "countrate_correction_table")


def dtype_for_bit_depth(bit_depth: int) -> np.dtype:
    """The little-endian unsigned dtype of a ``bit_depth_image``."""
    try:
        return DTYPES[int(bit_depth)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"bit_depth_image must be 8, 16 or 32, not {bit_depth!r}") from None


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")


# ---------------------------------------------------------------------------------------------
# frame compression
# ---------------------------------------------------------------------------------------------

def compress_bslz4(frame: np.ndarray) -> bytes:
    """bitshuffle+LZ4 with the 12-byte big-endian header: byte-identical to a DCU (§5.1)."""
    flat = np.ascontiguousarray(frame).reshape(-1)
    header = struct.pack(">QI", flat.nbytes, BSLZ4_BLOCK_BYTES)
    if flat.size == 0:
        return header
    return header + bitshuffle.compress_lz4(flat).tobytes()


def compress_lz4_block(raw: bytes) -> bytes:
    """Stream v1 ``lz4<``: one raw LZ4 block over the whole image, no size, no framing (§5.2)."""
    return lz4.block.compress(raw, store_size=False)


def compress_lz4_hdf5(raw: bytes, block_bytes: int = LZ4_HDF5_BLOCK_BYTES) -> bytes:
    """Stream v2 ``lz4``: the LZ4 HDF5 framing of §5.2; a block that does not shrink is stored raw."""
    if block_bytes <= 0:
        raise ValueError(f"LZ4 block size must be positive, not {block_bytes}")
    view = memoryview(raw).cast("B")
    total = len(view)
    # A writer stores min(block, nbytes) so a small image does not claim a 1 GiB block.
    stored_block = min(block_bytes, total) if total else block_bytes
    out = [struct.pack(">QI", total, stored_block)]
    for start in range(0, total, stored_block):
        chunk = bytes(view[start:start + stored_block])
        packed = lz4.block.compress(chunk, store_size=False)
        if len(packed) >= len(chunk):
            packed = chunk
        out.append(struct.pack(">I", len(packed)))
        out.append(packed)
    return b"".join(out)


@dataclass(frozen=True)
class EncodedFrame:
    """One compressed frame, ready for either stream format."""

    blob: bytes
    v1_encoding: str  # e.g. "bs16-lz4<", "lz4<", "<"
    v2_algorithm: str | None  # "bslz4", "lz4" or None (plain typed array)
    v2_blob: bytes  # what goes inside tag 56500 (or the raw typed array when None)
    dtype: np.dtype
    width: int
    height: int

    @property
    def elem_size(self) -> int:
        return self.dtype.itemsize


def encode_frame(frame: np.ndarray, compression: str, stream_format: str = "legacy") -> EncodedFrame:
    """Compress one frame (numpy shape (height, width)) as the DCU would for ``compression``.

    The v1 and v2 blobs only differ for ``lz4`` (raw block vs. HDF5 framing); only the one
    needed for ``stream_format`` is computed for that case.
    """
    _check_compression(compression)
    if frame.ndim != 2:
        raise ValueError(f"a frame must be 2-D (height, width), got shape {frame.shape}")
    dtype = np.dtype(frame.dtype).newbyteorder("<")
    if dtype not in TYPED_ARRAY_TAG or dtype.kind != "u":
        raise ValueError(f"frames must be uint8/16/32, not {frame.dtype}")
    arr = np.ascontiguousarray(frame, dtype=dtype)
    height, width = arr.shape
    bits = dtype.itemsize * 8
    if compression == "bslz4":
        blob = compress_bslz4(arr)
        return EncodedFrame(blob, f"bs{bits}-lz4<", "bslz4", blob, dtype, width, height)
    raw = arr.tobytes()
    if compression == "lz4":
        v1_blob = compress_lz4_block(raw) if stream_format != "cbor" else b""
        v2_blob = compress_lz4_hdf5(raw) if stream_format == "cbor" else b""
        return EncodedFrame(v1_blob, "lz4<", "lz4", v2_blob, dtype, width, height)
    return EncodedFrame(raw, "<", None, raw, dtype, width, height)


# ---------------------------------------------------------------------------------------------
# stream v1 ("legacy"): compact sorted JSON parts with a trailing newline
# ---------------------------------------------------------------------------------------------

def v1_json(obj: dict[str, Any]) -> bytes:
    """A v1 JSON part exactly as a DCU writes it: compact, keys sorted, trailing newline."""
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def v1_config_dict(detector_config: dict[str, Any]) -> dict[str, Any]:
    """The config part of the global header: every config value except the large arrays."""
    return {key: value for key, value in detector_config.items()
            if key.rsplit("/", 1)[-1] not in V1_CONFIG_EXCLUDED}


def v1_global_header(series_id: int, header_detail: str, detector_config: dict[str, Any], *,
                     width: int, height: int, flatfield: np.ndarray | None = None,
                     pixel_mask: np.ndarray | None = None,
                     countrate_table: np.ndarray | None = None,
                     header_appendix: str = "") -> list[bytes]:
    """The parts of the global header message (§3.3) for header_detail all/basic/none.

    ``flatfield`` (float32) and ``pixel_mask`` (uint32) are (height, width) arrays,
    ``countrate_table`` a float32 array of N (x, y) rows; all three are needed for ``all``.
    """
    if header_detail not in ("all", "basic", "none"):
        raise ValueError(f"header_detail must be all, basic or none, not {header_detail!r}")
    parts = [v1_json({"header_detail": header_detail, "htype": "dheader-1.0", "series": series_id})]
    if header_detail in ("all", "basic"):
        parts.append(v1_json(v1_config_dict(detector_config)))
    if header_detail == "all":
        if flatfield is None or pixel_mask is None or countrate_table is None:
            raise ValueError("header_detail 'all' needs the flatfield, pixel mask and count-rate table")
        flat = np.ascontiguousarray(flatfield, dtype="<f4")
        mask = np.ascontiguousarray(pixel_mask, dtype="<u4")
        table = np.ascontiguousarray(countrate_table, dtype="<f4").reshape(-1, 2)
        for name, arr in (("flatfield", flat), ("pixel mask", mask)):
            if arr.shape != (height, width):
                raise ValueError(f"{name} shape {arr.shape} does not match the detector "
                                 f"({height}, {width})")
        parts += [v1_json({"htype": "dflatfield-1.0", "shape": [width, height], "type": "float32"}),
                  flat.tobytes(),
                  v1_json({"htype": "dpixelmask-1.0", "shape": [width, height], "type": "uint32"}),
                  mask.tobytes(),
                  v1_json({"htype": "dcountrate_table-1.0", "shape": [2, table.shape[0]],
                           "type": "float32"}),
                  table.tobytes()]
    if header_appendix:
        parts.append(header_appendix.encode())
    return parts


def v1_dimage_d(encoded: EncodedFrame) -> bytes:
    """Part 2 of an image message; its MD5 is the ``hash`` of part 1."""
    return v1_json({"encoding": encoded.v1_encoding, "htype": "dimage_d-1.0",
                    "shape": [encoded.width, encoded.height], "size": len(encoded.blob),
                    "type": encoded.dtype.name})


def v1_dimage(series_id: int, frame: int, dimage_d: bytes) -> bytes:
    return v1_json({"frame": frame, "hash": hashlib.md5(dimage_d).hexdigest(),
                    "htype": "dimage-1.0", "series": series_id})


def v1_dconfig(real_time_ns: int, start_time_ns: int, stop_time_ns: int) -> bytes:
    return v1_json({"htype": "dconfig-1.0", "real_time": real_time_ns,
                    "start_time": start_time_ns, "stop_time": stop_time_ns})


def v1_image_message(series_id: int, frame: int, encoded: EncodedFrame, *, real_time_ns: int,
                     start_time_ns: int, stop_time_ns: int, image_appendix: str = "",
                     dimage_d: bytes | None = None) -> list[bytes]:
    """The 4 (or 5 with an appendix) parts of one image message (§3.4)."""
    dimage_d = v1_dimage_d(encoded) if dimage_d is None else dimage_d
    parts = [v1_dimage(series_id, frame, dimage_d), dimage_d, encoded.blob,
             v1_dconfig(real_time_ns, start_time_ns, stop_time_ns)]
    if image_appendix:
        parts.append(image_appendix.encode())
    return parts


def v1_series_end(series_id: int) -> bytes:
    return v1_json({"htype": "dseries_end-1.0", "series": series_id})


# ---------------------------------------------------------------------------------------------
# stream v2 (CBOR)
# ---------------------------------------------------------------------------------------------

def v2_dumps(message: dict[str, Any]) -> bytes:
    """One v2 message: the self-describe tag 55799 then the map (insertion order is kept)."""
    if next(iter(message)) != "type":
        raise ValueError("a stream v2 message must have 'type' as its first key")
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def v2_multidim(array: np.ndarray) -> cbor2.CBORTag:
    """A plain (uncompressed) MultiDimArray: tag 40 ``[[H, W], typed-array]``."""
    dtype = np.dtype(array.dtype).newbyteorder("<")
    arr = np.ascontiguousarray(array, dtype=dtype)
    return cbor2.CBORTag(40, [list(arr.shape), cbor2.CBORTag(TYPED_ARRAY_TAG[dtype], arr.tobytes())])


def v2_image_array(encoded: EncodedFrame) -> cbor2.CBORTag:
    """The MultiDimArray of one frame: tag 40 ``[[H, W], tag(typed, tag 56500([alg, E, blob]))]``."""
    if encoded.v2_algorithm is None:
        payload: Any = encoded.v2_blob
    else:
        elem = encoded.elem_size if encoded.v2_algorithm == "bslz4" else 0
        payload = cbor2.CBORTag(56500, [encoded.v2_algorithm, elem, encoded.v2_blob])
    return cbor2.CBORTag(40, [[encoded.height, encoded.width],
                              cbor2.CBORTag(TYPED_ARRAY_TAG[encoded.dtype], payload)])


def v2_rational(ticks: int) -> list[int]:
    return [int(ticks), V2_TIMEBASE]


def v2_datetime(rfc3339: str) -> cbor2.CBORTag:
    return cbor2.CBORTag(0, rfc3339)


def v2_start_message(*, series_id: int, series_unique_id: str, arm_date: str,
                     fields: dict[str, Any]) -> bytes:
    """The start message: the four identifying keys first, the rest alphabetically (§4.1)."""
    head = {"type": "start", "series_id": series_id, "series_unique_id": series_unique_id,
            "arm_date": v2_datetime(arm_date)}
    head.update({key: fields[key] for key in sorted(fields)})
    return v2_dumps(head)


def v2_image_message(*, series_id: int, series_unique_id: str, image_id: int, series_date: str,
                     real_time_ticks: int, start_time_ticks: int, stop_time_ticks: int,
                     channels: Sequence[tuple[str, EncodedFrame]],
                     user_data: str = "") -> bytes:
    """One image message (§4.4), with the captured key order; ``channels`` in ``channels`` order."""
    message: dict[str, Any] = {
        "type": "image", "series_id": series_id, "series_unique_id": series_unique_id,
        "image_id": image_id, "real_time": v2_rational(real_time_ticks),
        "series_date": v2_datetime(series_date), "start_time": v2_rational(start_time_ticks),
        "stop_time": v2_rational(stop_time_ticks),
        "data": {name: v2_image_array(encoded) for name, encoded in channels},
    }
    if user_data:
        message["user_data"] = user_data
    return v2_dumps(message)


def v2_end_message(series_id: int, series_unique_id: str) -> bytes:
    return v2_dumps({"type": "end", "series_id": series_id, "series_unique_id": series_unique_id})
