# The frame index of a frame stack: written by the receiver (_receiver.pyx), read by the decoder
# (_stack_decode.pyx). One definition, so that the two sides cannot drift apart.
from libc.stdint cimport int32_t, int64_t

# One index record per frame of a stack (numpy dtype FRAME_RECORD_DTYPE in framestack.py).
cdef struct FrameRecord:
    int64_t frame
    int64_t offset
    int64_t size
    int32_t encoding
    int32_t elem_size
    int32_t channels
    int32_t dtype_tag

# Frame encodings: the values of tango_dectris_live.stream.Algorithm.code (a test checks them).
cdef enum:
    ENC_NONE = 0
    ENC_BSLZ4 = 1
    ENC_LZ4_RAW = 2
    ENC_LZ4_HDF5 = 3
    ENC_BSZSTD = 4
