# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Decode a range of frames of a frame stack, straight from shared memory, with the GIL released.

The Python reference (``tango_dectris_live.stream.decode``) makes one ``dectris.compression``
call per frame, allocating a new bytes object each time; this loop reads each frame's compressed
bytes where the receiver put them and writes the pixels into the caller's array.

The HDF5-framed formats (bslz4, bszstd, v2 lz4) are decoded by DECTRIS's own C decompressor,
``compression_decompress_buffer``, the function ``dectris.compression.decompress`` wraps: called
here with the frame's bytes in shared memory as its source and the output row as its destination,
it costs one C call per frame instead of a Python call, a bytes allocation and a copy. It bounds
every read by the blob size it is given, so a damaged frame cannot make it read past its end.

Both C functions (``compression_decompress_buffer``, and ``LZ4_decompress_safe`` for the v1 raw
LZ4 block, which has no framing) are the ones the dectris.compression extension has already loaded,
called through addresses resolved with ctypes (``decoder_functions()`` in decode.py) rather than
linked at build time, like libzmq in _receiver.pyx: no library path or header at build time, and one
copy of each library per process.

An earlier version decoded the bit-shuffled blocks itself with bitshuffle's exported LZ4 and
un-shuffle functions; dectris-compression's un-shuffle is about twice as fast at every frame size
(benchmarks/bench_decode.py: 96x96 uint16 bslz4 149k vs 319k frames/s per core, 512x512 4.2k vs
9.3k), so that loop is gone.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

from tango_dectris_live.stream.errors import CorruptFrameError, FrameSizeMismatchError, UnsupportedEncodingError

ctypedef int (*lz4_decompress_safe_fn)(const char*, char*, int, int) noexcept nogil
# size_t compression_decompress_buffer(CompressionAlgorithm algorithm, char* dst, size_t dst_size,
#                                      const char* src, size_t src_size, size_t elem_size)
# returns the decompressed size, or SIZE_MAX when the data are damaged; dst_size 0 asks for the size.
ctypedef size_t (*dectris_decompress_fn)(int, char*, size_t, const char*, size_t, size_t) noexcept nogil

from tango_dectris_live.receiver._frame_index cimport (ENC_BSLZ4, ENC_BSZSTD, ENC_LZ4_HDF5, ENC_LZ4_RAW, ENC_NONE,
                                                    FrameRecord)

FRAME_RECORD_BYTES = sizeof(FrameRecord)

# Pixel types this loop converts between (little-endian, as the frame index stores them).
cdef enum:
    T_UNKNOWN = 0
    T_U8 = 1
    T_U16 = 2
    T_U32 = 3
    T_U64 = 4
    T_I8 = 5
    T_I16 = 6
    T_I32 = 7
    T_I64 = 8
    T_F32 = 9
    T_F64 = 10

PIXEL_TYPES = {"uint8": T_U8, "uint16": T_U16, "uint32": T_U32, "uint64": T_U64, "int8": T_I8,
               "int16": T_I16, "int32": T_I32, "int64": T_I64, "float32": T_F32, "float64": T_F64}

# What decode_one() returns.
cdef enum:
    R_OK = 0
    R_FALLBACK = 1       # leave this frame to the Python reference path (pixel types)
    R_SHORT_HEADER = 2   # framed blob shorter than its 12-byte header
    R_DECLARED_SIZE = 3  # framed header declares another decompressed size
    R_RAW_SIZE = 4       # uncompressed blob of the wrong length
    R_CORRUPT = 5        # the raw LZ4 block does not decompress to the frame's size
    R_UNKNOWN_ENCODING = 7
    R_OUTSIDE = 8        # the index points outside the stack's data area
    R_NO_CHANNEL = 9
    R_NO_MEMORY = 10
    R_REJECTED = 11      # dectris-compression rejects the data (damaged or truncated)

cdef const char* ALGORITHM_NAMES[5]
ALGORITHM_NAMES[0] = b"none"
ALGORITHM_NAMES[1] = b"bslz4"
ALGORITHM_NAMES[2] = b"lz4<"
ALGORITHM_NAMES[3] = b"lz4"
ALGORITHM_NAMES[4] = b"bszstd"

