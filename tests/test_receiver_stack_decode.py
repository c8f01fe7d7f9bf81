"""The compiled stack decoder (receiver/_stack_decode.pyx) against the per-frame Python reference."""
from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import bitshuffle
import numpy as np
import pytest

from tango_dectris_live.receiver import decode as decode_module
from tango_dectris_live.receiver import FrameStackHandle, FrameStackLayout, StreamReceiver, decode_frames_into
from tango_dectris_live.receiver.decode import decode_frames_into_reference
from tango_dectris_live.receiver.framestack import FRAME_RECORD_DTYPE, SharedFrameStacks, dtype_tag
from tango_dectris_live.stream import (
    Algorithm,
    CorruptFrameError,
    FrameSizeMismatchError,
    UnsupportedEncodingError,
    parse_v2_message,
)
from tango_dectris_live.testing.stream_producer import StreamProducer, collect_series, compress, random_frames

# Not a multiple of 8 pixels, and more than one 8 KiB bitshuffle block: exercises the last
# partial block and the raw leftover bytes of the bitshuffle framing.
ODD_SHAPE = (67, 131)


@pytest.fixture
def reference_calls(monkeypatch) -> list[int]:
    """Frame numbers the compiled loop leaves to the per-frame Python reference."""
    calls = []
    reference = decode_module._decode_record
    monkeypatch.setattr(decode_module, "_decode_record",
                        lambda *args: (calls.append(int(args[1]["frame"])), reference(*args)))
    return calls


def _blob(frame: np.ndarray, algorithm: Algorithm, block_bytes: int = 8192) -> bytes:
    raw = np.ascontiguousarray(frame)
    if algorithm in (Algorithm.BSLZ4, Algorithm.BSZSTD):
        shuffle = bitshuffle.compress_lz4 if algorithm is Algorithm.BSLZ4 else bitshuffle.compress_zstd
        body = shuffle(raw.ravel(), block_bytes // raw.itemsize).tobytes()
        return struct.pack(">QI", raw.nbytes, block_bytes) + body
    if algorithm is Algorithm.LZ4:
        return compress(raw, "lz4", version=1)
    if algorithm is Algorithm.LZ4H5:
        return compress(raw, "lz4", version=2)
    return raw.tobytes()


@contextmanager
def frame_stack(blobs: list[tuple[int, bytes | list[bytes], int, np.dtype | str]], shape: tuple[int, int]):
    """A filled slot built with the framestack API: (frame number, blob or channel blobs,
    encoding code, pixel type) per frame, laid out as the receiver lays them out."""
    sizes = [sum(len(b) + 8 for b in blob) if isinstance(blob, list) else len(blob) for _, blob, _, _ in blobs]
    layout = FrameStackLayout(num_slots=2, frame_stack_size=len(blobs), bytes_per_frame=max(sizes) + 8)
    stacks = SharedFrameStacks(layout)
    try:
        slot = stacks.take_free_slot(0)
        base = slot * layout.slot_bytes
        records = np.frombuffer(stacks.buffer, FRAME_RECORD_DTYPE, count=len(blobs), offset=base)
        data = np.frombuffer(stacks.buffer, np.uint8, count=layout.data_bytes, offset=base + layout.index_bytes)
        offset = 0
        for i, (number, blob, code, dtype) in enumerate(blobs):
            channels = len(blob) if isinstance(blob, list) else 1
            payload = (np.array([len(b) for b in blob], "<u8").tobytes() + b"".join(blob)
                       if isinstance(blob, list) else blob)
            data[offset:offset + len(payload)] = np.frombuffer(payload, np.uint8)
            records[i] = (number, offset, len(payload), code, np.dtype(dtype).itemsize, channels, dtype_tag(dtype))
            offset = (offset + len(payload) + 7) & ~7
        del records, data
        yield FrameStackHandle(segment=stacks.name, slot=slot, layout=layout, frames=len(blobs),
                               first_frame=min(b[0] for b in blobs), last_frame=max(b[0] for b in blobs),
                               series=1, shape=shape, dtype=np.dtype(blobs[0][3]).name, encoding="bslz4")
    finally:
        stacks.close()


def _both(handle: FrameStackHandle, out_dtype, start: int = 0, stop: int | None = None, channel: int = 0):
    stop = handle.frames if stop is None else stop
    compiled = np.full((stop - start, *handle.shape), 77, out_dtype)
    reference = np.full_like(compiled, 99)
    numbers = decode_frames_into(handle, start, stop, compiled, channel=channel)
    reference_numbers = decode_frames_into_reference(handle, start, stop, reference, channel=channel)
    np.testing.assert_array_equal(numbers, reference_numbers)
    assert numbers.dtype == np.int64
    return numbers, compiled, reference


@pytest.mark.parametrize("algorithm", [Algorithm.BSLZ4, Algorithm.BSZSTD, Algorithm.LZ4, Algorithm.LZ4H5,
                                       Algorithm.NONE])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int32"])
@pytest.mark.parametrize("out_dtype", ["same", "uint16", "float32", "float64"])
def test_compiled_equals_reference(algorithm, dtype, out_dtype, reference_calls):
    frames = random_frames(5, ODD_SHAPE, dtype, seed=3)
    frames[1] = 0  # an all-zero frame compresses to almost nothing
    frames[2] = np.iinfo(dtype).max  # and the largest pixel value must survive the conversion
    out_dtype = dtype if out_dtype == "same" else out_dtype
    order = [3, 0, 4, 1, 2]  # stacks hold frames in arrival order
    blobs = [(n, _blob(frames[n], algorithm), algorithm.code, dtype) for n in order]
    with frame_stack(blobs, ODD_SHAPE) as handle:
        numbers, compiled, reference = _both(handle, out_dtype)
        assert list(numbers) == order
        np.testing.assert_array_equal(compiled, reference)
        np.testing.assert_array_equal(compiled, frames[order].astype(out_dtype))
    assert sorted(reference_calls) == sorted(order)  # from decode_frames_into_reference only


@pytest.mark.parametrize("block_bytes", [256, 1024, 1 << 20])
def test_bitshuffle_block_sizes(block_bytes):
    frames = random_frames(3, ODD_SHAPE, "uint16", seed=9)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4, block_bytes), Algorithm.BSLZ4.code, "uint16") for n in range(3)]
    with frame_stack(blobs, ODD_SHAPE) as handle:
        _numbers, compiled, _reference = _both(handle, np.uint16)
        np.testing.assert_array_equal(compiled, frames)


