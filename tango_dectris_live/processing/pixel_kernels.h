/* Exact integer pixel sums and mask-weighted sums for _pixel_sums.pyx, written in C so that the compiler can
 * build them once per instruction set: with GCC or Clang on x86-64 Linux every kernel is compiled
 * for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, and the loader picks the one the CPU
 * runs (an ifunc).
 * Elsewhere they are plain portable C.
 *
 * Callers guarantee the accumulators cannot overflow (_pixel_sums.pyx documents how).
 */
#ifndef TDL_PIXEL_KERNELS_H
#define TDL_PIXEL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define TDL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TDL_CLONES
#endif

/* pixels per block: the block's accumulators (16 KiB of uint32) stay in the L1 cache while the
 * frames stream past */
#define TDL_BLOCK 4096
/* uint16 (or uint8) values that always fit a uint32 partial sum */
#define TDL_NARROW_TERMS 65537

#define TDL_MIN(a, b) ((a) < (b) ? (a) : (b))

/* acc[p] += sum over f of frames[f * pixels + p], acc as wide as the sum needs (no partials):
 * four frames at a time, so each accumulator is loaded and stored once per four frames. */
#define TDL_ADD_DIRECT(NAME, PIXEL, ACC)                                                         \
    TDL_CLONES static void NAME(const PIXEL *restrict frames, size_t n, size_t pixels,            \
                                ACC *restrict acc) {                                              \
        for (size_t block = 0; block < pixels; block += TDL_BLOCK) {                              \
            size_t end = TDL_MIN(block + TDL_BLOCK, pixels);                                      \
            size_t f = 0;                                                                         \
            for (; f + 4 <= n; f += 4) {                                                          \
                const PIXEL *restrict a = frames + f * pixels;                                    \
                const PIXEL *restrict b = a + pixels;                                             \
                const PIXEL *restrict c = b + pixels;                                             \
                const PIXEL *restrict d = c + pixels;                                             \
                for (size_t p = block; p < end; p++)                                              \
                    acc[p] += ((ACC)a[p] + (ACC)b[p]) + ((ACC)c[p] + (ACC)d[p]);                  \
            }                                                                                     \
            for (; f < n; f++) {                                                                  \
                const PIXEL *restrict a = frames + f * pixels;                                    \
                for (size_t p = block; p < end; p++)                                              \
                    acc[p] += a[p];                                                               \
            }                                                                                     \
        }                                                                                         \
    }

TDL_ADD_DIRECT(tdl_add_u8_u32, uint8_t, uint32_t)
TDL_ADD_DIRECT(tdl_add_u16_u32, uint16_t, uint32_t)
TDL_ADD_DIRECT(tdl_add_u32_u64, uint32_t, uint64_t)

/* acc (uint64) += narrow pixels, summed first into uint32 partials of a block of pixels, flushed
 * before they could overflow: the partials vectorise twice as wide as uint64 sums. */
#define TDL_ADD_NARROW_WIDE(NAME, PIXEL)                                                          \
    TDL_CLONES static void NAME(const PIXEL *restrict frames, size_t n, size_t pixels,            \
                                uint64_t *restrict acc) {                                         \
        uint32_t partial[TDL_BLOCK];                                                              \
        for (size_t block = 0; block < pixels; block += TDL_BLOCK) {                              \
            size_t end = TDL_MIN(block + TDL_BLOCK, pixels), width = end - block;                 \
            for (size_t first = 0; first < n; first += TDL_NARROW_TERMS - 1) {                   \
                size_t last = TDL_MIN(first + TDL_NARROW_TERMS - 1, n);                           \
                for (size_t p = 0; p < width; p++)                                                \
                    partial[p] = 0;                                                               \
                for (size_t f = first; f < last; f++) {                                           \
                    const PIXEL *restrict a = frames + f * pixels + block;                        \
                    for (size_t p = 0; p < width; p++)                                            \
                        partial[p] += a[p];                                                       \
                }                                                                                 \
                for (size_t p = 0; p < width; p++)                                                \
                    acc[block + p] += partial[p];                                                 \
            }                                                                                     \
        }                                                                                         \
    }

