# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled send loop of the simulator (module ``sim._fastsend``).

A pool holds the pre-encoded constant pieces of every pool frame; the loop formats the per-frame
numbers (frame / image_id, start and stop times) in C and sends with the GIL released.

How libzmq is reached: the function addresses are taken at import time with ctypes from the
libzmq that pyzmq has already loaded (``dlsym`` on pyzmq's own extension module also searches its
dependencies, so this finds pyzmq's bundled ``pyzmq.libs/libzmq-*.so`` or a system libzmq alike),
and called through C function pointers on the pyzmq socket's ``.underlying`` handle. Linking at
build time was rejected: with ``pip install -e .`` the build runs in an isolated environment whose
pyzmq (and its bundled libzmq path, needed for an rpath) is deleted after the build, and a socket
handle is only valid in the very library instance that created it.

Zero copy: v1 ``dimage_d`` parts, blobs and the image appendix are sent from bytes the pool owns.
The last of them in each message goes with ``zmq_msg_init_data``, the others with
``zmq_send_const``: ZeroMQ releases the parts of a message in order, and calls the free function
of that last part when its I/O thread is done with it; the function only counts the part as
released, so ``in_flight`` says when nothing of the pool is queued any more and the owner may
drop it (before, it has to keep the pool alive).

No consumer / high-water mark: every message is offered with ``ZMQ_DONTWAIT``; when ZeroMQ
refuses it the loop waits for the socket to become writable (``zmq_poll``) for at most the wait
time the caller grants this call (the rest of the series' wait budget, see ``sim.streams``).
When that time is spent and ``final_wait`` is false the call returns early so the caller can
honour a stop request; with ``final_wait`` the frame is dropped and later frames of the call are
offered without waiting (dropped, as a DCU counts ``stream/status/dropped``, when refused).
"""
import ctypes

import zmq
from zmq.backend.cython import _zmq as _pyzmq_extension

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.string cimport memcpy
from libc.errno cimport EAGAIN, EINTR
from posix.time cimport clock_gettime, timespec, nanosleep, CLOCK_MONOTONIC

cdef extern from *:
    """
    typedef struct { unsigned char _[64]; } __attribute__((aligned(8))) sim_zmq_msg_t;
    """
    ctypedef struct sim_zmq_msg_t:
        pass

ctypedef int (*send_fn)(void *s, const void *buf, size_t n, int flags) noexcept nogil
ctypedef int (*msg_init_size_fn)(sim_zmq_msg_t *msg, size_t size) noexcept nogil
ctypedef int (*msg_init_fn)(sim_zmq_msg_t *msg) noexcept nogil
ctypedef void (*msg_free_fn)(void *data, void *hint) noexcept nogil
ctypedef int (*msg_init_data_fn)(sim_zmq_msg_t *msg, void *data, size_t size, msg_free_fn ffn,
                                 void *hint) noexcept nogil
ctypedef void *(*msg_data_fn)(sim_zmq_msg_t *msg) noexcept nogil
ctypedef size_t (*msg_size_fn)(sim_zmq_msg_t *msg) noexcept nogil
ctypedef int (*msg_send_fn)(sim_zmq_msg_t *msg, void *s, int flags) noexcept nogil
ctypedef int (*msg_recv_fn)(sim_zmq_msg_t *msg, void *s, int flags) noexcept nogil
ctypedef int (*msg_close_fn)(sim_zmq_msg_t *msg) noexcept nogil
ctypedef int (*msg_more_fn)(sim_zmq_msg_t *msg) noexcept nogil
ctypedef int (*errno_fn)() noexcept nogil

cdef extern from *:
    """
    typedef struct { void *socket; int fd; short events; short revents; } sim_zmq_pollitem_t;
    """
    ctypedef struct sim_zmq_pollitem_t:
        void *socket
        int fd
        short events
        short revents

ctypedef int (*poll_fn)(sim_zmq_pollitem_t *items, int nitems, long timeout) noexcept nogil

cdef send_fn z_send
cdef send_fn z_send_const
cdef msg_init_size_fn z_msg_init_size
cdef msg_init_fn z_msg_init
cdef msg_init_data_fn z_msg_init_data
cdef msg_data_fn z_msg_data
cdef msg_size_fn z_msg_size
cdef msg_send_fn z_msg_send
cdef msg_recv_fn z_msg_recv
cdef msg_close_fn z_msg_close
cdef msg_more_fn z_msg_more
cdef errno_fn z_errno
cdef poll_fn z_poll

cdef int ZMQ_SNDMORE = zmq.SNDMORE
cdef int ZMQ_DONTWAIT = zmq.DONTWAIT
cdef short ZMQ_POLLOUT = zmq.POLLOUT


def _address(lib, name):
    return <uintptr_t>ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _load_libzmq():
    global z_send, z_send_const, z_msg_init_size, z_msg_init, z_msg_init_data, z_msg_data, z_msg_size
    global z_msg_send, z_msg_recv, z_msg_close, z_msg_more, z_errno, z_poll
    lib = ctypes.CDLL(_pyzmq_extension.__file__)
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
        raise ImportError("the libzmq found next to pyzmq is not the one pyzmq uses")
    z_send = <send_fn><uintptr_t>_address(lib, "zmq_send")
    z_send_const = <send_fn><uintptr_t>_address(lib, "zmq_send_const")
    z_msg_init_size = <msg_init_size_fn><uintptr_t>_address(lib, "zmq_msg_init_size")
    z_msg_init = <msg_init_fn><uintptr_t>_address(lib, "zmq_msg_init")
    z_msg_init_data = <msg_init_data_fn><uintptr_t>_address(lib, "zmq_msg_init_data")
    z_msg_data = <msg_data_fn><uintptr_t>_address(lib, "zmq_msg_data")
    z_msg_size = <msg_size_fn><uintptr_t>_address(lib, "zmq_msg_size")
    z_msg_send = <msg_send_fn><uintptr_t>_address(lib, "zmq_msg_send")
    z_msg_recv = <msg_recv_fn><uintptr_t>_address(lib, "zmq_msg_recv")
    z_msg_close = <msg_close_fn><uintptr_t>_address(lib, "zmq_msg_close")
    z_msg_more = <msg_more_fn><uintptr_t>_address(lib, "zmq_msg_more")
    z_errno = <errno_fn><uintptr_t>_address(lib, "zmq_errno")
    z_poll = <poll_fn><uintptr_t>_address(lib, "zmq_poll")


_load_libzmq()


cdef extern from *:
    """
    /* ZeroMQ calls this from its I/O thread (or from zmq_msg_close) when a part sent from a pool
       is no longer needed; the pool's bytes are not freed here, only counted as released. */
    static void sim_pool_part_released(void *data, void *hint) {
        (void)data;
        __atomic_fetch_sub((long *)hint, 1, __ATOMIC_RELEASE);
    }
    static long sim_in_flight(long *counter) { return __atomic_load_n(counter, __ATOMIC_ACQUIRE); }
    static void sim_in_flight_add(long *counter) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }
    """
    void sim_pool_part_released(void *data, void *hint) noexcept nogil
    long sim_in_flight(long *counter) noexcept nogil
    void sim_in_flight_add(long *counter) noexcept nogil


cdef inline int send_pool_part(void *sock, const char *data, size_t size, int flags,
                               long *in_flight) noexcept nogil:
    """Send ``size`` bytes of a pool without copying them; counted in ``in_flight`` until ZeroMQ
    releases them."""
    cdef sim_zmq_msg_t msg
    cdef int rc
    sim_in_flight_add(in_flight)
    if z_msg_init_data(&msg, <void *>data, size, sim_pool_part_released, <void *>in_flight) != 0:
        sim_pool_part_released(NULL, <void *>in_flight)
        return -1
    while True:
        rc = z_msg_send(&msg, sock, flags)
        if rc >= 0:
            return rc
        if z_errno() != EINTR:
            z_msg_close(&msg)  # calls sim_pool_part_released
            return rc


cdef inline size_t put_decimal(char *out, uint64_t value) noexcept nogil:
    cdef char tmp[24]
    cdef size_t n = 0, i
    if value == 0:
        out[0] = 48
        return 1
    while value:
        tmp[n] = <char>(48 + value % 10)
        value //= 10
        n += 1
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline size_t put_cbor_uint(unsigned char *out, uint64_t value) noexcept nogil:
    """CBOR major type 0 in its shortest form, as cbor2 writes it."""
    cdef int i
    if value < 24:
        out[0] = <unsigned char>value
        return 1
    if value < 0x100:
        out[0] = 0x18
        out[1] = <unsigned char>value
        return 2
    if value < 0x10000:
        out[0] = 0x19
        out[1] = <unsigned char>(value >> 8)
        out[2] = <unsigned char>value
        return 3
    if (value >> 32) == 0:
        out[0] = 0x1a
        for i in range(4):
            out[1 + i] = <unsigned char>(value >> (8 * (3 - i)))
        return 5
    out[0] = 0x1b
    for i in range(8):
        out[1 + i] = <unsigned char>(value >> (8 * (7 - i)))
    return 9


cdef inline size_t cbor_uint_len(uint64_t value) noexcept nogil:
    if value < 24:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    if (value >> 32) == 0:
        return 5
    return 9


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void wait_until(double deadline) noexcept nogil:
    """Sleep to the deadline; the deadline loop does not drift with the time spent sending."""
    cdef double delay
    cdef timespec ts
    while True:
        delay = deadline - monotonic_now()
        if delay <= 0:
            return
        ts.tv_sec = <long>delay
        ts.tv_nsec = <long>((delay - ts.tv_sec) * 1e9)
        nanosleep(&ts, NULL)


cdef inline int send_retry(send_fn fn, void *sock, const void *buf, size_t n, int flags) noexcept nogil:
    cdef int rc
    while True:
        rc = fn(sock, buf, n, flags)
        if rc >= 0 or z_errno() != EINTR:
            return rc


cdef inline int wait_writable(void *sock, double *wait_left) noexcept nogil:
    """Wait until ``sock`` accepts a message, for at most ``wait_left`` seconds (reduced by the
    time spent). Returns 1 when writable, 0 when the time ran out."""
    cdef sim_zmq_pollitem_t item
    cdef double t0, timeout_ms
    cdef int rc
    while wait_left[0] > 0:
        item.socket = sock
        item.fd = 0
        item.events = ZMQ_POLLOUT
        item.revents = 0
        timeout_ms = wait_left[0] * 1000.0
        t0 = monotonic_now()
        rc = z_poll(&item, 1, <long>timeout_ms if timeout_ms >= 1.0 else 1)
        wait_left[0] -= monotonic_now() - t0
        if rc > 0 and (item.revents & ZMQ_POLLOUT):
            return 1
        if rc < 0 and z_errno() != EINTR:
            return 0
    wait_left[0] = 0
    return 0


cdef inline int msg_send_retry(sim_zmq_msg_t *msg, void *sock) noexcept nogil:
    cdef int rc
    while True:
        rc = z_msg_send(msg, sock, ZMQ_DONTWAIT)
        if rc >= 0 or z_errno() != EINTR:
            return rc



cdef check_pool_indices(const int64_t[::1] pool_index, Py_ssize_t pool_size):
    """IndexError before any send when an index is outside the pool (the loops run without checks)."""
    cdef Py_ssize_t i
    for i in range(pool_index.shape[0]):
        if pool_index[i] < 0 or pool_index[i] >= pool_size:
            raise IndexError(f"pool index {pool_index[i]} out of range 0..{pool_size - 1}")

cdef class V1FramePool:
    """Stream v1 pieces of every pool frame (see ``sim.streams.v1_fast_pieces``)."""

    cdef list _keep
    cdef bytes _tables
    cdef const char **suffix_ptr
    cdef size_t *suffix_len
    cdef const char **dimage_d_ptr
    cdef size_t *dimage_d_len
    cdef const char **blob_ptr
    cdef size_t *blob_len
    cdef const char *dconfig_prefix
    cdef size_t dconfig_prefix_len
    cdef const char *appendix
    cdef size_t appendix_len
    cdef int64_t real_ns
    cdef Py_ssize_t pool_size
    cdef long _in_flight  # parts ZeroMQ has not released yet (see send_pool_part)

    def __init__(self, dimage_suffixes, dimage_d, blobs, bytes dconfig_prefix, bytes appendix,
                 int64_t real_ns):
        cdef Py_ssize_t i, n = len(blobs)
        if not (len(dimage_suffixes) == len(dimage_d) == n) or n == 0:
            raise ValueError("a v1 pool needs the same (non-zero) number of suffixes, dimage_d parts and blobs")
        if max(len(s) for s in dimage_suffixes) > 200 or len(dconfig_prefix) > 160:
            raise ValueError("dimage suffix or dconfig prefix too long for the send buffers")
        suffixes, parts2, blob_list = [bytes(s) for s in dimage_suffixes], [bytes(d) for d in dimage_d], [bytes(b) for b in blobs]
        self._keep = [suffixes, parts2, blob_list, dconfig_prefix, appendix]
        self.pool_size = n
        self.real_ns = real_ns
        # One bytes object holds the pointer/length tables, so Python frees them with the pool.
        self._tables = bytes(n * 3 * (sizeof(char *) + sizeof(size_t)))
        cdef char *mem = <char *>self._tables
        self.suffix_ptr = <const char **>mem
        self.dimage_d_ptr = self.suffix_ptr + n
        self.blob_ptr = self.dimage_d_ptr + n
        self.suffix_len = <size_t *>(self.blob_ptr + n)
        self.dimage_d_len = self.suffix_len + n
        self.blob_len = self.dimage_d_len + n
        for i in range(n):
            self.suffix_ptr[i] = <const char *>suffixes[i]
            self.suffix_len[i] = len(suffixes[i])
            self.dimage_d_ptr[i] = <const char *>parts2[i]
            self.dimage_d_len[i] = len(parts2[i])
            self.blob_ptr[i] = <const char *>blob_list[i]
            self.blob_len[i] = len(blob_list[i])
        self.dconfig_prefix = <const char *>dconfig_prefix
        self.dconfig_prefix_len = len(dconfig_prefix)
        self.appendix = <const char *>appendix
        self.appendix_len = len(appendix)

    def send(self, uintptr_t socket_handle, int64_t first_frame, const int64_t[::1] pool_index,
             int64_t t0_ns, int64_t frame_ns, double t_start, double period_s, double max_wait_s,
             bint final_wait):
        """Send frames ``first_frame + i`` (pool frame ``pool_index[i]``), frame i not before
        ``t_start + i * period_s`` (monotonic clock), waiting at most ``max_wait_s`` in all for a
        consumer (see the module docstring). Returns (frames handled, sent, dropped, seconds
        waited); frames handled < len(pool_index) only when the wait ran out without
        ``final_wait``."""
        cdef void *sock = <void *>socket_handle
        cdef Py_ssize_t i, n = pool_index.shape[0]
        cdef int64_t p, frame, start
        cdef char part1[256]
        cdef char part4[256]
        cdef size_t len1, len4
        cdef int rc
        cdef Py_ssize_t sent = 0, dropped = 0, handled = n
        cdef double wait_left = max_wait_s if max_wait_s > 0 else 0.0
        check_pool_indices(pool_index, self.pool_size)
        with nogil:
            for i in range(n):
                if period_s > 0:
                    wait_until(t_start + i * period_s)
                p = pool_index[i]
                frame = first_frame + i
                memcpy(part1, b'{"frame":', 9)
                len1 = 9 + put_decimal(part1 + 9, <uint64_t>frame)
                memcpy(part1 + len1, self.suffix_ptr[p], self.suffix_len[p])
                len1 += self.suffix_len[p]
                rc = send_retry(z_send, sock, part1, len1, ZMQ_SNDMORE | ZMQ_DONTWAIT)
                # POLLOUT can be set while the send still finds the pipe full: retry until taken
                while rc < 0 and z_errno() == EAGAIN and wait_writable(sock, &wait_left):
                    rc = send_retry(z_send, sock, part1, len1, ZMQ_SNDMORE | ZMQ_DONTWAIT)
                if rc < 0 and not final_wait and wait_left <= 0 and max_wait_s > 0:
                    handled = i
                    break
                if rc < 0:
                    dropped += 1
                    continue
                start = t0_ns + frame * frame_ns
                memcpy(part4, self.dconfig_prefix, self.dconfig_prefix_len)
                len4 = self.dconfig_prefix_len
                len4 += put_decimal(part4 + len4, <uint64_t>start)
                memcpy(part4 + len4, b',"stop_time":', 13)
                len4 += 13
                len4 += put_decimal(part4 + len4, <uint64_t>(start + self.real_ns))
                part4[len4] = 125  # '}'
                part4[len4 + 1] = 10  # newline
                len4 += 2
                # ZeroMQ releases the parts of a message in order, so counting the message's last
                # pool-owned part covers the ones before it (one allocation per message, not three)
                send_retry(z_send_const, sock, self.dimage_d_ptr[p], self.dimage_d_len[p], ZMQ_SNDMORE)
                if self.appendix_len:
                    send_retry(z_send_const, sock, self.blob_ptr[p], self.blob_len[p], ZMQ_SNDMORE)
                    send_retry(z_send, sock, part4, len4, ZMQ_SNDMORE)
                    send_pool_part(sock, self.appendix, self.appendix_len, 0, &self._in_flight)
                else:
                    send_pool_part(sock, self.blob_ptr[p], self.blob_len[p], ZMQ_SNDMORE, &self._in_flight)
                    send_retry(z_send, sock, part4, len4, 0)
                sent += 1
        return handled, sent, dropped, max(0.0, max_wait_s) - wait_left

    @property
    def in_flight(self) -> int:
        """Parts of this pool that ZeroMQ still holds; the pool may be dropped once this is 0."""
        return sim_in_flight(&self._in_flight)


cdef class V2FramePool:
    """Stream v2 pieces (see ``sim.streams.v2_fast_pieces``): one message is
    prefix, uint(image_id), after_id, uint(start ticks), after_start, uint(stop ticks), tail[p]."""

    cdef list _keep
    cdef bytes _tables
    cdef const char **tail_ptr
    cdef size_t *tail_len
    cdef const char *prefix
    cdef size_t prefix_len
    cdef const char *after_id
    cdef size_t after_id_len
    cdef const char *after_start
    cdef size_t after_start_len
    cdef int64_t real_ticks
    cdef Py_ssize_t pool_size

    def __init__(self, bytes prefix, bytes after_id, bytes after_start, tails, int64_t real_ticks):
        cdef Py_ssize_t i, n = len(tails)
        if n == 0:
            raise ValueError("a v2 pool needs at least one frame")
        tail_list = [bytes(t) for t in tails]
        self._keep = [prefix, after_id, after_start, tail_list]
        self.pool_size = n
        self.real_ticks = real_ticks
        self._tables = bytes(n * (sizeof(char *) + sizeof(size_t)))
        self.tail_ptr = <const char **><char *>self._tables
        self.tail_len = <size_t *>(self.tail_ptr + n)
        for i in range(n):
            self.tail_ptr[i] = <const char *>tail_list[i]
            self.tail_len[i] = len(tail_list[i])
        self.prefix, self.prefix_len = <const char *>prefix, len(prefix)
        self.after_id, self.after_id_len = <const char *>after_id, len(after_id)
        self.after_start, self.after_start_len = <const char *>after_start, len(after_start)

    def send(self, uintptr_t socket_handle, int64_t first_frame, const int64_t[::1] pool_index,
             int64_t t0_ticks, int64_t frame_ticks, double t_start, double period_s, double max_wait_s,
             bint final_wait):
        """Like ``V1FramePool.send``; times are 50 MHz ticks relative to the series date."""
        cdef void *sock = <void *>socket_handle
        cdef Py_ssize_t i, n = pool_index.shape[0]
        cdef int64_t p, frame, start
        cdef sim_zmq_msg_t msg
        cdef unsigned char *out
        cdef size_t size
        cdef int rc
        cdef Py_ssize_t sent = 0, dropped = 0, handled = n
        cdef double wait_left = max_wait_s if max_wait_s > 0 else 0.0
        cdef size_t fixed = self.prefix_len + self.after_id_len + self.after_start_len
        check_pool_indices(pool_index, self.pool_size)
        with nogil:
            for i in range(n):
                if period_s > 0:
                    wait_until(t_start + i * period_s)
                p = pool_index[i]
                frame = first_frame + i
                start = t0_ticks + frame * frame_ticks
                size = (fixed + cbor_uint_len(<uint64_t>frame) + cbor_uint_len(<uint64_t>start)
                        + cbor_uint_len(<uint64_t>(start + self.real_ticks)) + self.tail_len[p])
                # One copy: the message is written straight into ZeroMQ's buffer.
                if z_msg_init_size(&msg, size) != 0:
                    dropped += 1
                    continue
                out = <unsigned char *>z_msg_data(&msg)
                size = 0
                memcpy(out, self.prefix, self.prefix_len)
                size += self.prefix_len
                size += put_cbor_uint(out + size, <uint64_t>frame)
                memcpy(out + size, self.after_id, self.after_id_len)
                size += self.after_id_len
                size += put_cbor_uint(out + size, <uint64_t>start)
                memcpy(out + size, self.after_start, self.after_start_len)
                size += self.after_start_len
                size += put_cbor_uint(out + size, <uint64_t>(start + self.real_ticks))
                memcpy(out + size, self.tail_ptr[p], self.tail_len[p])
                rc = msg_send_retry(&msg, sock)
                while rc < 0 and z_errno() == EAGAIN and wait_writable(sock, &wait_left):
                    rc = msg_send_retry(&msg, sock)
                if rc < 0 and not final_wait and wait_left <= 0 and max_wait_s > 0:
                    z_msg_close(&msg)
                    handled = i
                    break
                if rc < 0:
                    z_msg_close(&msg)
                    dropped += 1
                    continue
                sent += 1
        return handled, sent, dropped, max(0.0, max_wait_s) - wait_left

    @property
    def in_flight(self) -> int:
        """Always 0: every v2 message is a copy in ZeroMQ's own buffer."""
        return 0


def send_repeated(uintptr_t socket_handle, parts, Py_ssize_t count):
    """The machine's limit for a message shape: send the multipart message ``parts`` ``count``
    times, blocking, from a C loop with no per-message work (the parts are sent without copying;
    the caller keeps ``parts`` alive until the context is terminated). Returns the messages sent."""
    cdef void *sock = <void *>socket_handle
    cdef list keep = [bytes(part) for part in parts]
    cdef Py_ssize_t n_parts = len(keep), i, j, sent = 0
    if n_parts == 0 or n_parts > 16:
        raise ValueError(f"a message needs 1 to 16 parts, got {n_parts}")
    cdef const char *ptr[16]
    cdef size_t size[16]
    for j in range(n_parts):
        ptr[j] = <const char *>keep[j]
        size[j] = len(keep[j])
    with nogil:
        for i in range(count):
            for j in range(n_parts):
                if send_retry(z_send_const, sock, ptr[j], size[j],
                              ZMQ_SNDMORE if j < n_parts - 1 else 0) < 0:
                    break
            else:
                sent += 1
                continue
            break
    return sent


def count_messages(uintptr_t socket_handle, Py_ssize_t max_messages):
    """A consumer that only counts: receive whole messages until ``max_messages`` arrived or a
    receive times out (the socket's RCVTIMEO). Returns (messages, parts, bytes)."""
    cdef void *sock = <void *>socket_handle
    cdef sim_zmq_msg_t msg
    cdef Py_ssize_t messages = 0, parts = 0
    cdef uint64_t nbytes = 0
    cdef int rc
    with nogil:
        z_msg_init(&msg)
        while messages < max_messages:
            rc = z_msg_recv(&msg, sock, 0)
            if rc < 0:
                if z_errno() == EINTR:
                    continue
                break
            parts += 1
            nbytes += <uint64_t>rc
            if not z_msg_more(&msg):
                messages += 1
        z_msg_close(&msg)
    return messages, parts, nbytes