def test_partial_range_and_every_output_type():
    frames = random_frames(6, (16, 24), "uint16", seed=1)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16") for n in range(6)]
    with frame_stack(blobs, (16, 24)) as handle:
        for out_dtype in ("uint8", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"):
            numbers, compiled, reference = _both(handle, out_dtype, 2, 5)
            assert list(numbers) == [2, 3, 4]
            np.testing.assert_array_equal(compiled, reference)


def test_frames_the_loop_leaves_to_python_still_decode():
    big_endian = random_frames(2, (8, 12), "uint16", seed=2).astype(">u2")
    floats = np.linspace(0, 1, 2 * 96, dtype=np.float32).reshape(2, 8, 12)
    blobs = [(0, big_endian[0].tobytes(), Algorithm.NONE.code, ">u2"),
             (1, _blob(floats[1], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "float32"),
             (2, big_endian[1].tobytes(), Algorithm.NONE.code, ">u2")]
    with frame_stack(blobs, (8, 12)) as handle:
        _numbers, compiled, reference = _both(handle, np.float64)
        np.testing.assert_array_equal(compiled, reference)
        np.testing.assert_array_equal(compiled[0], big_endian[0].astype(np.float64))
        np.testing.assert_array_equal(compiled[1], floats[1].astype(np.float64))


@pytest.mark.parametrize("algorithm", [Algorithm.BSLZ4, Algorithm.BSZSTD, Algorithm.LZ4H5])
def test_large_frames_are_decoded_by_the_compiled_loop(algorithm, reference_calls):
    frames = random_frames(3, (300, 260), "uint16", seed=5)  # 152 KiB: 19 bitshuffle blocks
    blobs = [(n, _blob(frames[n], algorithm), algorithm.code, "uint16") for n in range(3)]
    with frame_stack(blobs, (300, 260)) as handle:
        out = np.zeros((3, 300, 260), np.uint16)
        decode_frames_into(handle, 0, 3, out)
    np.testing.assert_array_equal(out, frames)
    assert reference_calls == []


def test_threads_decode_concurrently():
    """Each thread has its own decoder (scratch buffer); the loop runs without the GIL."""
    frames = random_frames(8, (64, 96), "uint16", seed=11)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16") for n in range(8)]
    with frame_stack(blobs, (64, 96)) as handle:
        outs = {dtype: np.zeros((8, 64, 96), dtype) for dtype in ("uint16", "float32", "int64", "uint8")}
        with ThreadPoolExecutor(len(outs)) as pool:
            for future in [pool.submit(decode_frames_into, handle, 0, 8, out) for out in outs.values()]:
                future.result(timeout=30)
    for out in outs.values():
        np.testing.assert_array_equal(out, frames.astype(out.dtype))


def test_non_contiguous_output_uses_the_reference_path():
    frames = random_frames(3, (8, 16), "uint16", seed=6)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16") for n in range(3)]
    with frame_stack(blobs, (8, 16)) as handle:
        wide = np.zeros((3, 8, 32), np.uint16)
        decode_frames_into(handle, 0, 3, wide[:, :, ::2])
        np.testing.assert_array_equal(wide[:, :, ::2], frames)
        assert not wide[:, :, 1::2].any()


def test_multi_channel_frames():
    first, second = random_frames(2, (8, 16), "uint16", seed=7)
    blob = [_blob(first, Algorithm.BSLZ4), _blob(second, Algorithm.BSLZ4)]
    with frame_stack([(5, blob, Algorithm.BSLZ4.code, "uint16")], (8, 16)) as handle:
        for channel, expected in ((0, first), (1, second)):
            _numbers, compiled, reference = _both(handle, np.uint16, channel=channel)
            np.testing.assert_array_equal(compiled[0], expected)
        with pytest.raises(IndexError, match="frame 5 has 2 channel"):
            decode_frames_into(handle, 0, 1, np.zeros((1, 8, 16), np.uint16), channel=2)


def _corrupted(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[16:] = bytes([0xFF]) * (len(damaged) - 16)  # block size intact, LZ4 sequences garbage
    return bytes(damaged)


FRAME = random_frames(1, (32, 32), "uint16", seed=8)[0]
GOOD = _blob(FRAME, Algorithm.BSLZ4)
BAD_BLOBS = {
    "corrupt bslz4": (Algorithm.BSLZ4, _corrupted(GOOD), CorruptFrameError,
                      rf"could not be decompressed \(dectris-compression rejects the {len(GOOD)}-byte blob"),
    "truncated bslz4": (Algorithm.BSLZ4, GOOD[:len(GOOD) // 2], CorruptFrameError, "could not be decompressed"),
    "short header": (Algorithm.BSLZ4, GOOD[:7], CorruptFrameError, "shorter than its 12-byte header"),
    "declared size": (Algorithm.BSLZ4, struct.pack(">Q", FRAME.nbytes * 2) + GOOD[8:], FrameSizeMismatchError,
                      "declares 4096 bytes"),
    "corrupt bszstd": (Algorithm.BSZSTD, _corrupted(_blob(FRAME, Algorithm.BSZSTD)), CorruptFrameError,
                       "could not be decompressed"),
    "bslz4 block not 8 pixels": (Algorithm.BSLZ4, GOOD[:8] + struct.pack(">I", 8190) + GOOD[12:], CorruptFrameError,
                                 "could not be decompressed"),
    "corrupt lz4<": (Algorithm.LZ4, b"\xff" * 64, CorruptFrameError, "could not be decompressed"),
    "truncated v2 lz4": (Algorithm.LZ4H5, _blob(FRAME, Algorithm.LZ4H5)[:40], CorruptFrameError,
                         "could not be decompressed"),
    "raw size": (Algorithm.NONE, FRAME.tobytes()[:-2], FrameSizeMismatchError, "2046 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_BLOBS))
def test_bad_frame_raises_the_reference_error_with_its_frame_number(case):
    algorithm, bad, error, message = BAD_BLOBS[case]
    blobs = [(40, GOOD, Algorithm.BSLZ4.code, "uint16"), (41, bad, algorithm.code, "uint16")]
    with frame_stack(blobs, (32, 32)) as handle:
        out = np.zeros((2, 32, 32), np.uint16)
        with pytest.raises(error, match=f"frame 41: .*{message}"):
            decode_frames_into(handle, 0, 2, out)
        with pytest.raises(error, match="frame 41"):
            decode_frames_into_reference(handle, 0, 2, np.zeros_like(out))
        np.testing.assert_array_equal(out[0], FRAME)  # frames before the bad one are decoded
        assert decode_frames_into(handle, 0, 1, out[:1])[0] == 40  # the good frame alone is fine


def test_unknown_encoding_code_names_the_frame():
    with frame_stack([(12, GOOD, 9, "uint16")], (32, 32)) as handle:
        with pytest.raises(UnsupportedEncodingError, match="frame 12: .*unknown encoding .*code 9"):
            decode_frames_into(handle, 0, 1, np.zeros((1, 32, 32), np.float32))


def test_wrong_output_shape_is_rejected():
    with frame_stack([(0, GOOD, Algorithm.BSLZ4.code, "uint16")], (32, 32)) as handle:
        with pytest.raises(FrameSizeMismatchError, match="frame 0: bslz4 header declares 2048 bytes, "
                                                         "the frame needs 1152"):
            decode_frames_into(handle, 0, 1, np.zeros((1, 24, 24), np.uint16))
        with pytest.raises(ValueError, match="needs"):
            decode_frames_into(handle, 0, 1, np.zeros((2, 32, 32), np.uint16))
        with pytest.raises(IndexError, match="outside the stack"):
            decode_frames_into(handle, 0, 2, np.zeros((2, 32, 32), np.uint16))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("encoding", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_stacks_from_the_receiver(version, encoding, dtype):
    shape = (20, 36)
    frames = random_frames(12, shape, dtype, seed=version)
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=shape, dtype=dtype,
            frame_stack_size=5, num_slots=4) as receiver:
        receiver.arm(7)
        producer.send_all(producer.series(7, frames, encoding))
        compared = []

        def decode_both(handle, start, stop, out):
            numbers, compiled, reference = _both(handle, np.float32, start, stop)
            np.testing.assert_array_equal(compiled, reference)
            np.testing.assert_array_equal(compiled, frames[numbers].astype(np.float32))
            compared.extend(int(n) for n in numbers)
            return decode_frames_into(handle, start, stop, out)

        summary, received, _events = collect_series(receiver, decode_both, dtype)
    assert summary.missing == 0 and sorted(compared) == list(range(12))
    for number, frame in received.items():
        np.testing.assert_array_equal(frame, frames[number])


def test_real_detector_blobs_decode_like_the_reference(testdata):
    v1 = testdata / "stream_v1_eiger4m"
    description = json.loads((v1 / "part_11").read_bytes())
    width, height = description["shape"]
    v1_blob = (v1 / "part_12").read_bytes()
    v2_image = parse_v2_message((testdata / "stream_v2_eiger2_16m" / "image.cbor").read_bytes()).channel_data()
    for number, blob, shape in ((0, v1_blob, (height, width)), (1, bytes(v2_image.blob), v2_image.shape)):
        with frame_stack([(number, blob, Algorithm.BSLZ4.code, "uint16")], shape) as handle:
            _numbers, compiled, reference = _both(handle, np.uint16)
            np.testing.assert_array_equal(compiled, reference)
            assert compiled.any()