TDL_ADD_NARROW_WIDE(tdl_add_u8_u64, uint8_t)
TDL_ADD_NARROW_WIDE(tdl_add_u16_u64, uint16_t)

/* totals[f] += the exact sum of frame f: narrow pixels in uint32 chunks that cannot overflow,
 * 32-bit pixels straight into uint64. */
#define TDL_TOTALS(NAME, PIXEL, PARTIAL, CHUNK)                                                   \
    TDL_CLONES static void NAME(const PIXEL *restrict frames, size_t n, size_t pixels,            \
                                double *restrict totals) {                                        \
        for (size_t f = 0; f < n; f++) {                                                          \
            const PIXEL *restrict a = frames + f * pixels;                                        \
            uint64_t total = 0;                                                                   \
            for (size_t block = 0; block < pixels; block += (CHUNK)) {                           \
                size_t end = TDL_MIN(block + (CHUNK), pixels);                                    \
                PARTIAL partial = 0;                                                              \
                for (size_t p = block; p < end; p++)                                              \
                    partial += a[p];                                                              \
                total += partial;                                                                 \
            }                                                                                     \
            totals[f] += (double)total;                                                           \
        }                                                                                         \
    }

TDL_TOTALS(tdl_totals_u8, uint8_t, uint32_t, TDL_NARROW_TERMS - 1)
TDL_TOTALS(tdl_totals_u16, uint16_t, uint32_t, TDL_NARROW_TERMS - 1)
TDL_TOTALS(tdl_totals_u32, uint32_t, uint64_t, (size_t)1 << 30)

/* Both sums of rows of pixels in one pass, for the fused decode-and-sum path (frames handed over a
 * bitshuffle block at a time, still in the L1 cache): acc[p] += the rows' pixel p, and
 * row_totals[r] += the exact sum of row r. Narrow pixels go in blocks of TDL_BLOCK pixels, whose
 * uint32 partial row sums cannot overflow (4096 * 65535 < 2**32); four rows per accumulator pass. */
#define TDL_ROWS_BOTH(NAME, PIXEL, ACC, PARTIAL)                                                   \
    TDL_CLONES static void NAME(const PIXEL *restrict rows, size_t nrows, size_t count,           \
                                ACC *restrict acc, uint64_t *restrict row_totals) {               \
        for (size_t block = 0; block < count; block += TDL_BLOCK) {                               \
            size_t end = TDL_MIN(block + TDL_BLOCK, count);                                       \
            size_t r = 0;                                                                         \
            for (; r + 4 <= nrows; r += 4) {                                                      \
                const PIXEL *restrict a = rows + r * count;                                       \
                const PIXEL *restrict b = a + count;                                              \
                const PIXEL *restrict c = b + count;                                              \
                const PIXEL *restrict d = c + count;                                              \
                PARTIAL ta = 0, tb = 0, tc = 0, td = 0;                                           \
                for (size_t p = block; p < end; p++) {                                            \
                    PARTIAL va = a[p], vb = b[p], vc = c[p], vd = d[p];                           \
                    acc[p] += (ACC)((va + vb) + (vc + vd));                                       \
                    ta += va;                                                                     \
                    tb += vb;                                                                     \
                    tc += vc;                                                                     \
                    td += vd;                                                                     \
                }                                                                                 \
                row_totals[r] += ta;                                                              \
                row_totals[r + 1] += tb;                                                          \
                row_totals[r + 2] += tc;                                                          \
                row_totals[r + 3] += td;                                                          \
            }                                                                                     \
            for (; r < nrows; r++) {                                                              \
                const PIXEL *restrict a = rows + r * count;                                       \
                PARTIAL ta = 0;                                                                   \
                for (size_t p = block; p < end; p++) {                                            \
                    acc[p] += a[p];                                                               \
                    ta += a[p];                                                                   \
                }                                                                                 \
                row_totals[r] += ta;                                                              \
            }                                                                                     \
        }                                                                                         \
    }