# dectris-compression's CompressionAlgorithm values (checked by the tests, which decode every
# framed encoding through this path).
cdef enum:
    DECTRIS_BSLZ4 = 0
    DECTRIS_LZ4_HDF5 = 1
    DECTRIS_BSZSTD = 2


cdef inline int pixel_type_of_tag(int32_t tag) noexcept nogil:
    """RFC 8746 typed-array tag -> T_*; big-endian and half-float tags are left to Python."""
    if tag == 64:
        return T_U8
    if tag == 69:
        return T_U16
    if tag == 70:
        return T_U32
    if tag == 71:
        return T_U64
    if tag == 72:
        return T_I8
    if tag == 77:
        return T_I16
    if tag == 78:
        return T_I32
    if tag == 79:
        return T_I64
    if tag == 85:
        return T_F32
    if tag == 86:
        return T_F64
    return T_UNKNOWN


cdef inline size_t pixel_size(int kind) noexcept nogil:
    if kind == T_U8 or kind == T_I8:
        return 1
    if kind == T_U16 or kind == T_I16:
        return 2
    if kind == T_U32 or kind == T_I32 or kind == T_F32:
        return 4
    return 8


cdef inline uint64_t read_be64(const uint8_t* p) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    for i in range(8):
        value = (value << 8) | p[i]
    return value


ctypedef fused integer_pixel:
    uint8_t
    uint16_t
    uint32_t
    uint64_t
    int8_t
    int16_t
    int32_t
    int64_t


cdef void convert_from(const integer_pixel* src, void* dst, int dst_kind, Py_ssize_t n) noexcept nogil:
    """C casts, which are what numpy's unsafe casting does for integer sources."""
    cdef Py_ssize_t i
    if dst_kind == T_U8:
        for i in range(n):
            (<uint8_t*>dst)[i] = <uint8_t>src[i]
    elif dst_kind == T_U16:
        for i in range(n):
            (<uint16_t*>dst)[i] = <uint16_t>src[i]
    elif dst_kind == T_U32:
        for i in range(n):
            (<uint32_t*>dst)[i] = <uint32_t>src[i]
    elif dst_kind == T_U64:
        for i in range(n):
            (<uint64_t*>dst)[i] = <uint64_t>src[i]
    elif dst_kind == T_I8:
        for i in range(n):
            (<int8_t*>dst)[i] = <int8_t>src[i]
    elif dst_kind == T_I16:
        for i in range(n):
            (<int16_t*>dst)[i] = <int16_t>src[i]
    elif dst_kind == T_I32:
        for i in range(n):
            (<int32_t*>dst)[i] = <int32_t>src[i]
    elif dst_kind == T_I64:
        for i in range(n):
            (<int64_t*>dst)[i] = <int64_t>src[i]
    elif dst_kind == T_F32:
        for i in range(n):
            (<float*>dst)[i] = <float>src[i]
    elif dst_kind == T_F64:
        for i in range(n):
            (<double*>dst)[i] = <double>src[i]


cdef bint convert(const void* src, int src_kind, void* dst, int dst_kind, Py_ssize_t n) noexcept nogil:
    """Convert ``n`` pixels; False for a pair this loop does not convert (float sources)."""
    if src_kind == T_U8:
        convert_from(<const uint8_t*>src, dst, dst_kind, n)
    elif src_kind == T_U16:
        convert_from(<const uint16_t*>src, dst, dst_kind, n)
    elif src_kind == T_U32:
        convert_from(<const uint32_t*>src, dst, dst_kind, n)
    elif src_kind == T_U64:
        convert_from(<const uint64_t*>src, dst, dst_kind, n)
    elif src_kind == T_I8:
        convert_from(<const int8_t*>src, dst, dst_kind, n)
    elif src_kind == T_I16:
        convert_from(<const int16_t*>src, dst, dst_kind, n)
    elif src_kind == T_I32:
        convert_from(<const int32_t*>src, dst, dst_kind, n)
    elif src_kind == T_I64:
        convert_from(<const int64_t*>src, dst, dst_kind, n)
    else:
        return False
    return True


