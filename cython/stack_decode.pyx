# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Decode a range of frames of a frame stack, straight from shared memory, with the GIL released.

The Python reference (``tango_dectris_live.stream.decode``) makes one ``dectris.compression``
call per frame, allocating a new bytes object each time; this loop reads each frame's compressed
bytes where the receiver put them and writes the pixels into the caller's array.

The decompressors are the ones the bitshuffle package has already loaded (``LZ4_decompress_safe``,
``ZSTD_decompress``, ``bshuf_untrans_bit_elem``), called through addresses resolved with ctypes
(``bitshuffle_functions()`` in decode.py) rather than linked at build time, like libzmq in
receiver.pyx: no library path or header at build time, and one copy of each library per process.

Why a block loop here instead of ``bshuf_decompress_lz4``: that function trusts the compressed
block sizes written in the blob, so a truncated or corrupt frame would make it read past the
frame (and past the end of the shared-memory segment); and it runs its blocks in an OpenMP
parallel region, whose thread start-up costs more than the decoding of a small frame and whose
threads compete with the receiver and the other workers. Every read below is bounded by the
frame's size in the index.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

from tango_dectris_live.stream.errors import CorruptFrameError, FrameSizeMismatchError, UnsupportedEncodingError

ctypedef int (*lz4_decompress_safe_fn)(const char*, char*, int, int) noexcept nogil
ctypedef size_t (*zstd_decompress_fn)(void*, size_t, const void*, size_t) noexcept nogil
ctypedef int64_t (*untrans_bit_elem_fn)(const void*, void*, size_t, size_t) noexcept nogil

# One index record per frame of a stack (numpy dtype FRAME_RECORD_DTYPE in framestack.py).
cdef struct FrameRecord:
    int64_t frame
    int64_t offset
    int64_t size
    int32_t encoding
    int32_t elem_size
    int32_t channels
    int32_t dtype_tag

FRAME_RECORD_BYTES = sizeof(FrameRecord)

# Frame encodings: tango_dectris_live.stream.Algorithm.code.
cdef enum:
    ENC_NONE = 0
    ENC_BSLZ4 = 1
    ENC_LZ4_RAW = 2
    ENC_LZ4_HDF5 = 3
    ENC_BSZSTD = 4

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
    R_FALLBACK = 1       # leave this frame to the Python reference path
    R_SHORT_HEADER = 2   # framed blob shorter than its 12-byte header
    R_DECLARED_SIZE = 3  # framed header declares another decompressed size
    R_RAW_SIZE = 4       # uncompressed blob of the wrong length
    R_CORRUPT = 5        # the compressed data does not decompress to the frame's size
    R_TRUNCATED = 6      # a block runs past the end of the blob
    R_UNKNOWN_ENCODING = 7
    R_OUTSIDE = 8        # the index points outside the stack's data area
    R_NO_CHANNEL = 9
    R_NO_MEMORY = 10

cdef const char* ALGORITHM_NAMES[5]
ALGORITHM_NAMES[0] = b"none"
ALGORITHM_NAMES[1] = b"bslz4"
ALGORITHM_NAMES[2] = b"lz4<"
ALGORITHM_NAMES[3] = b"lz4"
ALGORITHM_NAMES[4] = b"bszstd"


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


