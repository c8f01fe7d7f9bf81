"""Frame decoding: every encoding, any output dtype, and the errors of bad blobs."""
from __future__ import annotations

import ast
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import bitshuffle
import lz4.block
import numpy as np
import pytest

import tango_dectris_live.stream as stream
from tango_dectris_live.stream import (
    Algorithm,
    CorruptFrameError,
    Encoding,
    FrameSizeMismatchError,
    StreamFormatError,
    algorithm_from_code,
    decode_frame_into,
    decompress_bytes,
)

SAMPLE_SHAPE = (4362, 4148)  # frame_bslz4_uint16_4148x4362.bin, (height, width)


@contextmanager
def raises_with_reason(error_class, reason):
    with pytest.raises(error_class) as info:
        yield info
    assert isinstance(info.value, StreamFormatError)
    assert info.value.reason == reason


def framed(payload: bytes, nbytes: int, block_size: int = 8192) -> bytes:
    return struct.pack(">QI", nbytes, block_size) + payload


def encode(pixels: np.ndarray, algorithm: Algorithm) -> bytes:
    """Compress ``pixels`` as the detector would for ``algorithm``."""
    if algorithm is Algorithm.BSLZ4:
        return framed(bitshuffle.compress_lz4(pixels).tobytes(), pixels.nbytes)
    if algorithm is Algorithm.BSZSTD:
        return framed(bitshuffle.compress_zstd(pixels).tobytes(), pixels.nbytes)
    if algorithm is Algorithm.LZ4:
        return lz4.block.compress(pixels.tobytes(), store_size=False)
    if algorithm is Algorithm.LZ4H5:
        # One block over the whole frame, as the HDF5 LZ4 filter writes frames under 1 GiB.
        raw = pixels.tobytes()
        packed = lz4.block.compress(raw, store_size=False)
        return framed(struct.pack(">I", len(packed)) + packed, len(raw), block_size=len(raw))
    return pixels.tobytes()


# --- the real sample frame ------------------------------------------------------------------------

def test_sample_frame_into_float32_equals_the_uint16_decode(testdata):
    blob = (testdata / "stream_v2_eiger2_16m" / "frame_bslz4_uint16_4148x4362.bin").read_bytes()
    encoding = Encoding(Algorithm.BSLZ4, elem_size=2)

    as_uint16 = decode_frame_into(blob, encoding, np.empty(SAMPLE_SHAPE, np.uint16))
    as_float32 = np.full(SAMPLE_SHAPE, -1.0, np.float32)
    returned = decode_frame_into(blob, encoding, as_float32)

    assert returned is as_float32
    assert np.array_equal(as_float32, as_uint16.astype(np.float32))
    assert as_uint16.max() == 65535 and (as_uint16 == 65535).sum() > 1_000_000  # masked module gaps
    # Exact decode: re-encoding it as the DCU does gives the sample back byte for byte.
    assert encode(as_uint16, Algorithm.BSLZ4) == blob


def test_sample_frame_with_wrong_output_shape(testdata):
    blob = (testdata / "stream_v2_eiger2_16m" / "frame_bslz4_uint16_4148x4362.bin").read_bytes()
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch") as info:
        decode_frame_into(blob, Encoding(Algorithm.BSLZ4, 2), np.empty((4362, 4147), np.uint16), frame_number=3)
    assert "frame 3" in str(info.value)


# --- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", list(Algorithm))
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("out_dtype", [None, "float32", "float64", "int64"])
def test_round_trip(algorithm, dtype, out_dtype):
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=(37, 29), dtype=dtype)  # n % 8 != 0
    pixels[:10] = 0  # something to compress
    out = np.empty(pixels.shape, out_dtype or dtype)

    decode_frame_into(encode(pixels, algorithm), Encoding.for_dtype(algorithm, dtype), out)

    np.testing.assert_array_equal(out, pixels.astype(out.dtype))


def test_decode_into_a_strided_view():
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    stack = np.zeros((3, 8, 16), np.float32)
    decode_frame_into(encode(pixels, Algorithm.BSLZ4), Encoding(Algorithm.BSLZ4, 2), stack[1, :, ::2])
    np.testing.assert_array_equal(stack[1, :, ::2], pixels)
    assert not stack[0].any() and not stack[2].any() and not stack[1, :, 1::2].any()