cdef class StackDecoder:
    """Decodes frame records into an output array. Holds a scratch buffer (for frames whose pixel
    type differs from the output's): one decoder per thread.

    ``functions``: addresses of dectris-compression's ``compression_decompress_buffer`` and
    ``LZ4_decompress_safe``.
    """
    cdef dectris_decompress_fn f_dectris
    cdef lz4_decompress_safe_fn f_lz4
    cdef uint8_t* frame_scratch
    cdef size_t frame_scratch_size
    cdef int64_t fail_value  # detail of the last failure, for the error message

    def __init__(self, functions: dict) -> None:
        self.f_dectris = <dectris_decompress_fn><uintptr_t>functions["compression_decompress_buffer"]
        self.f_lz4 = <lz4_decompress_safe_fn><uintptr_t>functions["LZ4_decompress_safe"]
        if self.f_dectris == NULL or self.f_lz4 == NULL:
            raise ValueError("the stack decoder needs compression_decompress_buffer and LZ4_decompress_safe")

    def __dealloc__(self):
        free(self.frame_scratch)

    cdef uint8_t* scratch(self, size_t needed) noexcept nogil:
        cdef uint8_t* grown
        if needed > self.frame_scratch_size:
            grown = <uint8_t*>realloc(self.frame_scratch, needed)
            if grown == NULL:
                return NULL
            self.frame_scratch = grown
            self.frame_scratch_size = needed
        return self.frame_scratch

    cdef int decode_one(self, const uint8_t* blob, size_t blob_size, int encoding, size_t elem_size,
                        size_t nbytes, uint8_t* dest) noexcept nogil:
        cdef uint64_t declared
        cdef int algorithm
        if encoding == ENC_NONE:
            if blob_size != nbytes:
                self.fail_value = blob_size
                return R_RAW_SIZE
            memcpy(dest, blob, nbytes)
            return R_OK
        if encoding == ENC_LZ4_RAW:
            if nbytes > 0x7E000000 or blob_size > 0x7E000000:
                return R_FALLBACK  # beyond LZ4's int sizes
            if <size_t>self.f_lz4(<const char*>blob, <char*>dest, <int>blob_size, <int>nbytes) != nbytes:
                self.fail_value = 0
                return R_CORRUPT
            return R_OK
        if encoding == ENC_BSLZ4:
            algorithm = DECTRIS_BSLZ4
        elif encoding == ENC_BSZSTD:
            algorithm = DECTRIS_BSZSTD
        elif encoding == ENC_LZ4_HDF5:
            algorithm = DECTRIS_LZ4_HDF5
        else:
            return R_UNKNOWN_ENCODING
        # The header is checked here, as the reference does, for the specific message (and so
        # that a header declaring less than the frame cannot pass for a short decode).
        if blob_size < 12:
            self.fail_value = blob_size
            return R_SHORT_HEADER
        declared = read_be64(blob)
        if declared != nbytes:
            self.fail_value = <int64_t>declared
            return R_DECLARED_SIZE
        if self.f_dectris(algorithm, <char*>dest, nbytes, <const char*>blob, blob_size, elem_size) != nbytes:
            self.fail_value = blob_size
            return R_REJECTED
        return R_OK

    def decode(self, const uint8_t[::1] segment, Py_ssize_t slot_start, Py_ssize_t data_start,
               Py_ssize_t start, Py_ssize_t stop, uint8_t[:, ::1] out, int out_kind,
               Py_ssize_t pixels, int channel, uint8_t[::1] fallback):
        """Decode the records ``[start, stop)`` of the slot at ``slot_start`` (whose frame data
        begin at ``data_start``) into the rows of ``out`` (one row of ``pixels`` pixels of type
        ``out_kind`` per frame). Frames this loop leaves to the Python reference get
        ``fallback[i] = 1``. Raises the stream error of the first frame that cannot be decoded."""
        cdef const FrameRecord* records = <const FrameRecord*>(&segment[0] + slot_start)
        cdef const FrameRecord* record
        cdef const uint8_t* base = &segment[0]
        cdef size_t segment_size = segment.shape[0]
        cdef size_t out_elem = pixel_size(out_kind)
        cdef size_t nbytes = 0, elem_size, begin, size, skip
        cdef uint64_t channel_size
        cdef Py_ssize_t i, failed = -1
        cdef int src_kind, result = R_OK, c
        cdef uint8_t* dest
        cdef uint8_t* frame_buffer
        if out.shape[0] < stop - start or <size_t>out.shape[1] != pixels * out_elem:
            raise ValueError(f"output rows of {out.shape[1]} bytes cannot hold {pixels} pixels")
        if slot_start < 0 or <size_t>(slot_start + stop * sizeof(FrameRecord)) > segment_size:
            raise ValueError("the frame index lies outside the shared-memory segment")
        with nogil:
            for i in range(start, stop):
                record = records + i
                fallback[i - start] = 0
                src_kind = pixel_type_of_tag(record.dtype_tag)
                if src_kind == T_UNKNOWN or (src_kind != out_kind and not (T_U8 <= src_kind <= T_I64)):
                    fallback[i - start] = 1
                    continue
                elem_size = pixel_size(src_kind)
                nbytes = <size_t>pixels * elem_size
                begin = <size_t>data_start + <size_t>record.offset
                size = <size_t>record.size
                if record.offset < 0 or record.size < 0 or begin > segment_size or size > segment_size - begin:
                    result = R_OUTSIDE
                    failed = i
                    break
                if record.channels > 1:
                    if channel < 0 or channel >= record.channels or size < 8 * <size_t>record.channels:
                        result = R_NO_CHANNEL
                        failed = i
                        break
                    skip = 8 * <size_t>record.channels
                    for c in range(channel + 1):
                        memcpy(&channel_size, base + begin + 8 * c, 8)
                        if c < channel:
                            skip += channel_size
                    if skip > size or channel_size > size - skip:
                        result = R_OUTSIDE
                        failed = i
                        break
                    begin += skip
                    size = channel_size
                elif channel != 0:
                    result = R_NO_CHANNEL
                    failed = i
                    break
                dest = &out[i - start, 0]
                if src_kind == out_kind:
                    result = self.decode_one(base + begin, size, record.encoding, elem_size, nbytes, dest)
                else:
                    frame_buffer = self.scratch(nbytes)
                    if frame_buffer == NULL:
                        result = R_NO_MEMORY
                    else:
                        result = self.decode_one(base + begin, size, record.encoding, elem_size, nbytes,
                                                 frame_buffer)
                        if result == R_OK:
                            convert(frame_buffer, src_kind, dest, out_kind, pixels)
                if result == R_FALLBACK:
                    fallback[i - start] = 1
                    result = R_OK
                elif result != R_OK:
                    failed = i
                    break
        if failed >= 0:
            raise_decode_error(result, records + failed, nbytes, channel, self.fail_value)