cdef inline uint32_t read_be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


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
    """Decodes frame records into an output array. Holds scratch buffers: one per thread.

    ``functions``: addresses of ``LZ4_decompress_safe``, ``bshuf_untrans_bit_elem`` and
    (optional, 0 when absent) ``ZSTD_decompress``. Bit-shuffled frames larger than
    ``bitshuffle_max_bytes`` (decompressed) are left to the Python reference.
    """
    cdef lz4_decompress_safe_fn f_lz4
    cdef untrans_bit_elem_fn f_untrans
    cdef zstd_decompress_fn f_zstd
    cdef uint8_t* block_scratch
    cdef size_t block_scratch_size
    cdef uint8_t* frame_scratch
    cdef size_t frame_scratch_size
    # details of the last failure, for the error message
    cdef int64_t fail_value
    cdef int64_t fail_limit
    cdef public size_t bitshuffle_max_bytes

    def __init__(self, functions: dict, size_t bitshuffle_max_bytes) -> None:
        self.bitshuffle_max_bytes = bitshuffle_max_bytes
        self.f_lz4 = <lz4_decompress_safe_fn><uintptr_t>functions["LZ4_decompress_safe"]
        self.f_untrans = <untrans_bit_elem_fn><uintptr_t>functions["bshuf_untrans_bit_elem"]
        self.f_zstd = <zstd_decompress_fn><uintptr_t>functions.get("ZSTD_decompress", 0)
        if self.f_lz4 == NULL or self.f_untrans == NULL:
            raise ValueError("the stack decoder needs LZ4_decompress_safe and bshuf_untrans_bit_elem")

    def __dealloc__(self):
        free(self.block_scratch)
        free(self.frame_scratch)

    cdef uint8_t* scratch(self, uint8_t** buffer, size_t* size, size_t needed) noexcept nogil:
        cdef uint8_t* grown
        if needed > size[0]:
            grown = <uint8_t*>realloc(buffer[0], needed)
            if grown == NULL:
                return NULL
            buffer[0] = grown
            size[0] = needed
        return buffer[0]

    cdef int decode_bitshuffled(self, const uint8_t* blob, size_t blob_size, int encoding,
                                size_t elem_size, size_t nbytes, uint8_t* dest) noexcept nogil:
        """bslz4 / bszstd after the 12-byte header: blocks of [uint32 BE size][data] that each
        decompress to ``block`` elements, bit-transposed; the last block holds the remaining
        whole multiple of 8 elements; the last ``elements % 8`` elements follow as raw bytes."""
        cdef size_t elements = nbytes // elem_size
        cdef size_t block_bytes = read_be32(blob + 8)
        cdef size_t block, this_block, this_bytes, done = 0, pos = 12, csize, leftover, got
        cdef uint8_t* tmp
        if block_bytes == 0 or block_bytes % elem_size != 0 or (block_bytes // elem_size) % 8 != 0:
            return R_FALLBACK  # a framing this loop does not expect: the reference decides
        if nbytes > self.bitshuffle_max_bytes:
            return R_FALLBACK  # dectris-compression's bit-unshuffle is faster on large frames
        block = block_bytes // elem_size
        if encoding == ENC_BSZSTD and self.f_zstd == NULL:
            return R_FALLBACK
        tmp = self.scratch(&self.block_scratch, &self.block_scratch_size,
                           (block if block < elements else elements) * elem_size + 8)
        if tmp == NULL:
            return R_NO_MEMORY
        while done < elements:
            this_block = elements - done
            if this_block >= block:
                this_block = block
            else:
                this_block -= this_block % 8
                if this_block == 0:
                    break
            this_bytes = this_block * elem_size
            if blob_size - pos < 4:
                self.fail_value = pos + 4
                self.fail_limit = blob_size
                return R_TRUNCATED
            csize = read_be32(blob + pos)
            pos += 4
            if csize > blob_size - pos:
                self.fail_value = pos + csize
                self.fail_limit = blob_size
                return R_TRUNCATED
            if encoding == ENC_BSLZ4:
                got = <size_t>self.f_lz4(<const char*>(blob + pos), <char*>tmp, <int>csize, <int>this_bytes)
            else:
                got = self.f_zstd(tmp, this_bytes, blob + pos, csize)
            if got != this_bytes:
                self.fail_value = done * elem_size
                return R_CORRUPT
            if self.f_untrans(tmp, dest + done * elem_size, this_block, elem_size) < 0:
                self.fail_value = done * elem_size
                return R_CORRUPT
            pos += csize
            done += this_block
        leftover = (elements - done) * elem_size
        if leftover:
            if blob_size - pos < leftover:
                self.fail_value = pos + leftover
                self.fail_limit = blob_size
                return R_TRUNCATED
            memcpy(dest + done * elem_size, blob + pos, leftover)
        return R_OK

    cdef int decode_lz4_hdf5(self, const uint8_t* blob, size_t blob_size, size_t nbytes,
                             uint8_t* dest) noexcept nogil:
        """v2 lz4 (HDF5 filter 32004) after the header: blocks of [uint32 BE size][data]; a block
        whose size equals its decompressed size is stored as it is."""
        cdef size_t block_bytes = read_be32(blob + 8)
        cdef size_t done = 0, pos = 12, csize, this_bytes
        if block_bytes == 0:
            return R_FALLBACK
        while done < nbytes:
            this_bytes = nbytes - done if nbytes - done < block_bytes else block_bytes
            if blob_size - pos < 4:
                self.fail_value = pos + 4
                self.fail_limit = blob_size
                return R_TRUNCATED
            csize = read_be32(blob + pos)
            pos += 4
            if csize > blob_size - pos:
                self.fail_value = pos + csize
                self.fail_limit = blob_size
                return R_TRUNCATED
            if csize == this_bytes:
                memcpy(dest + done, blob + pos, csize)
            elif <size_t>self.f_lz4(<const char*>(blob + pos), <char*>(dest + done), <int>csize,
                                    <int>this_bytes) != this_bytes:
                self.fail_value = done
                return R_CORRUPT
            pos += csize
            done += this_bytes
        return R_OK

    cdef int decode_one(self, const uint8_t* blob, size_t blob_size, int encoding, size_t elem_size,
                        size_t nbytes, uint8_t* dest) noexcept nogil:
        cdef uint64_t declared
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
        if encoding != ENC_BSLZ4 and encoding != ENC_LZ4_HDF5 and encoding != ENC_BSZSTD:
            return R_UNKNOWN_ENCODING
        if blob_size < 12:
            self.fail_value = blob_size
            return R_SHORT_HEADER
        declared = read_be64(blob)
        if declared != nbytes:
            self.fail_value = <int64_t>declared
            return R_DECLARED_SIZE
        if encoding == ENC_LZ4_HDF5:
            return self.decode_lz4_hdf5(blob, blob_size, nbytes, dest)
        return self.decode_bitshuffled(blob, blob_size, encoding, elem_size, nbytes, dest)

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
                    frame_buffer = self.scratch(&self.frame_scratch, &self.frame_scratch_size, nbytes)
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
            raise_decode_error(result, records + failed, nbytes, channel, self.fail_value, self.fail_limit)


cdef raise_decode_error(int result, const FrameRecord* record, size_t nbytes, int channel,
                        int64_t value, int64_t limit):
    where = f"frame {record.frame}"
    name = ALGORITHM_NAMES[record.encoding].decode() if 0 <= record.encoding <= 4 else "?"
    if result == R_SHORT_HEADER:
        raise CorruptFrameError(f"{where}: {name} blob of {value} bytes is shorter than its 12-byte header")
    if result == R_DECLARED_SIZE:
        raise FrameSizeMismatchError(f"{where}: {name} header declares {value} bytes, the frame needs {nbytes}")
    if result == R_RAW_SIZE:
        raise FrameSizeMismatchError(f"{where}: uncompressed data holds {value} bytes, the frame needs {nbytes}")
    if result == R_CORRUPT:
        raise CorruptFrameError(f"{where}: {name} data could not be decompressed "
                                f"(the block at decompressed byte {value} is damaged)")
    if result == R_TRUNCATED:
        raise CorruptFrameError(f"{where}: {name} data could not be decompressed (a block needs "
                                f"{value} bytes, the blob has {limit}: truncated)")
    if result == R_UNKNOWN_ENCODING:
        raise UnsupportedEncodingError(f"{where}: the frame index names an unknown encoding "
                                       f"(code {record.encoding})")
    if result == R_OUTSIDE:
        raise CorruptFrameError(f"{where}: the frame index points outside the frame stack "
                                f"(offset {record.offset}, size {record.size}); the stack is damaged")
    if result == R_NO_CHANNEL:
        raise IndexError(f"{where} has {max(record.channels, 1)} channel(s), no channel {channel}")
    if result == R_NO_MEMORY:
        raise MemoryError(f"{where}: no memory for a decoding buffer of {nbytes} bytes")
    raise RuntimeError(f"{where}: decoding failed with internal code {result}")
