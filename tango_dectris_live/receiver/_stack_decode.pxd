# What _stack_decode.pyx offers other compiled modules: the consumer of StackDecoder.decode_blocks.
from libc.stddef cimport ptrdiff_t

# decode_blocks hands the decoded pixels of a stack's frames to a consumer piece by piece, while
# they are still in the CPU cache: ``nrows`` frames at a time, the pixels
# ``[first_pixel, first_pixel + count)`` of each, row after row in ``pixels`` (``nrows * count``
# pixels of the output type, C order); ``rows[r]`` is the index, in the positions decode_blocks
# was given, of the frame in row r. Every pixel of every frame is handed over exactly once.
ctypedef void (*block_sink_fn)(void* context, const ptrdiff_t* rows, ptrdiff_t nrows, size_t first_pixel,
                               const void* pixels, size_t count) noexcept nogil