cdef raise_decode_error(int result, const FrameRecord* record, size_t nbytes, int channel, int64_t value):
    where = f"frame {record.frame}"
    name = ALGORITHM_NAMES[record.encoding].decode() if 0 <= record.encoding <= 4 else "?"
    if result == R_SHORT_HEADER:
        raise CorruptFrameError(f"{where}: {name} blob of {value} bytes is shorter than its 12-byte header")
    if result == R_DECLARED_SIZE:
        raise FrameSizeMismatchError(f"{where}: {name} header declares {value} bytes, the frame needs {nbytes}")
    if result == R_RAW_SIZE:
        raise FrameSizeMismatchError(f"{where}: uncompressed data holds {value} bytes, the frame needs {nbytes}")
    if result == R_CORRUPT:
        raise CorruptFrameError(f"{where}: {name} data could not be decompressed (damaged or truncated)")
    if result == R_UNKNOWN_ENCODING:
        raise UnsupportedEncodingError(f"{where}: the frame index names an unknown encoding "
                                       f"(code {record.encoding})")
    if result == R_OUTSIDE:
        raise CorruptFrameError(f"{where}: the frame index points outside the frame stack "
                                f"(offset {record.offset}, size {record.size}); the stack is damaged")
    if result == R_NO_CHANNEL:
        raise IndexError(f"{where} has {max(record.channels, 1)} channel(s), no channel {channel}")
    if result == R_REJECTED:
        raise CorruptFrameError(f"{where}: {name} data could not be decompressed (dectris-compression "
                                f"rejects the {value}-byte blob: damaged or truncated)")
    if result == R_NO_MEMORY:
        raise MemoryError(f"{where}: no memory for a decoding buffer of {nbytes} bytes")
    raise RuntimeError(f"{where}: decoding failed with internal code {result}")
