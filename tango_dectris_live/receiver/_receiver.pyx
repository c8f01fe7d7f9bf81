# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The receiver's hot loop: ZeroMQ PULL -> shared-memory frame stacks, with the GIL released.

One :class:`StreamLoop` belongs to one receiver thread. ``pump()`` receives messages until
something needs Python (a stack to hand over, a slot to assign, a series header or end message,
an unexpected layout) and returns an event code; the Python side (``receiver.py``) reacts and
calls ``pump()`` again. Image messages that look as expected never touch the interpreter: their
header fields are read in C and their compressed bytes are copied once, from the ZeroMQ message
into the current slot.

Two transports bring the messages. ``zmtp`` (``attach()``): the loop reads a TCP socket itself,
megabytes per ``recv()``, and parses ZeroMQ's wire protocol (ZMTP 3 frames: a flags byte, a 1- or
8-byte size, the body) in place; a message's parts point into the read buffer, which is only
moved or grown when nothing points into it (after the message was placed or copied). ``libzmq``:
one ``zmq_msg_recv`` per part from pyzmq's socket, whose I/O thread did the reading.

libzmq is called through function pointers whose addresses are taken at run time (ctypes) from
the very library pyzmq has loaded. Why not link against libzmq at build time: the socket comes
from pyzmq, so the functions that use it must be the same libzmq instance (a second copy has its
own global state and would crash on a foreign socket), and pyzmq's bundled library has a hashed
file name (pyzmq.libs/libzmq-<hash>.so) that changes with every pyzmq wheel; resolving the
symbols through pyzmq's own extension module works for the bundled, the system and a statically
linked libzmq alike, on a fresh ``pip install -e .`` without any library path at build time.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove
from libc.errno cimport EAGAIN, EINTR, ECONNRESET, EPROTO, ENOMEM, errno
from posix.time cimport clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize


cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)

cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL

cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN


# libzmq's message and poll item layouts (zmq.h 4.x): a message is 64 opaque, pointer-aligned bytes.
cdef struct zmq_msg_t:
    void* _opaque[8]

cdef struct zmq_pollitem_t:
    void* socket
    int fd
    short events
    short revents

ctypedef int (*msg_init_fn)(zmq_msg_t*) noexcept nogil
ctypedef int (*msg_recv_fn)(zmq_msg_t*, void*, int) noexcept nogil
ctypedef int (*msg_close_fn)(zmq_msg_t*) noexcept nogil
ctypedef int (*msg_move_fn)(zmq_msg_t*, zmq_msg_t*) noexcept nogil
ctypedef void* (*msg_data_fn)(zmq_msg_t*) noexcept nogil
ctypedef size_t (*msg_size_fn)(zmq_msg_t*) noexcept nogil
ctypedef int (*msg_more_fn)(zmq_msg_t*) noexcept nogil
ctypedef int (*poll_fn)(zmq_pollitem_t*, int, long) noexcept nogil
ctypedef int (*errno_fn)() noexcept nogil

cdef enum:
    ZMQ_DONTWAIT = 1
    ZMQ_POLLIN = 1
    MAX_PARTS = 16
    MAX_CHANNELS = 16
    CBOR_MAX_DEPTH = 32

# A message within this many seconds means a stream is flowing (the receiver may nap, see run())
cdef double COALESCE_WINDOW = 0.001

from tango_dectris_live.receiver._frame_index cimport (ENC_BSLZ4, ENC_BSZSTD, ENC_LZ4_HDF5, ENC_LZ4_RAW, ENC_NONE,
                                                    FrameRecord)

FRAME_RECORD_BYTES = sizeof(FrameRecord)

ENCODING_IDS = {"none": ENC_NONE, "bslz4": ENC_BSLZ4, "lz4": ENC_LZ4_RAW,
                "lz4h5": ENC_LZ4_HDF5, "bszstd": ENC_BSZSTD}

# What pump() returns.
cdef enum:
    EV_IDLE = 0
    EV_STACK_READY = 1
    EV_NEED_SLOT = 2
    EV_MESSAGE = 3
    EV_SERIES_COMPLETE = 4
    EV_GROW = 5
    EV_SOCKET_ERROR = 6

EVENT_IDLE = EV_IDLE
EVENT_STACK_READY = EV_STACK_READY
EVENT_NEED_SLOT = EV_NEED_SLOT
EVENT_MESSAGE = EV_MESSAGE
EVENT_SERIES_COMPLETE = EV_SERIES_COMPLETE
EVENT_GROW = EV_GROW
EVENT_SOCKET_ERROR = EV_SOCKET_ERROR

# Why a message went to Python.
cdef enum:
    MSG_OTHER = 0        # not an image: header, end, unknown htype / type
    MSG_NEW_FORMAT = 1   # v1 image whose dimage_d part differs from the previous frame's
    MSG_FALLBACK = 2     # an image whose layout the C walker does not know

MESSAGE_OTHER = MSG_OTHER
MESSAGE_NEW_FORMAT = MSG_NEW_FORMAT
MESSAGE_FALLBACK = MSG_FALLBACK

# Counters kept in C; receiver.py names them.
cdef enum:
    C_FRAMES = 0
    C_BYTES = 1
    C_MESSAGES = 2
    C_DUPLICATE = 3
    C_OUT_OF_RANGE = 4
    C_WRONG_SERIES = 5
    C_STALE = 6
    C_NO_HEADER = 7
    C_TRUNCATED = 8
    C_SIZE_MISMATCH = 9
    C_OVERSIZE = 10
    C_SHAPE_MISMATCH = 11
    C_TOO_MANY_PARTS = 12
    C_ZMTP_COMMANDS = 13
    N_COUNTERS = 14

COUNTER_NAMES = ("frames", "bytes", "messages", "duplicate", "out_of_range", "wrong_series",
                 "stale", "no_header", "truncated", "size_mismatch", "oversize",
                 "shape_mismatch", "too_many_parts", "zmtp_commands")

# The ZMTP reader (see StreamLoop.attach): read buffer and frame limits.
cdef enum:
    ZMTP_FLAG_MORE = 1
    ZMTP_FLAG_LONG = 2
    ZMTP_FLAG_COMMAND = 4
    ZMTP_READ_BUFFER = 4 << 20   # bytes: what one recv() may take (grows for bigger messages)
    ZMTP_MIN_READ = 64 << 10     # compact the buffer when less than this is free at its end