/* (ACC)(va + vb + vc + vd): four uint16 values sum to < 2**18, four uint32 ones need uint64 */
TDL_ROWS_BOTH(tdl_rows_u8_u32, uint8_t, uint32_t, uint32_t)
TDL_ROWS_BOTH(tdl_rows_u16_u32, uint16_t, uint32_t, uint32_t)
TDL_ROWS_BOTH(tdl_rows_u8_u64, uint8_t, uint64_t, uint32_t)
TDL_ROWS_BOTH(tdl_rows_u16_u64, uint16_t, uint64_t, uint32_t)
TDL_ROWS_BOTH(tdl_rows_u32_u64, uint32_t, uint64_t, uint64_t)

/* The consumer of the fused decode-and-sum path (_stack_decode.pxd's block_sink_fn): ``rows``
 * frames of ``count`` pixels from pixel ``first``, added into the sum's accumulator (``acc``, of
 * ``acc_bytes`` 4 or 8, or none) and each frame's exact total into ``totals[row index]`` (or
 * none). */
typedef struct {
    int pixel_bytes;  /* 1, 2 or 4: unsigned pixels */
    int acc_bytes;    /* 4 (uint32) or 8 (uint64) */
    void *acc;        /* NULL: no sum */
    double *totals;   /* NULL: no per-frame totals */
} tdl_frame_sums;

#define TDL_SINK_GROUP 64  /* rows handed over at once at most (decode_blocks hands over a few) */

static void tdl_frame_sums_sink(void *context, const ptrdiff_t *rows, ptrdiff_t nrows, size_t first,
                                const void *pixels, size_t count) {
    const tdl_frame_sums *sums = (const tdl_frame_sums *)context;
    uint64_t row_totals[TDL_SINK_GROUP];
    for (ptrdiff_t done = 0; done < nrows; done += TDL_SINK_GROUP) {
        size_t n = (size_t)TDL_MIN(nrows - done, TDL_SINK_GROUP);
        const char *piece = (const char *)pixels + (size_t)done * count * (size_t)sums->pixel_bytes;
        for (size_t r = 0; r < n; r++)
            row_totals[r] = 0;
        if (sums->acc != NULL && sums->totals != NULL) {
            if (sums->acc_bytes == 4) {
                uint32_t *acc = (uint32_t *)sums->acc + first;
                if (sums->pixel_bytes == 1)
                    tdl_rows_u8_u32((const uint8_t *)piece, n, count, acc, row_totals);
                else
                    tdl_rows_u16_u32((const uint16_t *)piece, n, count, acc, row_totals);
            } else {
                uint64_t *acc = (uint64_t *)sums->acc + first;
                if (sums->pixel_bytes == 1)
                    tdl_rows_u8_u64((const uint8_t *)piece, n, count, acc, row_totals);
                else if (sums->pixel_bytes == 2)
                    tdl_rows_u16_u64((const uint16_t *)piece, n, count, acc, row_totals);
                else
                    tdl_rows_u32_u64((const uint32_t *)piece, n, count, acc, row_totals);
            }
        } else if (sums->acc != NULL) {
            if (sums->acc_bytes == 4) {
                uint32_t *acc = (uint32_t *)sums->acc + first;
                if (sums->pixel_bytes == 1)
                    tdl_add_u8_u32((const uint8_t *)piece, n, count, acc);
                else
                    tdl_add_u16_u32((const uint16_t *)piece, n, count, acc);
            } else {
                uint64_t *acc = (uint64_t *)sums->acc + first;
                if (sums->pixel_bytes == 1)
                    tdl_add_u8_u64((const uint8_t *)piece, n, count, acc);
                else if (sums->pixel_bytes == 2)
                    tdl_add_u16_u64((const uint16_t *)piece, n, count, acc);
                else
                    tdl_add_u32_u64((const uint32_t *)piece, n, count, acc);
            }
        }
        if (sums->totals == NULL)
            continue;
        if (sums->acc == NULL) {
            /* totals alone: the exact per-frame sums, added as the compiled sumsig adds them */
            double partial[TDL_SINK_GROUP];
            for (size_t r = 0; r < n; r++)
                partial[r] = 0.0;
            if (sums->pixel_bytes == 1)
                tdl_totals_u8((const uint8_t *)piece, n, count, partial);
            else if (sums->pixel_bytes == 2)
                tdl_totals_u16((const uint16_t *)piece, n, count, partial);
            else
                tdl_totals_u32((const uint32_t *)piece, n, count, partial);
            for (size_t r = 0; r < n; r++)
                sums->totals[rows[done + r]] += partial[r];
        } else {
            for (size_t r = 0; r < n; r++)
                sums->totals[rows[done + r]] += (double)row_totals[r];
        }
    }
}

