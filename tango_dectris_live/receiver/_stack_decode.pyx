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

``StackDecoder.decode_blocks`` decodes frames without writing them out: it hands each decoded
bitshuffle block (8 KiB) to a consumer (a C function, ``block_sink_fn`` in _stack_decode.pxd) while
the block is still in the CPU cache, block by block across the frames it is given; the
processing's fused exact sums are such a consumer (processing/stack_sums.py). It calls LZ4 and
dectris-compression's ``bitshuf_decode_block`` per block, the two steps
``compression_decompress_buffer`` takes per block.

An earlier version decoded the bit-shuffled blocks itself with bitshuffle's exported LZ4 and
un-shuffle functions; dectris-compression's un-shuffle is about twice as fast at every frame size
(benchmarks/bench_decode.py: 96x96 uint16 bslz4 149k vs 319k frames/s per core, 512x512 4.2k vs
9.3k), so that loop is gone.
"""
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from tango_dectris_live.stream.errors import CorruptFrameError, FrameSizeMismatchError, UnsupportedEncodingError

ctypedef int (*lz4_decompress_safe_fn)(const char*, char*, int, int) noexcept nogil
# size_t compression_decompress_buffer(CompressionAlgorithm algorithm, char* dst, size_t dst_size,
#                                      const char* src, size_t src_size, size_t elem_size)
# returns the decompressed size, or SIZE_MAX when the data are damaged; dst_size 0 asks for the size.
ctypedef size_t (*dectris_decompress_fn)(int, char*, size_t, const char*, size_t, size_t) noexcept nogil
# int bitshuf_decode_block(char* out, const char* in, char* scratch, size_t size, size_t elem_size)
# un-shuffles one bitshuffle block of ``size`` elements (a multiple of 8); 0 on success. ``scratch``
# holds size * elem_size bytes. dectris-compression calls it on each LZ4-decompressed bslz4 block.
ctypedef int (*bitshuf_decode_block_fn)(char*, const char*, char*, size_t, size_t) noexcept nogil
# block_sink_fn, the consumer of decode_blocks, is declared in _stack_decode.pxd

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

# decode_blocks takes bslz4 frames block by block up to this block size (bitshuffle writes 8 KiB
# blocks); frames with larger blocks are decoded whole.
cdef enum:
    MAX_BLOCK_BYTES = 1 << 20

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


cdef inline uint32_t read_be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


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


cdef uint8_t* _grown(uint8_t** buffer, size_t* size, size_t needed) noexcept nogil:
    """``*buffer`` of at least ``needed`` bytes (grown with realloc, kept for the next call);
    NULL when memory runs out (``*buffer`` is then left as it was)."""
    cdef uint8_t* grown
    if needed > size[0]:
        grown = <uint8_t*>realloc(buffer[0], needed)
        if grown == NULL:
            return NULL
        buffer[0] = grown
        size[0] = needed
    return buffer[0]


cdef class StackDecoder:
    """Decodes frame records into an output array. Holds a scratch buffer (for frames whose pixel
    type differs from the output's): one decoder per thread.

    ``functions``: addresses of dectris-compression's ``compression_decompress_buffer`` and
    ``LZ4_decompress_safe``.
    """
    cdef dectris_decompress_fn f_dectris
    cdef lz4_decompress_safe_fn f_lz4
    cdef bitshuf_decode_block_fn f_unshuffle  # NULL: decode_blocks decodes whole frames only
    cdef uint8_t* frame_scratch
    cdef size_t frame_scratch_size
    cdef uint8_t* block_scratch  # decode_blocks: LZ4 output, un-shuffle scratch, decoded rows
    cdef size_t block_scratch_size
    cdef int64_t fail_value  # detail of the last failure, for the error message

    def __init__(self, functions: dict) -> None:
        self.f_dectris = <dectris_decompress_fn><uintptr_t>functions["compression_decompress_buffer"]
        self.f_lz4 = <lz4_decompress_safe_fn><uintptr_t>functions["LZ4_decompress_safe"]
        self.f_unshuffle = <bitshuf_decode_block_fn><uintptr_t>functions.get("bitshuf_decode_block", 0)
        if self.f_dectris == NULL or self.f_lz4 == NULL:
            raise ValueError("the stack decoder needs compression_decompress_buffer and LZ4_decompress_safe")

    def __dealloc__(self):
        free(self.frame_scratch)
        free(self.block_scratch)

    @property
    def decodes_blocks(self) -> bool:
        """Whether :meth:`decode_blocks` hands bslz4 frames over block by block (it was given
        ``bitshuf_decode_block``); without it, it hands over whole frames."""
        return self.f_unshuffle != NULL

    cdef uint8_t* blocks(self, size_t needed) noexcept nogil:
        return _grown(&self.block_scratch, &self.block_scratch_size, needed)

    cdef uint8_t* scratch(self, size_t needed) noexcept nogil:
        return _grown(&self.frame_scratch, &self.frame_scratch_size, needed)

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
        cdef size_t nbytes = 0, elem_size, begin, size
        cdef Py_ssize_t i, failed = -1
        cdef int src_kind, result = R_OK
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
                result = locate(record, base, segment_size, data_start, channel, &begin, &size)
                if result != R_OK:
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


    def decode_blocks(self, const uint8_t[::1] segment, Py_ssize_t slot_start, Py_ssize_t data_start,
                      Py_ssize_t frames, const int64_t[::1] positions, int out_kind, Py_ssize_t pixels,
                      int channel, uintptr_t sink, uintptr_t context, Py_ssize_t group_rows=4,
                      Py_ssize_t chunk_frames=32):
        """Decode the frames at the stack positions ``positions`` (of a slot of ``frames`` records
        at ``slot_start``, frame data from ``data_start``) and hand their pixels (type
        ``out_kind``, which must be every frame's own) to ``sink(context, ...)`` (a
        ``block_sink_fn``, see _stack_decode.pxd) instead of writing them out.

        bslz4 frames are decoded a bitshuffle block (8 KiB) at a time, for ``chunk_frames`` frames
        block after block (block 0 of each, then block 1 of each, ...) and handed over
        ``group_rows`` frames at a time: the decoded pixels and the consumer's share of its output
        (the pixels' range of a sum) stay in the L1 cache, and no decoded frame is ever written to
        memory. Other encodings (or bslz4 frames with another block size than the first) are
        decoded whole into a scratch frame and handed over as one piece. Raises ValueError for a
        frame whose pixel type is not ``out_kind``, and the stream error of the first frame that
        cannot be decoded (the consumer has then been given some of the frames)."""
        cdef const FrameRecord* records = <const FrameRecord*>(&segment[0] + slot_start)
        cdef const FrameRecord* record
        cdef const uint8_t* base = &segment[0]
        cdef size_t segment_size = segment.shape[0]
        cdef size_t elem_size = pixel_size(out_kind)
        cdef size_t nbytes = <size_t>pixels * elem_size
        cdef Py_ssize_t n = positions.shape[0], i, g, k, first, chunk_end, group, failed = -1
        cdef size_t begin, size, block_bytes = 0, frame_block, block, block_count, full_blocks, last_bytes
        cdef size_t leftover_bytes, piece, compressed
        cdef uint64_t declared
        cdef int result = R_OK
        cdef block_sink_fn consume = <block_sink_fn>sink
        cdef void* consumer = <void*>context
        cdef const uint8_t** cursor = NULL
        cdef const uint8_t** ends = NULL
        cdef ptrdiff_t* rows = NULL
        cdef ptrdiff_t* whole = NULL
        cdef Py_ssize_t blocked = 0, wholes = 0
        cdef uint8_t* lz4_out
        cdef uint8_t* unshuffle_scratch
        cdef uint8_t* decoded
        cdef uint8_t* frame_buffer
        cdef ptrdiff_t row
        if consume == NULL:
            raise ValueError("decode_blocks needs a consumer (sink address 0)")
        if out_kind < T_U8 or out_kind > T_F64:
            raise ValueError(f"unknown pixel type code {out_kind}")
        if group_rows < 1 or chunk_frames < group_rows:
            raise ValueError(f"group_rows {group_rows} and chunk_frames {chunk_frames}: "
                             "need 1 <= group_rows <= chunk_frames")
        if slot_start < 0 or frames < 0 or <size_t>(slot_start + frames * sizeof(FrameRecord)) > segment_size:
            raise ValueError("the frame index lies outside the shared-memory segment")
        for i in range(n):
            if not 0 <= positions[i] < frames:
                raise IndexError(f"stack position {positions[i]} is outside the stack of {frames} frames")
            record = records + positions[i]
            if pixel_type_of_tag(record.dtype_tag) != out_kind:
                raise ValueError(f"frame {record.frame} has pixel type tag {record.dtype_tag}, "
                                 f"not that of the requested pixel type (code {out_kind})")
        if n == 0 or pixels == 0:
            return
        cursor = <const uint8_t**>malloc(n * sizeof(uint8_t*))
        ends = <const uint8_t**>malloc(n * sizeof(uint8_t*))
        rows = <ptrdiff_t*>malloc(n * sizeof(ptrdiff_t))
        whole = <ptrdiff_t*>malloc(n * sizeof(ptrdiff_t))
        if cursor == NULL or ends == NULL or rows == NULL or whole == NULL:
            free(cursor)
            free(ends)
            free(rows)
            free(whole)
            raise MemoryError(f"no memory for the block decoder's bookkeeping of {n} frames")
        try:
            with nogil:
                # which frames go block by block (bslz4 with the first such frame's block size)
                for i in range(n):
                    record = records + positions[i]
                    result = locate(record, base, segment_size, data_start, channel, &begin, &size)
                    if result != R_OK:
                        failed = i
                        break
                    frame_block = 0
                    if (self.f_unshuffle != NULL and record.encoding == ENC_BSLZ4 and size >= 12
                            and read_be64(base + begin) == nbytes):
                        frame_block = read_be32(base + begin + 8)
                        if (frame_block == 0 or frame_block % (8 * elem_size) != 0 or frame_block > MAX_BLOCK_BYTES
                                or (block_bytes != 0 and frame_block != block_bytes)):
                            frame_block = 0
                    if frame_block != 0:
                        block_bytes = frame_block
                        cursor[i] = base + begin + 12
                        ends[i] = base + begin + size
                        rows[blocked] = i
                        blocked += 1
                    else:
                        whole[wholes] = i
                        wholes += 1
                # the others whole, through decode_one (which checks and reports as decode() does)
                if failed < 0 and wholes > 0:
                    frame_buffer = self.scratch(nbytes)
                    if frame_buffer == NULL:
                        result = R_NO_MEMORY
                        failed = whole[0]
                    for k in range(wholes if failed < 0 else 0):
                        row = whole[k]
                        record = records + positions[row]
                        locate(record, base, segment_size, data_start, channel, &begin, &size)
                        result = self.decode_one(base + begin, size, record.encoding, elem_size, nbytes, frame_buffer)
                        if result == R_FALLBACK:
                            result = R_CORRUPT  # LZ4 sizes beyond int: decode() leaves those to Python
                        if result != R_OK:
                            failed = row
                            break
                        consume(consumer, &whole[k], 1, 0, frame_buffer, pixels)
                if failed < 0 and blocked > 0:
                    # a bslz4 frame: full blocks, a shorter last block, then < 8 elements stored as they are
                    leftover_bytes = nbytes % (8 * elem_size)
                    full_blocks = nbytes // block_bytes
                    last_bytes = nbytes % block_bytes - leftover_bytes
                    block_count = full_blocks + (1 if last_bytes > 0 else 0)
                    lz4_out = self.blocks(2 * block_bytes + <size_t>group_rows * block_bytes + 64)
                    if lz4_out == NULL:
                        result = R_NO_MEMORY
                        failed = rows[0]
                    unshuffle_scratch = lz4_out + block_bytes
                    # 64-byte aligned rows for the consumer's vector loads
                    decoded = <uint8_t*>((<uintptr_t>(lz4_out + 2 * block_bytes) + 63) & ~(<uintptr_t>63))
                    first = 0
                    while failed < 0 and first < blocked:
                        chunk_end = min(blocked, first + chunk_frames)
                        for block in range(block_count):
                            piece = block_bytes if block < full_blocks else last_bytes
                            group = first
                            while group < chunk_end:
                                g = min(group_rows, chunk_end - group)
                                for k in range(g):
                                    row = rows[group + k]
                                    if ends[row] - cursor[row] < 4:
                                        failed = row
                                        break
                                    compressed = read_be32(cursor[row])
                                    if compressed > <size_t>(ends[row] - cursor[row] - 4) or compressed > 0x7E000000:
                                        failed = row
                                        break
                                    if (<size_t>self.f_lz4(<const char*>cursor[row] + 4, <char*>lz4_out,
                                                           <int>compressed, <int>piece) != piece
                                            or self.f_unshuffle(<char*>(decoded + k * piece), <const char*>lz4_out,
                                                                <char*>unshuffle_scratch, piece // elem_size,
                                                                elem_size) != 0):
                                        failed = row
                                        break
                                    cursor[row] += 4 + compressed
                                if failed >= 0:
                                    break
                                consume(consumer, rows + group, g, block * (block_bytes // elem_size), decoded,
                                        piece // elem_size)
                                group += g
                            if failed >= 0:
                                break
                        if failed < 0:
                            for k in range(first, chunk_end):
                                row = rows[k]
                                if <size_t>(ends[row] - cursor[row]) != leftover_bytes:
                                    failed = row
                                    break
                                if leftover_bytes > 0:
                                    memcpy(decoded, cursor[row], leftover_bytes)
                                    consume(consumer, rows + k, 1, (nbytes - leftover_bytes) // elem_size, decoded,
                                            leftover_bytes // elem_size)
                        first = chunk_end
                    if failed >= 0 and result == R_OK:
                        # the block loop is stricter than it reports: decode the frame whole for the
                        # reference's own error (the frame is damaged; say so if that passes)
                        frame_buffer = self.scratch(nbytes)
                        record = records + positions[failed]
                        locate(record, base, segment_size, data_start, channel, &begin, &size)
                        if frame_buffer == NULL:
                            result = R_NO_MEMORY
                        else:
                            result = self.decode_one(base + begin, size, record.encoding, elem_size, nbytes,
                                                     frame_buffer)
                        if result == R_OK:
                            self.fail_value = 0
                            result = R_CORRUPT
        finally:
            free(cursor)
            free(ends)
            free(rows)
            free(whole)
        if failed >= 0:
            raise_decode_error(result, records + positions[failed], nbytes, channel, self.fail_value)


cdef int locate(const FrameRecord* record, const uint8_t* base, size_t segment_size, Py_ssize_t data_start,
                int channel, size_t* begin_out, size_t* size_out) noexcept nogil:
    """Where the bytes of ``record``'s channel ``channel`` lie in the segment: R_OK and the range,
    or why they cannot be read (R_OUTSIDE, R_NO_CHANNEL)."""
    cdef size_t begin = <size_t>data_start + <size_t>record.offset
    cdef size_t size = <size_t>record.size
    cdef size_t skip
    cdef uint64_t channel_size = 0
    cdef int c
    if record.offset < 0 or record.size < 0 or begin > segment_size or size > segment_size - begin:
        return R_OUTSIDE
    if record.channels > 1:
        if channel < 0 or channel >= record.channels or size < 8 * <size_t>record.channels:
            return R_NO_CHANNEL
        skip = 8 * <size_t>record.channels
        for c in range(channel + 1):
            memcpy(&channel_size, base + begin + 8 * c, 8)
            if c < channel:
                skip += channel_size
        if skip > size or channel_size > size - skip:
            return R_OUTSIDE
        begin += skip
        size = channel_size
    elif channel != 0:
        return R_NO_CHANNEL
    begin_out[0] = begin
    size_out[0] = size
    return R_OK


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