def test_empty_frame():
    out = np.empty((0, 5), np.uint16)
    decode_frame_into(bytes(12), Encoding(Algorithm.BSLZ4, 2), out)
    assert out.shape == (0, 5)


def test_memoryview_blob():
    pixels = np.arange(100, dtype=np.uint32).reshape(10, 10)
    blob = memoryview(encode(pixels, Algorithm.BSLZ4))
    out = np.empty((10, 10), np.uint32)
    decode_frame_into(blob, Encoding(Algorithm.BSLZ4, 4), out)
    np.testing.assert_array_equal(out, pixels)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [Algorithm.BSLZ4, Algorithm.LZ4H5, Algorithm.BSZSTD])
def test_framed_blob_shorter_than_its_header(algorithm):
    with raises_with_reason(CorruptFrameError, "corrupt_blob") as info:
        decode_frame_into(b"\x00" * 7, Encoding(algorithm, 2), np.empty((2, 2), np.uint16), frame_number=4)
    assert "frame 4" in str(info.value)


def test_framed_header_declaring_another_size_is_checked_before_decompressing():
    pixels = np.zeros((4, 4), np.uint16)
    blob = bytearray(encode(pixels, Algorithm.BSLZ4))
    blob[:8] = struct.pack(">Q", 1 << 40)  # a garbage header must not make us allocate a terabyte
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch") as info:
        decode_frame_into(bytes(blob), Encoding(Algorithm.BSLZ4, 2), np.empty((4, 4), np.uint16))
    assert str(1 << 40) in str(info.value)


@pytest.mark.parametrize("algorithm", [Algorithm.BSLZ4, Algorithm.BSZSTD, Algorithm.LZ4H5, Algorithm.LZ4])
def test_truncated_blob_is_corrupt(algorithm):
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    blob = encode(pixels, algorithm)
    with raises_with_reason(CorruptFrameError, "corrupt_blob") as info:
        decode_frame_into(blob[: len(blob) * 2 // 3], Encoding(algorithm, 2), np.empty((64, 64), np.uint16), frame_number=21)
    assert "frame 21" in str(info.value)


def test_raw_lz4_block_that_decodes_to_too_few_bytes():
    small = np.arange(8, dtype=np.uint16)
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch"):
        decode_frame_into(encode(small, Algorithm.LZ4), Encoding(Algorithm.LZ4, 2), np.empty((4, 4), np.uint16))


def test_uncompressed_blob_of_wrong_size():
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch"):
        decode_frame_into(bytes(31), Encoding(Algorithm.NONE, 2), np.empty((4, 4), np.uint16))


def test_raw_lz4_needs_the_expected_size():
    with pytest.raises(ValueError, match="expected_nbytes"):
        decompress_bytes(b"\x00", Encoding(Algorithm.LZ4, 2))


# --- the model ------------------------------------------------------------------------------------

def test_algorithm_codes_are_distinct_and_invertible():
    codes = [algorithm.code for algorithm in Algorithm]
    assert len(set(codes)) == len(codes)
    assert all(algorithm_from_code(algorithm.code) is algorithm for algorithm in Algorithm)
    with pytest.raises(ValueError):
        algorithm_from_code(99)


@pytest.mark.parametrize("dtype, expected", [("<u2", ("<", "u", 2)), (">i4", (">", "i", 4)), ("u1", ("<", "u", 1))])
def test_encoding_for_dtype(dtype, expected):
    encoding = Encoding.for_dtype(Algorithm.NONE, dtype)
    assert (encoding.byte_order, encoding.kind, encoding.elem_size) == expected
    assert encoding.dtype == np.dtype(dtype)


def test_stream_package_imports_only_its_allowed_dependencies():
    """DESIGN.md layer rule: stream/ imports numpy, cbor2, dectris.compression, lz4, stdlib."""
    allowed = {"numpy", "cbor2", "dectris", "lz4", "__future__"}
    package_dir = Path(stream.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{source.name} imports {name}"