/* Mask-weighted sums for the bf/adf/com analyses: out[f * K + k] += sum over p < m of
 * frames[f * pixels + lo + p] * w[k * m + p], for K masks given over the pixel range [lo, lo + m)
 * outside which they are all zero. Pixels are converted to ACC (float for 8/16-bit pixels: exact;
 * double for 32-bit ones, as LiberTEM computes them) and summed in TDL_WLANES independent lanes
 * (the compiler turns them into vector registers), a block's lanes are added up in double. */
#define TDL_WLANES 16
#define TDL_WBLOCK 1024
#define TDL_WEIGHTED(NAME, PIXEL, K, ACC)                                                        \
    TDL_CLONES static void NAME(const PIXEL *restrict frames, size_t n, size_t pixels, size_t lo, \
                                size_t m, const float *restrict w, double *restrict out) {        \
        for (size_t f = 0; f < n; f++) {                                                          \
            const PIXEL *restrict a = frames + f * pixels + lo;                                   \
            double total[K];                                                                      \
            for (int k = 0; k < (K); k++)                                                         \
                total[k] = 0.0;                                                                   \
            for (size_t block = 0; block < m; block += TDL_WBLOCK) {                             \
                size_t end = TDL_MIN(block + TDL_WBLOCK, m), p = block;                           \
                ACC acc[K][TDL_WLANES];                                                           \
                for (int k = 0; k < (K); k++)                                                     \
                    for (int l = 0; l < TDL_WLANES; l++)                                          \
                        acc[k][l] = 0;                                                            \
                for (; p + TDL_WLANES <= end; p += TDL_WLANES)                                    \
                    for (int l = 0; l < TDL_WLANES; l++) {                                        \
                        ACC v = (ACC)a[p + l];                                                    \
                        for (int k = 0; k < (K); k++)                                             \
                            acc[k][l] += v * (ACC)w[k * m + p + l];                               \
                    }                                                                             \
                for (; p < end; p++)                                                              \
                    for (int k = 0; k < (K); k++)                                                 \
                        acc[k][0] += (ACC)a[p] * (ACC)w[k * m + p];                               \
                for (int k = 0; k < (K); k++)                                                     \
                    for (int l = 0; l < TDL_WLANES; l++)                                          \
                        total[k] += acc[k][l];                                                    \
            }                                                                                     \
            for (int k = 0; k < (K); k++)                                                         \
                out[f * (K) + k] += total[k];                                                     \
        }                                                                                         \
    }

TDL_WEIGHTED(tdl_weighted_u8_k1, uint8_t, 1, float)
TDL_WEIGHTED(tdl_weighted_u16_k1, uint16_t, 1, float)
TDL_WEIGHTED(tdl_weighted_u32_k1, uint32_t, 1, double)
TDL_WEIGHTED(tdl_weighted_u8_k3, uint8_t, 3, float)
TDL_WEIGHTED(tdl_weighted_u16_k3, uint16_t, 3, float)
TDL_WEIGHTED(tdl_weighted_u32_k3, uint32_t, 3, double)

#endif