# a frame (ZeroMQ part) larger than this is a protocol error: the connection is dropped
cdef uint64_t ZMTP_MAX_FRAME = (<uint64_t>1) << 32

# place_pending() results
cdef enum:
    PLACE_DONE = 0
    PLACE_DROPPED = 1
    PLACE_NEED_SLOT = 2
    PLACE_STACK_FULL = 3
    PLACE_GROW = 4
    PLACE_COMPLETE = 5

cdef const char* KEY_DIMAGE = b'"htype":"dimage-1.0"'
cdef const char* KEY_DCONFIG = b'"htype":"dconfig-1.0"'
cdef const char* KEY_DHEADER = b'"htype":"dheader-1.0"'
cdef const char* KEY_DSERIES_END = b'"htype":"dseries_end-1.0"'
cdef const char* KEY_FRAME = b'"frame":'
cdef const char* KEY_SERIES = b'"series":'
cdef const char* KEY_SIZE = b'"size":'


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int64_t json_int_after(const uint8_t* buf, size_t n, const char* key, size_t klen,
                                   size_t* end) noexcept nogil:
    """Non-negative integer after ``key`` (a quoted key with its colon) in compact JSON, or -1."""
    cdef const uint8_t* hit = <const uint8_t*>memmem(buf, n, key, klen)
    cdef size_t i
    cdef int64_t value = 0
    cdef int digits = 0
    if hit == NULL:
        return -1
    i = (hit - buf) + klen
    while i < n and buf[i] == 32:
        i += 1
    while i < n and 48 <= buf[i] <= 57 and digits < 19:
        value = value * 10 + (buf[i] - 48)
        digits += 1
        i += 1
    if digits == 0 or digits >= 19:
        return -1
    end[0] = i
    return value


