# cython: language_level=3
"""Header fields read in C on the receiver's hot path.

The DCU's v1 JSON parts are compact and sorted (SIMPLON.md §3.2), so an integer field such as
``"frame":12`` can be found with a byte search instead of a full JSON parse. Anything that does
not look like that returns -1 and the caller falls back to ``json.loads``.
"""
from libc.string cimport memcmp


cdef inline Py_ssize_t _find(const unsigned char* buf, Py_ssize_t n,
                             const unsigned char* needle, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    if m == 0 or m > n:
        return -1
    for i in range(n - m + 1):
        if buf[i] == needle[0] and memcmp(buf + i, needle, m) == 0:
            return i
    return -1


cdef long long json_int_field_c(const unsigned char* buf, Py_ssize_t n,
                                const unsigned char* key, Py_ssize_t klen) noexcept nogil:
    """Value of the non-negative integer ``"key":<digits>`` in ``buf``, or -1."""
    cdef Py_ssize_t pos = _find(buf, n, key, klen)
    cdef long long value = 0
    cdef Py_ssize_t i, digits = 0
    if pos < 0:
        return -1
    i = pos + klen
    while i < n and buf[i] == 32:  # tolerate "key": 12 (the spaced form of the DCU manual)
        i += 1
    while i < n and 48 <= buf[i] <= 57:
        value = value * 10 + (buf[i] - 48)
        digits += 1
        i += 1
    if digits == 0 or digits > 18:
        return -1
    return value


def json_int_field(const unsigned char[::1] part, bytes key):
    """Integer value of ``key`` in a compact JSON part, -1 when absent or not a plain integer.

    ``key`` is the bare name (``b"frame"``); the quoted ``"frame":`` form is searched.
    """
    cdef bytes needle = b'"' + key + b'":'
    cdef const unsigned char* k = needle
    cdef Py_ssize_t n = part.shape[0]
    cdef Py_ssize_t klen = len(needle)
    cdef long long result
    if n == 0:
        return -1
    with nogil:
        result = json_int_field_c(&part[0], n, k, klen)
    return result