cdef inline bint v1_starts_message(const uint8_t* p, size_t n) noexcept nogil:
    """Whether a part looks like the start of a v1 message (a JSON object with the htype of a
    header, image or end); the Python regrouper (stream/v1_framing.py) decides for sure."""
    if n < 2 or p[0] != 123:  # '{'
        return False
    return (memmem(p, n, KEY_DIMAGE, 20) != NULL or memmem(p, n, KEY_DHEADER, 21) != NULL
            or memmem(p, n, KEY_DSERIES_END, 25) != NULL)


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40) | (<uint64_t>p[3] << 32) |
            (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline int same_format(const uint8_t* a, size_t na, const uint8_t* b, size_t nb,
                            int64_t* size_b) noexcept nogil:
    """1 when two dimage_d parts are equal apart from the digits of ``"size":`` (the compressed
    size changes with every frame, the encoding, shape and type do not)."""
    cdef size_t ea = 0, eb = 0, pa, pb
    cdef int64_t sa = json_int_after(a, na, KEY_SIZE, 7, &ea)
    size_b[0] = json_int_after(b, nb, KEY_SIZE, 7, &eb)
    if sa < 0 or size_b[0] < 0:
        return na == nb and memcmp(a, b, na) == 0
    # prefix up to the first digit, then everything after the last digit
    pa = ea
    while pa > 0 and 48 <= a[pa - 1] <= 57:
        pa -= 1
    pb = eb
    while pb > 0 and 48 <= b[pb - 1] <= 57:
        pb -= 1
    if pa != pb or memcmp(a, b, pa) != 0:
        return 0
    return (na - ea) == (nb - eb) and memcmp(a + ea, b + eb, na - ea) == 0


# ---- a minimal CBOR walker for stream v2 image messages ---------------------------------------

cdef inline int cbor_head(const uint8_t* p, size_t n, size_t* pos, int* major,
                          uint64_t* arg) noexcept nogil:
    cdef uint8_t b, info
    cdef size_t k, extra
    if pos[0] >= n:
        return -1
    b = p[pos[0]]
    pos[0] += 1
    major[0] = b >> 5
    info = b & 31
    if info < 24:
        arg[0] = info
        return 0
    if info > 27:  # indefinite lengths and reserved values: leave them to the Python parser
        return -1
    extra = 1 << (info - 24)
    if n - pos[0] < extra:
        return -1
    arg[0] = 0
    for k in range(extra):
        arg[0] = (arg[0] << 8) | p[pos[0] + k]
    pos[0] += extra
    return 0


cdef int cbor_skip(const uint8_t* p, size_t n, size_t* pos, int depth) noexcept nogil:
    cdef int major
    cdef uint64_t arg, i
    if depth > CBOR_MAX_DEPTH or cbor_head(p, n, pos, &major, &arg) < 0:
        return -1
    if major == 2 or major == 3:
        if arg > n - pos[0]:
            return -1
        pos[0] += arg
    elif major == 4:
        for i in range(arg):
            if cbor_skip(p, n, pos, depth + 1) < 0:
                return -1
    elif major == 5:
        for i in range(2 * arg):
            if cbor_skip(p, n, pos, depth + 1) < 0:
                return -1
    elif major == 6:
        return cbor_skip(p, n, pos, depth + 1)
    return 0


cdef inline int cbor_text(const uint8_t* p, size_t n, size_t* pos, const uint8_t** text,
                          size_t* tlen) noexcept nogil:
    cdef int major
    cdef uint64_t arg
    if cbor_head(p, n, pos, &major, &arg) < 0 or major != 3 or arg > n - pos[0]:
        return -1
    text[0] = p + pos[0]
    tlen[0] = arg
    pos[0] += arg
    return 0


cdef inline bint text_is(const uint8_t* text, size_t tlen, const char* name, size_t nlen) noexcept nogil:
    return tlen == nlen and memcmp(text, name, nlen) == 0


cdef inline int cbor_uint(const uint8_t* p, size_t n, size_t* pos, uint64_t* value) noexcept nogil:
    cdef int major
    if cbor_head(p, n, pos, &major, value) < 0 or major != 0:
        return -1
    return 0


cdef struct V2Image:
    int64_t series
    int64_t frame
    int channels
    int64_t height
    int64_t width
    int32_t encoding
    int32_t elem_size
    int32_t dtype_tag
    const uint8_t* data[MAX_CHANNELS]
    size_t size[MAX_CHANNELS]


cdef int v2_channel(const uint8_t* p, size_t n, size_t* pos, V2Image* img) noexcept nogil:
    """One ``data`` value: tag 40 [[h, w], tag 64..87? (tag 56500 [alg, elem, bytes] | bytes)]."""
    cdef int major
    cdef uint64_t arg, h, w, elem
    cdef int32_t encoding, elem_size = 0, dtype_tag = 0
    cdef const uint8_t* name
    cdef size_t name_len
    cdef int c = img.channels
    if c >= MAX_CHANNELS:
        return -1
    if cbor_head(p, n, pos, &major, &arg) < 0 or major != 6 or arg != 40:
        return -1
    if cbor_head(p, n, pos, &major, &arg) < 0 or major != 4 or arg != 2:
        return -1
    if cbor_head(p, n, pos, &major, &arg) < 0 or major != 4 or arg != 2:
        return -1
    if cbor_uint(p, n, pos, &h) < 0 or cbor_uint(p, n, pos, &w) < 0:
        return -1
    if cbor_head(p, n, pos, &major, &arg) < 0:
        return -1
    if major == 6 and 64 <= arg <= 87:
        dtype_tag = <int32_t>arg
        # RFC 8746: the element size is encoded in the tag's low bits
        elem_size = 1 << (((arg >> 4) & 1) + (arg & 3))
        if cbor_head(p, n, pos, &major, &arg) < 0:
            return -1
    else:
        return -1  # no typed-array tag: the pixel type is unknown here, Python decides
    if major == 6 and arg == 56500:
        if cbor_head(p, n, pos, &major, &arg) < 0 or major != 4 or arg != 3:
            return -1
        if cbor_text(p, n, pos, &name, &name_len) < 0:
            return -1
        if text_is(name, name_len, b"bslz4", 5):
            encoding = ENC_BSLZ4
        elif text_is(name, name_len, b"lz4", 3):
            encoding = ENC_LZ4_HDF5
        elif text_is(name, name_len, b"bszstd", 6):
            encoding = ENC_BSZSTD
        else:
            return -1
        if cbor_uint(p, n, pos, &elem) < 0:
            return -1
        if elem != 0:
            elem_size = <int32_t>elem
        if cbor_head(p, n, pos, &major, &arg) < 0 or major != 2 or arg > n - pos[0]:
            return -1
    elif major == 2:
        encoding = ENC_NONE
        if arg > n - pos[0]:
            return -1
    else:
        return -1
    if c == 0:
        img.height = <int64_t>h
        img.width = <int64_t>w
        img.encoding = encoding
        img.elem_size = elem_size
        img.dtype_tag = dtype_tag
    elif <int64_t>h != img.height or <int64_t>w != img.width or encoding != img.encoding:
        return -1  # channels that differ in layout: the Python parser decides
    img.data[c] = p + pos[0]
    img.size[c] = arg
    pos[0] += arg
    img.channels += 1
    return 0


cdef int v2_walk(const uint8_t* p, size_t n, V2Image* img) noexcept nogil:
    """0: an image parsed into ``img``; 1: a message for Python (start, end); -1: fall back."""
    cdef size_t pos = 3
    cdef int major
    cdef uint64_t entries, i, channels, c, value
    cdef const uint8_t* key
    cdef size_t key_len
    img.series = -1
    img.frame = -1
    img.channels = 0
    img.height = 0
    img.width = 0
    img.encoding = ENC_NONE
    img.elem_size = 0
    img.dtype_tag = 0
    if n < 4 or p[0] != 0xd9 or p[1] != 0xd9 or p[2] != 0xf7:
        return -1
    if cbor_head(p, n, &pos, &major, &entries) < 0 or major != 5 or entries == 0:
        return -1
    if cbor_text(p, n, &pos, &key, &key_len) < 0 or not text_is(key, key_len, b"type", 4):
        return -1
    if cbor_text(p, n, &pos, &key, &key_len) < 0:
        return -1
    if not text_is(key, key_len, b"image", 5):
        return 1
    for i in range(1, entries):
        if cbor_text(p, n, &pos, &key, &key_len) < 0:
            return -1
        if text_is(key, key_len, b"series_id", 9):
            if cbor_uint(p, n, &pos, &value) < 0:
                return -1
            img.series = <int64_t>value
        elif text_is(key, key_len, b"image_id", 8):
            if cbor_uint(p, n, &pos, &value) < 0:
                return -1
            img.frame = <int64_t>value
        elif text_is(key, key_len, b"data", 4):
            if cbor_head(p, n, &pos, &major, &channels) < 0 or major != 5:
                return -1
            for c in range(channels):
                if cbor_skip(p, n, &pos, 1) < 0:  # the channel name
                    return -1
                if v2_channel(p, n, &pos, img) < 0:
                    return -1
        elif cbor_skip(p, n, &pos, 0) < 0:
            return -1
    if img.series < 0 or img.frame < 0 or img.channels == 0:
        return -1
    return 0


cdef class StreamLoop:
    """ZeroMQ PULL socket -> frame stacks in one shared-memory segment; see the module docstring.

    ``functions``: addresses of the libzmq entry points (``libzmq_functions()`` in receiver.py);
    the messages come from ``attach()``'s TCP socket or ``set_socket()``'s libzmq socket;
    ``memory``: the shared-memory buffer of all
    slots; ``slot_bytes`` the stride of one slot, whose first ``frames_per_stack`` records are the
    index and the rest (``data_bytes``) the frames' compressed bytes.
    """
    cdef msg_init_fn f_init
    cdef msg_recv_fn f_recv
    cdef msg_close_fn f_close
    cdef msg_move_fn f_move
    cdef msg_data_fn f_data
    cdef msg_size_fn f_size
    cdef msg_more_fn f_more
    cdef poll_fn f_poll
    cdef errno_fn f_errno
    cdef void* socket
    cdef bint stream_v2

    cdef object memory_view
    cdef uint8_t* base
    cdef Py_ssize_t slot_bytes, data_bytes, frames_per_stack, index_bytes, num_slots

    # the stack being filled
    cdef int cur_slot
    cdef Py_ssize_t cur_frames, cur_used
    cdef int64_t cur_first, cur_last
    cdef double cur_opened_at
    cdef public double max_latency

    # the series being received
    cdef readonly int64_t active_series, armed_series, last_finished_series
    cdef readonly int64_t expected_frames, received_frames
    cdef object bitmap_view
    cdef uint8_t* bitmap
    cdef int64_t bitmap_len
    cdef int64_t expect_height, expect_width

    # v1: the dimage_d part of the previous frame and what it means
    cdef bytes v1_format
    cdef const uint8_t* v1_format_data  # points into v1_format, read without the GIL
    cdef size_t v1_format_size
    cdef int32_t v1_encoding, v1_elem_size, v1_dtype_tag

    # the frame waiting for a place (kept in its ZeroMQ message or a Python object)
    cdef bint has_pending, pending_in_msg
    cdef zmq_msg_t pending_msg
    cdef object pending_object
    cdef int64_t pending_frame
    cdef int32_t pending_encoding, pending_elem_size, pending_dtype_tag
    cdef int pending_channels
    cdef const uint8_t* pending_data[MAX_CHANNELS]
    cdef size_t pending_size[MAX_CHANNELS]

    cdef zmq_msg_t parts[MAX_PARTS]
    cdef int nparts
    # the parts of the message being processed, whichever transport brought them
    cdef const uint8_t* pdata[MAX_PARTS]
    cdef size_t psize[MAX_PARTS]

    # the ZMTP reader (attach()): a connected TCP socket read directly instead of libzmq's socket;
    # rbuf[rstart:rend] are bytes read but not consumed, rneed how many from rstart the message
    # being parsed needs
    cdef int fd
    cdef uint8_t* rbuf
    cdef size_t rcap, rstart, rend, rneed
    cdef bint pending_in_buffer
    cdef object message_parts
    cdef public int message_kind
    cdef public int socket_errno
    cdef public double last_message_at
    cdef double coalesce
    # set by receiver.py while its v1 regrouper holds parts of an unfinished message, a header
    # waiting for its appendix or messages not taken yet (or while it waits for a series' end):
    # every message then goes to Python, so that the stream is taken in order
    cdef public bint route_to_python
    # listening with a template (several receivers on one stream): an image of a series without
    # a header goes to Python, which may start that series from the template
    cdef public bint headerless_to_python
    # the last v1 message was an image without an appendix part (taken here, or by Python, which
    # sets it): a replay may send that appendix as the first part of the next ZeroMQ message
    cdef public bint follows_v1_image
    cdef public int64_t last_height, last_width
    cdef public int32_t last_dtype_tag, last_encoding
    cdef int64_t counts[N_COUNTERS]

    def __cinit__(self):
        self.cur_slot = -1
        self.active_series = -1
        self.armed_series = -1
        self.last_finished_series = -1
        self.has_pending = False
        self.base = NULL
        self.bitmap = NULL
        self.nparts = 0
        self.fd = -1
        self.rbuf = NULL
        self.rcap = self.rstart = self.rend = self.rneed = 0
        self.pending_in_buffer = False
        self.route_to_python = False
        self.headerless_to_python = False
        self.follows_v1_image = False

    def __dealloc__(self):
        free(self.rbuf)

    def __init__(self, dict functions, bint stream_v2, memory,
                 Py_ssize_t num_slots, Py_ssize_t slot_bytes, Py_ssize_t frames_per_stack,
                 double max_latency, double coalesce=0.0):
        cdef uint8_t[::1] view = memory
        cdef int i
        self.f_init = <msg_init_fn><uintptr_t>functions["zmq_msg_init"]
        self.f_recv = <msg_recv_fn><uintptr_t>functions["zmq_msg_recv"]
        self.f_close = <msg_close_fn><uintptr_t>functions["zmq_msg_close"]
        self.f_move = <msg_move_fn><uintptr_t>functions["zmq_msg_move"]
        self.f_data = <msg_data_fn><uintptr_t>functions["zmq_msg_data"]
        self.f_size = <msg_size_fn><uintptr_t>functions["zmq_msg_size"]
        self.f_more = <msg_more_fn><uintptr_t>functions["zmq_msg_more"]
        self.f_poll = <poll_fn><uintptr_t>functions["zmq_poll"]
        self.f_errno = <errno_fn><uintptr_t>functions["zmq_errno"]
        self.socket = NULL
        self.stream_v2 = stream_v2
        self.coalesce = coalesce  # seconds, checked by StreamReceiver
        self.index_bytes = frames_per_stack * sizeof(FrameRecord)
        if slot_bytes <= self.index_bytes or num_slots * slot_bytes > view.shape[0]:
            raise ValueError(f"shared memory of {view.shape[0]} bytes cannot hold {num_slots} slots "
                             f"of {slot_bytes} bytes with {frames_per_stack} frames each")
        self.memory_view = view
        self.base = &view[0]
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.data_bytes = slot_bytes - self.index_bytes
        self.frames_per_stack = frames_per_stack
        self.max_latency = max_latency
        self.f_init(&self.pending_msg)
        for i in range(MAX_PARTS):
            self.f_init(&self.parts[i])
        for i in range(N_COUNTERS):
            self.counts[i] = 0

    def close(self):
        """Release the ZeroMQ messages still held and the shared-memory view (before unlinking)."""
        cdef int i
        self.drop_pending()
        if self.base != NULL:
            for i in range(MAX_PARTS):
                self.f_close(&self.parts[i])
            self.f_close(&self.pending_msg)
        self.base = NULL
        self.memory_view = None
        self.bitmap = NULL
        self.bitmap_view = None
        self.cur_slot = -1

    # ---- control from receiver.py (receiver thread, GIL held) -----------------------------------

    def attach(self, int fd):
        """Read ZMTP frames from ``fd`` from now on, instead of the libzmq socket: a connected,
        non-blocking TCP socket whose ZMTP handshake is done (``zmtp.py``), owned by the caller."""
        if self.rbuf == NULL:
            self.rbuf = <uint8_t*>malloc(ZMTP_READ_BUFFER)
            if self.rbuf == NULL:
                raise MemoryError("no memory for the ZMTP read buffer")
            self.rcap = ZMTP_READ_BUFFER
        self.drop_pending()
        self.nparts = 0
        self.rstart = self.rend = self.rneed = 0
        self.fd = fd

    def detach(self):
        """Stop reading the attached socket (the caller closes it); returns how many bytes of an
        unfinished message were dropped with it."""
        cdef size_t dropped = self.rend - self.rstart
        self.drop_pending()
        self.nparts = 0
        self.rstart = self.rend = self.rneed = 0
        self.fd = -1
        return dropped

    @property
    def attached(self):
        return self.fd >= 0

    def set_socket(self, uintptr_t socket_address):
        """Read this libzmq socket (``zmq.Socket.underlying``) when no ZMTP socket is attached."""
        self.socket = <void*>socket_address

    def set_slot(self, int slot):
        """Start filling ``slot`` (free, owned by the receiver from now on)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        self.cur_slot = slot
        self.cur_frames = 0
        self.cur_used = 0
        self.cur_first = -1
        self.cur_last = -1

    def take_stack(self):
        """Close the current stack: ``(slot, frames, first_frame, last_frame)``, or None if empty."""
        if self.cur_slot < 0 or self.cur_frames == 0:
            return None
        result = (self.cur_slot, self.cur_frames, self.cur_first, self.cur_last)
        self.cur_slot = -1
        self.cur_frames = 0
        return result

    @property
    def current_slot(self):
        return self.cur_slot

    @property
    def current_frames(self):
        return self.cur_frames

    def arm(self, int64_t series):
        """Which series is expected (-1: any, passive mode); used to tell stale from wrong."""
        self.armed_series = series

    def begin_series(self, int64_t series, int64_t expected_frames, uint8_t[::1] received,
                     int64_t height, int64_t width):
        """Accept the frames of ``series``; ``received`` is the per-frame bitmap (zeroed);
        ``expected_frames`` 0 when the header does not say (the bitmap then grows)."""
        self.active_series = series
        self.expected_frames = expected_frames
        self.received_frames = 0
        self.set_bitmap(received)
        self.expect_height = height
        self.expect_width = width
        self.v1_format = None
        self.v1_format_data = NULL

    def set_bitmap(self, uint8_t[::1] received):
        self.bitmap_view = received
        self.bitmap = &received[0] if received.shape[0] > 0 else NULL
        self.bitmap_len = received.shape[0]

    def end_series(self):
        """Stop accepting the active series; its late messages count as stale from now on."""
        if self.active_series >= 0:
            self.last_finished_series = self.active_series
        self.active_series = -1
        self.bitmap = NULL
        self.bitmap_view = None
        self.v1_format = None
        self.v1_format_data = NULL
        self.drop_pending()

    @property
    def pending_frame(self):
        return self.pending_frame if self.has_pending else -1

    def set_v1_format(self, bytes dimage_d, int encoding, int elem_size, int dtype_tag):
        """The v1 dimage_d part that the following frames share (parsed by Python)."""
        self.v1_format = dimage_d
        self.v1_format_data = <const uint8_t*><const char*>dimage_d
        self.v1_format_size = len(dimage_d)
        self.v1_encoding = encoding
        self.v1_elem_size = elem_size
        self.v1_dtype_tag = dtype_tag

    def offer_frame(self, int64_t series, int64_t frame, list blobs, int encoding,
                    int elem_size, int dtype_tag):
        """A frame parsed by Python: checked like a C-parsed one and held until pump() places it.
        Returns False when it was dropped (wrong series; counted)."""
        cdef int reason = self.series_problem(series)
        cdef int i
        cdef const uint8_t[::1] view
        if reason >= 0:
            self.counts[reason] += 1
            return False
        if len(blobs) == 0 or len(blobs) > MAX_CHANNELS:
            raise ValueError(f"a frame needs 1..{MAX_CHANNELS} channel blobs, got {len(blobs)}")
        self.drop_pending()
        self.pending_object = blobs
        for i in range(len(blobs)):
            view = blobs[i]
            self.pending_data[i] = &view[0] if view.shape[0] else <const uint8_t*>b""
            self.pending_size[i] = view.shape[0]
        self.pending_channels = len(blobs)
        self.pending_frame = frame
        self.pending_encoding = encoding
        self.pending_elem_size = elem_size
        self.pending_dtype_tag = dtype_tag
        self.pending_in_msg = False
        self.has_pending = True
        return True

    def place_offered(self):
        """Place the frame :meth:`offer_frame` took, as :meth:`pump` would, without reading the
        socket: an EVENT_* code to act on (then call again), EVENT_IDLE once it is placed or
        dropped."""
        cdef int event
        if self.base == NULL:
            raise RuntimeError("the stream loop is closed")
        if not self.has_pending:
            return EV_IDLE
        event = self.event_of(self.place_pending())
        return EV_IDLE if event < 0 else event

    def drop_pending(self):
        if self.has_pending and self.pending_in_msg:
            self.f_close(&self.pending_msg)
            self.f_init(&self.pending_msg)
        self.has_pending = False
        self.pending_in_msg = False
        self.pending_in_buffer = False
        self.pending_object = None

    def take_message(self):
        """The parts (bytes) of the message pump() handed to Python, and why."""
        parts = self.message_parts
        self.message_parts = None
        return parts

    def count(self, int counter):
        self.counts[counter] += 1

    def counters(self):
        return [self.counts[i] for i in range(N_COUNTERS)]

    # ---- the hot loop ---------------------------------------------------------------------------

    def pump(self, double max_wait):
        """Receive for at most ``max_wait`` seconds; returns an EVENT_* code."""
        cdef int event
        if self.base == NULL:
            raise RuntimeError("the stream loop is closed")
        with nogil:
            event = self.run(max_wait)
        return event

    cdef inline int series_problem(self, int64_t series) noexcept nogil:
        """-1 when frames of ``series`` are accepted now, else the counter that explains why not."""
        if self.active_series >= 0:
            if series == self.active_series:
                return -1
            if series == self.last_finished_series or series < self.active_series:
                return C_STALE
            return C_WRONG_SERIES
        if series == self.last_finished_series:
            return C_STALE
        if self.armed_series >= 0 and series != self.armed_series:
            return C_STALE if series < self.armed_series else C_WRONG_SERIES
        return C_NO_HEADER

    cdef int place_pending(self) noexcept nogil:
        cdef int64_t frame = self.pending_frame
        cdef Py_ssize_t total = 0, offset
        cdef int c, channels = self.pending_channels
        cdef FrameRecord* record
        cdef uint8_t* dest
        cdef uint64_t length
        for c in range(channels):
            total += self.pending_size[c]
        if channels > 1:
            total += 8 * channels  # a table of the channels' sizes precedes their bytes
        if frame < 0 or (self.expected_frames > 0 and frame >= self.expected_frames):
            self.counts[C_OUT_OF_RANGE] += 1
            self.release_pending()
            return PLACE_DROPPED
        if frame >= self.bitmap_len:
            return PLACE_GROW
        if self.bitmap[frame]:
            self.counts[C_DUPLICATE] += 1
            self.release_pending()
            return PLACE_DROPPED
        if total > self.data_bytes:
            self.counts[C_OVERSIZE] += 1
            self.release_pending()
            return PLACE_DROPPED
        if self.cur_slot < 0:
            return PLACE_NEED_SLOT
        offset = (self.cur_used + 7) & ~(<Py_ssize_t>7)
        if self.cur_frames >= self.frames_per_stack or offset + total > self.data_bytes:
            return PLACE_STACK_FULL
        dest = self.base + self.cur_slot * self.slot_bytes + self.index_bytes + offset
        if channels > 1:
            for c in range(channels):
                length = self.pending_size[c]
                memcpy(dest + 8 * c, &length, 8)
            dest += 8 * channels
        for c in range(channels):
            memcpy(dest, self.pending_data[c], self.pending_size[c])
            dest += self.pending_size[c]
        record = (<FrameRecord*>(self.base + self.cur_slot * self.slot_bytes)) + self.cur_frames
        record.frame = frame
        record.offset = offset
        record.size = total
        record.encoding = self.pending_encoding
        record.elem_size = self.pending_elem_size
        record.channels = channels
        record.dtype_tag = self.pending_dtype_tag
        if self.cur_frames == 0:
            self.cur_opened_at = monotonic()
            self.cur_first = frame
            self.cur_last = frame
        elif frame < self.cur_first:
            self.cur_first = frame
        elif frame > self.cur_last:
            self.cur_last = frame
        self.cur_frames += 1
        self.cur_used = offset + total
        self.bitmap[frame] = 1
        self.received_frames += 1
        self.counts[C_FRAMES] += 1
        self.counts[C_BYTES] += total
        self.release_pending()
        if self.expected_frames > 0 and self.received_frames >= self.expected_frames:
            return PLACE_COMPLETE
        if self.cur_frames >= self.frames_per_stack:
            return PLACE_STACK_FULL
        return PLACE_DONE

    cdef inline void release_pending(self) noexcept nogil:
        if self.pending_in_msg:
            self.f_close(&self.pending_msg)
            self.f_init(&self.pending_msg)
        elif self.pending_object is not None:
            with gil:
                self.pending_object = None
        self.pending_in_buffer = False
        self.has_pending = False

    cdef inline int event_of(self, int placed) noexcept nogil:
        """The pump event a placement result means, or -1 to go on receiving."""
        if placed == PLACE_NEED_SLOT:
            return EV_NEED_SLOT
        if placed == PLACE_STACK_FULL:
            return EV_STACK_READY
        if placed == PLACE_GROW:
            return EV_GROW
        if placed == PLACE_COMPLETE:
            return EV_SERIES_COMPLETE
        return -1

    cdef void close_parts(self) noexcept nogil:
        cdef int i
        if self.fd >= 0:  # the parts are bytes of the read buffer, already consumed
            self.nparts = 0
            return
        for i in range(self.nparts):
            self.f_close(&self.parts[i])
            self.f_init(&self.parts[i])
        self.nparts = 0

    cdef int hand_to_python(self, int kind) noexcept nogil:
        cdef int i
        with gil:
            self.message_parts = [
PyBytes_FromStringAndSize(<const char*>self.pdata[i], <Py_ssize_t>self.psize[i])
                for i in range(self.nparts)]
            self.message_kind = kind
        self.close_parts()
        return EV_MESSAGE

    cdef int receive_message(self) noexcept nogil:
        """1: a whole multipart message is in ``pdata``/``psize``; 0: nothing waiting; 2: a
        message was dropped (counted); -1: socket error (``socket_errno``)."""
        if self.fd >= 0:
            return self.receive_zmtp()
        return self.receive_zmq()

    cdef inline void hold_part(self, int i) noexcept nogil:
        """Keep the bytes of part ``i`` until the pending frame is placed; release the others."""
        if self.fd >= 0:  # they stay in the read buffer, which is not touched before the placing
            self.pending_in_buffer = True
            self.nparts = 0
            return
        self.f_move(&self.pending_msg, &self.parts[i])
        self.close_parts()
        self.pending_in_msg = True
        # a very short message lives inside the zmq_msg_t itself: it moved with it
        self.pdata[i] = <const uint8_t*>self.f_data(&self.pending_msg)

    cdef int receive_zmq(self) noexcept nogil:
        cdef int rc, i
        cdef zmq_msg_t extra
        self.nparts = 0
        rc = self.f_recv(&self.parts[0], self.socket, ZMQ_DONTWAIT)
        if rc < 0:
            rc = self.f_errno()
            if rc == EAGAIN or rc == EINTR:
                return 0
            self.socket_errno = rc
            return -1
        self.nparts = 1
        # ZeroMQ delivers multipart messages atomically: the remaining parts are already here.
        while self.f_more(&self.parts[self.nparts - 1]):
            if self.nparts == MAX_PARTS:
                self.f_init(&extra)
                while True:
                    if self.f_recv(&extra, self.socket, 0) < 0 or not self.f_more(&extra):
                        break
                self.f_close(&extra)
                self.counts[C_TOO_MANY_PARTS] += 1
                self.close_parts()
                return 2
            if self.f_recv(&self.parts[self.nparts], self.socket, 0) < 0:
                self.socket_errno = self.f_errno()
                self.close_parts()
                return -1
            self.nparts += 1
        for i in range(self.nparts):
            self.pdata[i] = <const uint8_t*>self.f_data(&self.parts[i])
            self.psize[i] = self.f_size(&self.parts[i])
        return 1

    # ---- ZMTP 3 over a TCP socket (the "zmtp" transport) ----------------------------------------

    cdef inline int zmtp_error(self, int code) noexcept nogil:
        self.socket_errno = code
        return -1

    cdef int receive_zmtp(self) noexcept nogil:
        """receive_zmq()'s contract, from the ZMTP byte stream: a message's parts point into the
        read buffer, which holds them until the next call."""
        cdef int got, parsed
        self.nparts = 0
        while True:
            parsed = self.parse_zmtp()
            if parsed != 0:
                return parsed
            got = self.fill_zmtp()
            if got <= 0:
                return got

    cdef int parse_zmtp(self) noexcept nogil:
        """The next whole message in the read buffer: 1 (parts set, consumed), 2 (too many parts,
        dropped and counted), 0 (incomplete: ``rneed`` says how many bytes it needs), -1 (a
        protocol violation: the connection must go). Commands between messages are handled."""
        cdef size_t pos = self.rstart, header, avail
        cdef uint64_t size
        cdef uint8_t flags
        cdef int n = 0
        cdef const uint8_t* body
        while True:
            avail = self.rend - pos
            if avail < 2:
                self.rneed = pos - self.rstart + 9
                return 0
            flags = self.rbuf[pos]
            if flags & 0xF8:  # reserved bits: not a ZMTP 3 frame, the stream is out of step
                return self.zmtp_error(EPROTO)
            if flags & ZMTP_FLAG_LONG:
                if avail < 9:
                    self.rneed = pos - self.rstart + 9
                    return 0
                size = be64(self.rbuf + pos + 1)
                header = 9
            else:
                size = self.rbuf[pos + 1]
                header = 2
            if size > ZMTP_MAX_FRAME:
                return self.zmtp_error(EPROTO)
            if avail - header < size:
                self.rneed = pos - self.rstart + header + <size_t>size
                return 0
            body = self.rbuf + pos + header
            pos += header + <size_t>size
            if flags & ZMTP_FLAG_COMMAND:
                if n > 0:  # a command inside a multipart message
                    return self.zmtp_error(EPROTO)
                self.zmtp_command(body, size)
                self.rstart = pos
                continue
            if n < MAX_PARTS:
                self.pdata[n] = body
                self.psize[n] = size
            n += 1
            if not (flags & ZMTP_FLAG_MORE):
                self.rstart = pos
                self.rneed = 0
                if n > MAX_PARTS:
                    self.counts[C_TOO_MANY_PARTS] += 1
                    return 2
                self.nparts = n
                return 1

    cdef void zmtp_command(self, const uint8_t* body, size_t size) noexcept nogil:
        """A command between messages (counted): a PING (ZMTP 3.1 heartbeat) gets its PONG with
        the PING's context; anything else needs no answer from a PULL socket."""
        cdef uint8_t reply[7 + 16]
        cdef size_t context = 0
        self.counts[C_ZMTP_COMMANDS] += 1
        if size < 7 or body[0] != 4 or memcmp(body + 1, b"PING", 4) != 0:
            return
        context = size - 7  # name length, "PING", 2-byte TTL, then the context
        if context > 16:
            context = 16
        reply[0] = ZMTP_FLAG_COMMAND
        reply[1] = <uint8_t>(5 + context)
        reply[2] = 4
        memcpy(reply + 3, b"PONG", 4)
        memcpy(reply + 7, body + 7, context)
        send(self.fd, reply, 7 + context, MSG_DONTWAIT | MSG_NOSIGNAL)

    cdef int fill_zmtp(self) noexcept nogil:
        """Read what the socket holds into the buffer: 1 bytes came, 0 none now, -1 the
        connection closed or failed (``socket_errno``). Only called with no part or pending
        frame pointing into the buffer, so it may move and grow it."""
        cdef size_t kept, capacity
        cdef ssize_t got
        cdef uint8_t* moved
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
            if self.rcap > ZMTP_READ_BUFFER:  # a big message has gone: give its memory back
                moved = <uint8_t*>realloc(self.rbuf, ZMTP_READ_BUFFER)
                if moved != NULL:
                    self.rbuf = moved
                    self.rcap = ZMTP_READ_BUFFER
        if self.rstart > 0 and (self.rcap - self.rend < ZMTP_MIN_READ or self.rstart + self.rneed > self.rcap):
            kept = self.rend - self.rstart
            memmove(self.rbuf, self.rbuf + self.rstart, kept)
            self.rstart = 0
            self.rend = kept
        if self.rneed > self.rcap:  # a message bigger than the buffer
            capacity = self.rcap
            while capacity < self.rneed:
                capacity *= 2
            moved = <uint8_t*>realloc(self.rbuf, capacity)
            if moved == NULL:
                return self.zmtp_error(ENOMEM)
            self.rbuf = moved
            self.rcap = capacity
        got = recv(self.fd, self.rbuf + self.rend, self.rcap - self.rend, MSG_DONTWAIT)
        if got > 0:
            self.rend += got
            return 1
        if got == 0:
            return self.zmtp_error(ECONNRESET)  # the peer closed the connection
        if errno == EAGAIN or errno == EINTR:
            return 0
        return self.zmtp_error(errno)

    cdef int process_v1(self) noexcept nogil:
        """An image message in ``parts``: place its blob; returns a pump event or -1 (go on)."""
        cdef const uint8_t* p0 = self.pdata[0]
        cdef size_t n0 = self.psize[0], end = 0
        cdef const uint8_t* p1
        cdef size_t n1
        cdef int64_t frame, series, declared
        cdef int problem
        if self.route_to_python or memmem(p0, n0, KEY_DIMAGE, 20) == NULL:
            return self.hand_to_python(MSG_OTHER)
        # One image per ZeroMQ message (dimage, dimage_d, blob, dconfig, an optional appendix), as
        # a DCU sends it. Anything else (parts split over several messages, or several v1
        # messages in one) is regrouped by content in Python.
        if self.nparts < 4 or self.nparts > 5 or memmem(self.pdata[3], self.psize[3], KEY_DCONFIG, 20) == NULL:
            return self.hand_to_python(MSG_OTHER)
        if self.nparts == 5 and v1_starts_message(self.pdata[4], self.psize[4]):
            return self.hand_to_python(MSG_OTHER)
        frame = json_int_after(p0, n0, KEY_FRAME, 8, &end)
        series = json_int_after(p0, n0, KEY_SERIES, 9, &end)
        if frame < 0 or series < 0:
            return self.hand_to_python(MSG_FALLBACK)
        problem = self.series_problem(series)
        if problem == C_NO_HEADER and self.headerless_to_python:
            return self.hand_to_python(MSG_OTHER)
        if problem >= 0:
            self.counts[problem] += 1
            self.follows_v1_image = self.nparts == 4
            self.close_parts()
            return -1
        p1 = self.pdata[1]
        n1 = self.psize[1]
        if self.v1_format_data == NULL or not same_format(self.v1_format_data,
                                                          self.v1_format_size, p1, n1, &declared):
            return self.hand_to_python(MSG_NEW_FORMAT)
        if declared >= 0 and <size_t>declared != self.psize[2]:
            self.counts[C_SIZE_MISMATCH] += 1
            self.follows_v1_image = self.nparts == 4
            self.close_parts()
            return -1
        self.follows_v1_image = self.nparts == 4
        self.hold_part(2)
        self.pending_data[0] = self.pdata[2]
        self.pending_size[0] = self.psize[2]
        self.pending_channels = 1
        self.pending_frame = frame
        self.pending_encoding = self.v1_encoding
        self.pending_elem_size = self.v1_elem_size
        self.pending_dtype_tag = self.v1_dtype_tag
        self.has_pending = True
        return self.event_of(self.place_pending())

    cdef int process_v2(self) noexcept nogil:
        cdef V2Image img
        cdef int walked, problem, c
        cdef const uint8_t* p
        if self.nparts != 1 or self.route_to_python:
            return self.hand_to_python(MSG_FALLBACK if self.nparts != 1 else MSG_OTHER)
        p = self.pdata[0]
        walked = v2_walk(p, self.psize[0], &img)
        if walked == 1:
            return self.hand_to_python(MSG_OTHER)
        if walked < 0:
            return self.hand_to_python(MSG_FALLBACK)
        problem = self.series_problem(img.series)
        if problem == C_NO_HEADER and self.headerless_to_python:
            return self.hand_to_python(MSG_OTHER)
        if problem >= 0:
            self.counts[problem] += 1
            self.close_parts()
            return -1
        if self.expect_height > 0 and (img.height != self.expect_height or
                                       img.width != self.expect_width):
            self.counts[C_SHAPE_MISMATCH] += 1
            self.close_parts()
            return -1
        self.last_height = img.height
        self.last_width = img.width
        self.last_dtype_tag = img.dtype_tag
        self.last_encoding = img.encoding
        # the pointers stay valid: moving a message (longer than the few bytes a zmq_msg_t holds
        # itself, as every image message is) keeps its data buffer where it is
        self.hold_part(0)
        for c in range(img.channels):
            self.pending_data[c] = img.data[c]
            self.pending_size[c] = img.size[c]
        self.pending_channels = img.channels
        self.pending_frame = img.frame
        self.pending_encoding = img.encoding
        self.pending_elem_size = img.elem_size
        self.pending_dtype_tag = img.dtype_tag
        self.has_pending = True
        return self.event_of(self.place_pending())

    cdef int run(self, double max_wait) noexcept nogil:
        cdef double now = monotonic()
        cdef double deadline = now + max_wait
        cdef double wait
        cdef int event, received
        cdef zmq_pollitem_t item
        cdef pollfd pfd
        cdef timespec nap
        if self.has_pending:
            event = self.event_of(self.place_pending())
            if event >= 0:
                return event
        while True:
            received = self.receive_message()
            now = monotonic()
            if received < 0:
                return EV_SOCKET_ERROR
            if received == 0:
                if self.cur_frames > 0 and now - self.cur_opened_at >= self.max_latency:
                    return EV_STACK_READY
                if now >= deadline:
                    return EV_IDLE
                wait = deadline - now
                if self.cur_frames > 0 and self.cur_opened_at + self.max_latency - now < wait:
                    wait = self.cur_opened_at + self.max_latency - now
                if self.coalesce > 0 and now - self.last_message_at < COALESCE_WINDOW:
                    # A stream is flowing and the queue ran dry: nap instead of being woken for
                    # every batch ZeroMQ's I/O thread reads (8 KiB). Messages pile up meanwhile
                    # and are taken in one go: far fewer wake-ups on both threads.
                    if wait > self.coalesce:
                        wait = self.coalesce
                    nap.tv_sec = 0
                    nap.tv_nsec = <long>(wait * 1e9)
                    nanosleep(&nap, NULL)
                    continue
                if self.fd >= 0:
                    pfd.fd = self.fd
                    pfd.events = POLLIN
                    pfd.revents = 0
                    if poll(&pfd, 1, <int>(wait * 1000.0) + 1) < 0 and errno != EINTR:
                        self.socket_errno = errno
                        return EV_SOCKET_ERROR
                    continue
                item.socket = self.socket
                item.fd = 0
                item.events = ZMQ_POLLIN
                item.revents = 0
                if self.f_poll(&item, 1, <long>(wait * 1000.0) + 1) < 0:
                    event = self.f_errno()
                    if event != EINTR:
                        self.socket_errno = event
                        return EV_SOCKET_ERROR
                continue
            self.last_message_at = now
            self.counts[C_MESSAGES] += 1
            if received == 2:
                continue
            if self.stream_v2:
                event = self.process_v2()
            else:
                event = self.process_v1()
            if event >= 0:
                return event
            if self.cur_frames > 0 and now - self.cur_opened_at >= self.max_latency:
                return EV_STACK_READY
            if now >= deadline:
                return EV_IDLE
