"""CPU kernels in C, built once with the machine's C compiler: codebook and int8 dequantizes and
fused linears, and the calibration loops (sorted-values Lloyd's, codebook refit, GPTQ columns).

A row of 4-bit codes is expanded eight at a time: one int32 word is broadcast, shifted per lane
and masked into eight indices, and two ``vpermps`` over the row's 16-entry table (plus a blend on
the index's top bit) give eight fp32 weights, in registers. Tables of 8 entries or fewer (1-3
bits) take one ``vpermps``; 5-8 bits use a scalar loop. Entry points:

- :func:`dequantize_rows` / :func:`int8_dequantize_rows`: rows of the weight into a caller's
  buffer, bit for bit the eager dequantize (the blocked dequantize + BLAS route);
- :func:`linear` (codebook) and :func:`int8_linear`: ``x @ W.T`` for a few rows of fp32 ``x``
  (the GEMV regime), reading the weight once, as packed bytes, per four rows of ``x`` (int8:
  widened, and scaled in groups, in registers; AVX-512 where the CPU has it, for int8 and 4-bit
  codes: one ``vpermps`` over a 16-entry table looks up 16 weights). Sums run in a
  different order than a BLAS matmul: equal to dequantize + ``F.linear`` within fp32 rounding.
  Packed layers of more than ``base.BLOCK`` values use them for small M by default
  (:func:`set_fused`, ``TORCHZIP_CPU_FUSED=0`` to turn them off); smaller layers dequantize for
  ``F.linear``, bit for bit the trainable layer.

The library is compiled on first use into ``$TORCHZIP_CACHE`` (default
``~/.cache/torchzip``), keyed by a hash of its source and flags, and is used only if it builds,
the CPU has AVX2/FMA/F16C, and it reproduces the eager lookup on a small check. Otherwise (no
compiler, another architecture, ``TORCHZIP_CPU_KERNELS=0``) :func:`available` is False and the
callers keep their torch code. Threads: OpenMP over weight rows, as many as
``torch.get_num_threads()`` (the library links the same ``libgomp`` torch runs), except the
dequantizes, which run on one (:data:`DEQUANTIZE_THREADS`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Read ahead (the next task's rows): the hardware prefetcher alone leaves a GEMV well short of
   the memory's speed. A prefetch never faults, past the end of the weight too. */
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight codes from one broadcast word: lanes shifted right by `sh`; for 4 bits `hs` shifts each
   field's top bit into the sign bit, which picks the table's upper half. vpermps reads only the
   low 3 bits of each lane, so 3- and 4-bit codes need no mask. */
static inline __m256 expand8(__m256i b, __m256i sh, __m256i hs, __m256i vmask, int bits, __m256 t0, __m256 t1) {
    __m256i idx = _mm256_srlv_epi32(b, sh);
    if (bits < 3) idx = _mm256_and_si256(idx, vmask);
    __m256 v = _mm256_permutevar8x32_ps(t0, idx);
    if (bits == 4)
        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t1, idx), _mm256_castsi256_ps(_mm256_sllv_epi32(b, hs)));
    return v;
}

static void shifts(int bits, __m256i *sh, __m256i *hs) {
    for (int c = 0; c < 4; c++) {
        int s[8], h[8];
        for (int i = 0; i < 8; i++) {
            int f = (8 * c + i) * bits;
            s[i] = f < 32 ? f : 0;
            h[i] = 28 - f >= 0 ? 28 - f : 0;
        }
        sh[c] = _mm256_loadu_si256((const __m256i *)s);
        hs[c] = _mm256_loadu_si256((const __m256i *)h);
    }
}

/* One row of k codes, `bits` wide, 32/bits to an int32 word (least significant first), through
   the row's table `tab` (16 floats, the unused tail zero; all 2**bits for bits > 4) into `out`. */
static void expand_row(const int32_t *words, const float *tab, int bits, int64_t k, float *out, int64_t pf) {
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t full = k / per;
    int64_t j = 0;
    if (bits <= 4) {
        const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
        const __m256i vmask = _mm256_set1_epi32((int)mask);
        const int chunks = per / 8, rest = per % 8;
        __m256i sh[4], hs[4];
        shifts(bits, sh, hs);
        for (int64_t w = 0; w < full; w++) {
            const uint32_t word = (uint32_t)words[w];
            const __m256i b = _mm256_set1_epi32((int)word);
            if (w % 4 == 0) PREFETCH(words + w + pf);
            float *o = out + w * per;
            for (int c = 0; c < chunks; c++) _mm256_storeu_ps(o + 8 * c, expand8(b, sh[c], hs[c], vmask, bits, t0, t1));
            for (int f = 8 * chunks; f < 8 * chunks + rest; f++) o[f] = tab[(word >> (f * bits)) & mask];
        }
        j = full * per;
    }
    for (; j < k; j++) {
        const uint32_t word = (uint32_t)words[j / per];
        out[j] = tab[(word >> ((j % per) * bits)) & mask];
    }
}

/* x . row for one row of 4-bit codes, expanded in registers (M = 1: nothing is stored). */
static float dot4(const int32_t *words, const float *tab, int64_t k, const float *x, int64_t pf) {
    const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
    __m256i sh[4], hs[4];
    shifts(4, sh, hs);
    const __m256i vmask = _mm256_set1_epi32(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t full = k / 8;
    int64_t w = 0;
    for (; w + 4 <= full; w += 4) {
        PREFETCH(words + w + pf);
        a0 = _mm256_fmadd_ps(expand8(_mm256_set1_epi32(words[w]), sh[0], hs[0], vmask, 4, t0, t1), _mm256_loadu_ps(x + 8 * w), a0);
        a1 = _mm256_fmadd_ps(expand8(_mm256_set1_epi32(words[w + 1]), sh[0], hs[0], vmask, 4, t0, t1), _mm256_loadu_ps(x + 8 * w + 8), a1);
        a2 = _mm256_fmadd_ps(expand8(_mm256_set1_epi32(words[w + 2]), sh[0], hs[0], vmask, 4, t0, t1), _mm256_loadu_ps(x + 8 * w + 16), a2);
        a3 = _mm256_fmadd_ps(expand8(_mm256_set1_epi32(words[w + 3]), sh[0], hs[0], vmask, 4, t0, t1), _mm256_loadu_ps(x + 8 * w + 24), a3);
    }
    for (; w < full; w++)
        a0 = _mm256_fmadd_ps(expand8(_mm256_set1_epi32(words[w]), sh[0], hs[0], vmask, 4, t0, t1), _mm256_loadu_ps(x + 8 * w), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t j = full * 8; j < k; j++) s += tab[((uint32_t)words[j / 8] >> ((j % 8) * 4)) & 15u] * x[j];
    return s;
}

static void load_table(const float *book, int bits, float *tab) {
    memset(tab, 0, 16 * sizeof(float));
    memcpy(tab, book, (bits <= 4 ? (1 << bits) : 0) * sizeof(float));
}

/* out[r, :k] = book_r[codes[r, :]] for r < rows. kind 0: fp32, 1: bf16, 2: fp16 (the table's
   values are exact in that dtype, so the conversion only drops zero bits). */
void tz_codebook_dequantize(const int32_t *packed, int64_t wstride, const float *books, int64_t bstride,
                            int bits, int64_t rows, int64_t k, void *out, int64_t ostride, int kind,
                            int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *tmp = kind ? (float *)aligned_alloc(64, ((k + 15) / 16) * 64) : NULL;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float tab[16];
            const float *book = books + r * bstride;
            load_table(book, bits, tab);
            const float *t = bits <= 4 ? tab : book;
            if (kind == 0) {
                expand_row(packed + r * wstride, t, bits, k, (float *)out + r * ostride, wstride);
                continue;
            }
            expand_row(packed + r * wstride, t, bits, k, tmp, wstride);
            uint16_t *o = (uint16_t *)out + r * ostride;
            int64_t j = 0;
            if (kind == 1) {
                for (; j + 8 <= k; j += 8) {
                    __m256i v = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(tmp + j)), 16);
                    v = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
                    _mm_storeu_si128((__m128i *)(o + j), _mm256_castsi256_si128(v));
                }
                for (; j < k; j++) { uint32_t u; memcpy(&u, tmp + j, 4); o[j] = (uint16_t)(u >> 16); }
            } else {
                for (; j + 8 <= k; j += 8)
                    _mm_storeu_si128((__m128i *)(o + j), _mm256_cvtps_ph(_mm256_loadu_ps(tmp + j), 0));
                for (; j < k; j++) o[j] = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(tmp[j]), 0), 0);
            }
        }
        free(tmp);
    }
}

/* y[i, n + r] = x[i] . w[r] for up to 4 rows of x (stride xs) and R = 1 or 2 expanded weight rows
   (stride k): 2 x 4 accumulators, so each load of x feeds two FMAs. */
static void dot_tile(const float *w, int64_t nw, const float *x, int64_t xs, int64_t m, int64_t k, float *y, int64_t ys) {
    __m256 a[2][4];
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < 4; i++) a[r][i] = _mm256_setzero_ps();
    const float *w1 = w + (nw > 1 ? k : 0);
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 v0 = _mm256_loadu_ps(w + j), v1 = _mm256_loadu_ps(w1 + j);
        for (int i = 0; i < 4; i++)
            if (i < m) {
                const __m256 xv = _mm256_loadu_ps(x + i * xs + j);
                a[0][i] = _mm256_fmadd_ps(v0, xv, a[0][i]);
                a[1][i] = _mm256_fmadd_ps(v1, xv, a[1][i]);
            }
    }
    for (int r = 0; r < nw; r++)
        for (int i = 0; i < m; i++) {
            const float *wr = r ? w1 : w;
            float s = hsum(a[r][i]);
            for (int64_t t = j; t < k; t++) s += wr[t] * x[i * xs + t];
            y[i * ys + r] = s;
        }
}

/* y[m, n] = x[m, k] @ W.T for the codebook weight W[n, k]: two weight rows at a time are expanded
   into an L1-sized buffer and dotted with every row of x (M = 1 at 4 bits: in registers). */
void tz_codebook_linear(const float *x, int64_t m, int64_t k, const int32_t *packed, int64_t wstride,
                        const float *books, int64_t bstride, int bits, int64_t n, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *row = (float *)aligned_alloc(64, ((2 * k + 15) / 16) * 64);
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < (n + 1) / 2; p++) {
            const int64_t r0 = 2 * p, nw = r0 + 1 < n ? 2 : 1;
            for (int64_t r = r0; r < r0 + nw; r++) {
                float tab[16];
                const float *book = books + r * bstride;
                load_table(book, bits, tab);
                if (m == 1 && bits == 4) y[r] = dot4(packed + r * wstride, tab, k, x, 2 * wstride);
                else expand_row(packed + r * wstride, bits <= 4 ? tab : book, bits, k, row + (r - r0) * k, 2 * wstride);
            }
            if (m == 1 && bits == 4) continue;
            for (int64_t i = 0; i < m; i += 4)
                dot_tile(row, nw, x + i * k, k, m - i < 4 ? m - i : 4, k, y + i * n + r0, n);
        }
        free(row);
    }
}

/* ---- Fused int8 linear: y[m, n] = x[m, k] @ W.T, W[r, j] = q[r, j] * scales[r, j / group] ----
   The int8 weights are read once per 4 rows of x, widened and (in groups) scaled in registers:
   each vector of weights is exactly the fp32 dequantized weight. Per channel (group == k) the
   row's scale is applied once to its sum. A task is 4 weight rows; a tile is R of them against
   MI rows of x (R x MI accumulators). Rows past the end repeat row 0 and are not stored. */
#define TZ_INT8_TILE(NAME, ATTR, VEC, VW, ZERO, LOADQ, SET1, MUL, FMA, LOADX, HSUM)                    \
static inline __attribute__((always_inline)) ATTR void NAME(                                          \
        const int8_t *q, int64_t qs, const float *sc, int64_t ss, int64_t group, const int grouped,   \
        const float *x, int64_t xs, int64_t k, int nr, int mi, float *y, int64_t ys, const int R,     \
        const int MI) {                                                                               \
    const int8_t *qr[4];                                                                              \
    const float *xr[4];                                                                               \
    for (int r = 0; r < R; r++) qr[r] = q + (r < nr ? r : 0) * qs;                                    \
    for (int i = 0; i < MI; i++) xr[i] = x + (i < mi ? i : 0) * xs;                                   \
    const int64_t pf = 4 * qs; /* the same place in the next task's rows */                           \
    VEC acc[4][4];                                                                                    \
    float tail[4][4];                                                                                 \
    for (int r = 0; r < R; r++)                                                                       \
        for (int i = 0; i < MI; i++) { acc[r][i] = ZERO; tail[r][i] = 0.0f; }                         \
    for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, gi++) {                                        \
        const int64_t g1 = g0 + group < k ? g0 + group : k;                                          \
        float s[4];                                                                                   \
        VEC sv[4];                                                                                    \
        for (int r = 0; r < R; r++) { s[r] = grouped ? sc[(r < nr ? r : 0) * ss + gi] : 1.0f; sv[r] = SET1(s[r]); } \
        int64_t j = g0;                                                                               \
        for (; j + VW <= g1; j += VW) {                                                               \
            VEC w[4];                                                                                 \
            for (int r = 0; r < R; r++) {                                                            \
                PREFETCH(qr[r] + j + pf);                                                             \
                w[r] = LOADQ(qr[r] + j);                                                              \
                if (grouped) w[r] = MUL(w[r], sv[r]);                                                 \
            }                                                                                         \
            for (int i = 0; i < MI; i++) {                                                            \
                const VEC xv = LOADX(xr[i] + j);                                                      \
                for (int r = 0; r < R; r++) acc[r][i] = FMA(w[r], xv, acc[r][i]);                     \
            }                                                                                         \
        }                                                                                             \
        for (; j < g1; j++)                                                                           \
            for (int r = 0; r < R; r++)                                                               \
                for (int i = 0; i < MI; i++) tail[r][i] += ((float)qr[r][j] * s[r]) * xr[i][j];       \
    }                                                                                                 \
    for (int r = 0; r < nr; r++)                                                                      \
        for (int i = 0; i < mi; i++) {                                                                \
            const float v = HSUM(acc[r][i]) + tail[r][i];                                             \
            y[i * ys + r] = grouped ? v : v * sc[r * ss];                                             \
        }                                                                                             \
}

#define TZ_INT8_LINEAR(NAME, TILE, ATTR)                                                              \
ATTR void NAME(const float *x, int64_t m, int64_t k, const int8_t *q, int64_t qs, const float *sc,    \
               int64_t ss, int64_t group, int64_t n, float *y, int threads) {                        \
    const int grouped = group < k;                                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t t = 0; t < (n + 3) / 4; t++) {                                                       \
        const int64_t r0 = 4 * t;                                                                     \
        const int nr = n - r0 < 4 ? (int)(n - r0) : 4;                                                \
        for (int64_t i0 = 0; i0 < m; i0 += 4) {                                                       \
            const int mi = m - i0 < 4 ? (int)(m - i0) : 4;                                           \
            const float *xi = x + i0 * k;                                                             \
            float *yi = y + i0 * n + r0;                                                              \
            /* Literal R, MI and grouped: each call unrolls into its own register tile. */            \
            if (grouped) {                                                                            \
                if (mi == 1) TILE(q + r0 * qs, qs, sc + r0 * ss, ss, group, 1, xi, k, k, nr, 1, yi, n, 4, 1); \
                else if (mi == 2) TILE(q + r0 * qs, qs, sc + r0 * ss, ss, group, 1, xi, k, k, nr, 2, yi, n, 4, 2); \
                else for (int h = 0; h < nr; h += 2)                                                  \
                    TILE(q + (r0 + h) * qs, qs, sc + (r0 + h) * ss, ss, group, 1, xi, k, k, nr - h < 2 ? 1 : 2, mi, yi + h, n, 2, 4); \
            } else {                                                                                  \
                if (mi == 1) TILE(q + r0 * qs, qs, sc + r0 * ss, ss, k, 0, xi, k, k, nr, 1, yi, n, 4, 1); \
                else if (mi == 2) TILE(q + r0 * qs, qs, sc + r0 * ss, ss, k, 0, xi, k, k, nr, 2, yi, n, 4, 2); \
                else for (int h = 0; h < nr; h += 2)                                                  \
                    TILE(q + (r0 + h) * qs, qs, sc + (r0 + h) * ss, ss, k, 0, xi, k, k, nr - h < 2 ? 1 : 2, mi, yi + h, n, 2, 4); \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

#define Q8_AVX2(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
TZ_INT8_TILE(int8_tile_avx2, , __m256, 8, _mm256_setzero_ps(), Q8_AVX2, _mm256_set1_ps, _mm256_mul_ps,
             _mm256_fmadd_ps, _mm256_loadu_ps, hsum)
TZ_INT8_LINEAR(tz_int8_linear_avx2, int8_tile_avx2, )

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define Q16_AVX512(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
TZ_INT8_TILE(int8_tile_avx512, AVX512, __m512, 16, _mm512_setzero_ps(), Q16_AVX512, _mm512_set1_ps,
             _mm512_mul_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps)
TZ_INT8_LINEAR(tz_int8_linear_avx512, int8_tile_avx512, AVX512)

/* ---- 4-bit codebook linear with AVX-512: the row's 16-entry table in one register, so one
   vpermps looks up 16 weights (two words of codes spread over the lanes, shifted per lane). ---- */
#define SPREAD4_AVX512(p) _mm512_srlv_epi32(_mm512_permutexvar_epi32(sel, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(p)))), sh)

static AVX512 void expand_row4_avx512(const int32_t *words, const float *tab, int64_t k, float *out, int64_t pf) {
    const __m512 t = _mm512_loadu_ps(tab);
    const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        if (j % 64 == 0) PREFETCH(words + j / 8 + pf);
        _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8), t));
    }
    for (; j < k; j++) out[j] = tab[((uint32_t)words[j / 8] >> ((j % 8) * 4)) & 15u];
}

static AVX512 float dot4_avx512(const int32_t *words, const float *tab, int64_t k, const float *x, int64_t pf) {
    const __m512 t = _mm512_loadu_ps(tab);
    const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        PREFETCH(words + j / 8 + pf);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8), t), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8 + 2), t), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8 + 4), t), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8 + 6), t), _mm512_loadu_ps(x + j + 48), a3);
    }
    for (; j + 16 <= k; j += 16)
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(SPREAD4_AVX512(words + j / 8), t), _mm512_loadu_ps(x + j), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; j < k; j++) s += tab[((uint32_t)words[j / 8] >> ((j % 8) * 4)) & 15u] * x[j];
    return s;
}

/* y[i, r] = x[i] . w[r] for nw <= 4 expanded rows (stride k) and mi <= 4 rows of x (stride xs):
   4 x 4 accumulators; rows past nw / mi repeat row 0 and are not stored. */
static AVX512 void dot_tile_avx512(const float *w, int nw, const float *x, int64_t xs, int mi, int64_t k, float *y, int64_t ys) {
    const float *wr[4], *xr[4];
    for (int r = 0; r < 4; r++) wr[r] = w + (r < nw ? r : 0) * k;
    for (int i = 0; i < 4; i++) xr[i] = x + (i < mi ? i : 0) * xs;
    __m512 a[4][4];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 4; i++) a[r][i] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        __m512 v[4];
        for (int r = 0; r < 4; r++) v[r] = _mm512_loadu_ps(wr[r] + j);
        for (int i = 0; i < 4; i++) {
            const __m512 xv = _mm512_loadu_ps(xr[i] + j);
            for (int r = 0; r < 4; r++) a[r][i] = _mm512_fmadd_ps(v[r], xv, a[r][i]);
        }
    }
    for (int r = 0; r < nw; r++)
        for (int i = 0; i < mi; i++) {
            float s = _mm512_reduce_add_ps(a[r][i]);
            for (int64_t t = j; t < k; t++) s += wr[r][t] * xr[i][t];
            y[i * ys + r] = s;
        }
}

/* tz_codebook_linear for 4-bit codes: four weight rows a task (M = 1: dotted in registers). */
AVX512 void tz_codebook_linear4_avx512(const float *x, int64_t m, int64_t k, const int32_t *packed, int64_t wstride,
                                       const float *books, int64_t bstride, int64_t n, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *row = (float *)aligned_alloc(64, ((4 * k + 15) / 16) * 64);
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < (n + 3) / 4; p++) {
            const int64_t r0 = 4 * p;
            const int nw = n - r0 < 4 ? (int)(n - r0) : 4;
            for (int r = 0; r < nw; r++) {
                float tab[16];
                load_table(books + (r0 + r) * bstride, 4, tab);
                if (m == 1) y[r0 + r] = dot4_avx512(packed + (r0 + r) * wstride, tab, k, x, 4 * wstride);
                else expand_row4_avx512(packed + (r0 + r) * wstride, tab, k, row + r * k, 4 * wstride);
            }
            if (m == 1) continue;
            for (int64_t i = 0; i < m; i += 4)
                dot_tile_avx512(row, nw, x + i * k, k, m - i < 4 ? (int)(m - i) : 4, k, y + i * n + r0, n);
        }
        free(row);
    }
}

/* ---- 1-D Lloyd's on sorted rows (torchzip.passes.codebook._lloyd_sorted, the same arithmetic) ---- */

static int64_t count_at_most(const float *keys, int64_t n, float mid) {
    int64_t lo = 0, hi = n; /* first position whose key is > mid */
    while (lo < hi) {
        const int64_t m = lo + (hi - lo) / 2;
        if (keys[m] <= mid) lo = m + 1; else hi = m;
    }
    return lo;
}

/* The same count, searched outward from a guess (last iteration's edge: centroids move little,
   so this takes a few probes where a binary search over the row takes log2(n)). */
static int64_t count_near(const float *keys, int64_t n, float mid, int64_t h) {
    int64_t lo, hi, step = 1;
    if (h < n && keys[h] <= mid) { /* the count is past h */
        lo = h + 1;
        hi = lo;
        while (hi < n && keys[hi] <= mid) { lo = hi + 1; hi += step; step *= 2; }
        if (hi > n) hi = n;
    } else { /* the count is at most h */
        hi = h;
        lo = h;
        while (lo > 0 && keys[lo - 1] > mid) { hi = lo - 1; lo -= step; step *= 2; }
        if (lo < 0) lo = 0;
    }
    while (lo < hi) {
        const int64_t m = lo + (hi - lo) / 2;
        if (keys[m] <= mid) lo = m + 1; else hi = m;
    }
    return lo;
}

static double run_end(const double *prefix, int64_t e) { return e > 0 ? prefix[e - 1] : 0.0; }

static int cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Rows of `keys` [g, n] sorted ascending, the first n_valid[r] valid; sum_x / sum_w: inclusive
   float64 running sums of (weighted) values and weights (sum_w NULL: unweighted; sum_x NULL: the
   running sum of the valid keys, summed here in order as torch's cumsum does). centroids
   [g, kk] in/out. Then assign[r, order[r, p]] = cluster of sorted position p (-1 past n_valid), as
   int16: a quarter of the int64 order beside it, and wide enough for 8-bit codebooks. */
/* out[r, j] = (float)q[r, j] * scales[r, j / group] (group = k: one scale a row): the same
   single rounding as widening then multiplying in torch, in one pass over the output. */
void tz_int8_dequantize(const int8_t *q, int64_t qstride, const float *scales, int64_t sstride, int64_t group,
                        int64_t rows, int64_t k, float *out, int64_t ostride, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * qstride;
        const float *sr = scales + r * sstride;
        float *o = out + r * ostride;
        for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, gi++) {  /* a group at a time: no division */
            const int64_t g1 = g0 + group < k ? g0 + group : k;
            const float s = sr[gi];
            const __m256 vs = _mm256_set1_ps(s);
            int64_t j = g0;
            for (; j + 32 <= g1; j += 32) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(qr + j));
                __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), vs));
                _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), vs));
                _mm256_storeu_ps(o + j + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), vs));
                _mm256_storeu_ps(o + j + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), vs));
            }
            for (; j + 8 <= g1; j += 8)
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + j)))), vs));
            for (; j < g1; j++) o[j] = (float)qr[j] * s;
        }
    }
}

void tz_lloyd_sorted(const float *keys, const double *sum_x, const double *sum_w, const int64_t *n_valid,
                     int64_t g, int64_t n, int64_t kk, float *centroids, int iterations, const int64_t *order,
                     int16_t *assign, int threads) {
    const int64_t chunk = 1 << 16;
    const int64_t pieces = (n + chunk - 1) / chunk;
    int64_t *starts = (int64_t *)malloc((size_t)(g * (kk > 1 ? kk - 1 : 1)) * sizeof(int64_t));
    #pragma omp parallel num_threads(threads)
    {
        int64_t *edges = (int64_t *)malloc((size_t)(2 * (kk + 1)) * sizeof(int64_t)), *prev = edges + kk + 1;
        double *own = sum_x ? NULL : (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < g; r++) {
            const float *key = keys + r * n;
            const int64_t nv = n_valid[r];
            if (own) {
                double acc = 0.0;
                for (int64_t p = 0; p < nv; p++) { acc += (double)key[p]; own[p] = acc; }
            }
            const double *sx = own ? own : sum_x + r * n, *sw = sum_w ? sum_w + r * n : NULL;
            float *c = centroids + r * kk;
            for (int it = 0; it < iterations; it++) {
                edges[0] = 0;
                edges[kk] = nv;
                for (int64_t j = 0; j + 1 < kk; j++) {
                    const float mid = (c[j + 1] + c[j]) / 2.0f;
                    const int64_t e = it ? count_near(key, n, mid, prev[j + 1]) : count_at_most(key, n, mid);
                    edges[j + 1] = e < nv ? e : nv;
                }
                if (it > 0 && memcmp(edges, prev, (size_t)(kk + 1) * sizeof(int64_t)) == 0) break;
                memcpy(prev, edges, (size_t)(kk + 1) * sizeof(int64_t));
                for (int64_t j = 0; j < kk; j++) {
                    const double sums = run_end(sx, edges[j + 1]) - run_end(sx, edges[j]);
                    const double counts = sw ? run_end(sw, edges[j + 1]) - run_end(sw, edges[j])
                                             : (double)(edges[j + 1] - edges[j]);
                    if (counts > 0) c[j] = (float)(sums / (counts < 1e-300 ? 1e-300 : counts));
                }
            }
            int64_t *st = starts + r * (kk > 1 ? kk - 1 : 1);
            for (int64_t j = 0; j + 1 < kk; j++)
                st[j] = iterations ? count_near(key, n, (c[j + 1] + c[j]) / 2.0f, prev[j + 1])
                                   : count_at_most(key, n, (c[j + 1] + c[j]) / 2.0f);
            qsort(st, (size_t)(kk > 1 ? kk - 1 : 0), sizeof(int64_t), cmp_i64);
        }
        free(edges);
        free(own);
        /* Cluster of sorted position p: how many cluster starts are <= p. Pieces of rows, so a
           single long row (one codebook per layer) is spread over the threads too. */
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < g * pieces; u++) {
            const int64_t r = u / pieces, p0 = (u % pieces) * chunk, p1 = p0 + chunk < n ? p0 + chunk : n;
            const int64_t ns = kk > 1 ? kk - 1 : 0, nv = n_valid[r];
            const int64_t *st = starts + r * (kk > 1 ? kk - 1 : 1), *ord = order + r * n;
            int16_t *out = assign + r * n;
            int64_t idx = 0;
            while (idx < ns && st[idx] <= p0) idx++;
            for (int64_t p = p0; p < p1; p++) {
                while (idx < ns && st[idx] <= p) idx++;
                out[ord[p]] = p < nv ? (int16_t)idx : (int16_t)-1;
            }
        }
    }
    free(starts);
}
/* The left-hand sides of a least-squares codebook refit: lhs[r] = A_r^T H A_r (float64
   [kk, kk]) for the one-hot A_r [K, kk] of each row's codes slots[r] (kk: no centroid), H fp32
   [K, K] symmetric. For a tile of H's columns, each row sums the rows of H that share a code
   (b[a, :] += H[i, tile]: vector adds, where a one-hot matmul would do kk times the flops), then
   sums each of those over the tile's columns by their code, in float64. By symmetry only the
   rows from the tile down are read: the tile's own block once, the rows below it for both
   (a, b) and (b, a) (half the adds). A block of REFIT_ROWS rows shares every H tile while it is
   in cache (their b: REFIT_ROWS (kk + 1) REFIT_TILE floats, L2-sized at kk 16). */
#define REFIT_ROWS 32
#define REFIT_TILE 128
static void refit_rows_into(const float *h, int64_t K, const int32_t *slots, int64_t r0, int64_t r1, int64_t kk,
                            int64_t j0, int64_t t, int64_t i0, int64_t i1, float *b) {
    memset(b, 0, (size_t)((r1 - r0) * (kk + 1) * REFIT_TILE) * sizeof(float));
    for (int64_t i = i0; i < i1; i++) {
        const float *restrict hi = h + i * K + j0;
        for (int64_t r = r0; r < r1; r++) {
            float *restrict br = b + ((r - r0) * (kk + 1) + slots[r * K + i]) * REFIT_TILE;
            for (int64_t j = 0; j < t; j++) br[j] += hi[j];
        }
    }
}

static void refit_flush(const int32_t *slots, int64_t K, int64_t r0, int64_t r1, int64_t kk, int64_t j0, int64_t t,
                        const float *b, int mirror, double *lhs) {
    for (int64_t r = r0; r < r1; r++) {
        const int32_t *s = slots + r * K + j0;
        double *L = lhs + r * kk * kk;
        for (int64_t a = 0; a < kk; a++) {
            const float *br = b + ((r - r0) * (kk + 1) + a) * REFIT_TILE;
            for (int64_t j = 0; j < t; j++) {
                if (s[j] >= kk) continue;
                L[a * kk + s[j]] += (double)br[j];
                if (mirror) L[s[j] * kk + a] += (double)br[j];
            }
        }
    }
}

void tz_refit_lhs(const float *h, int64_t K, const int32_t *slots, int64_t n, int64_t kk, double *lhs, int threads) {
    const int64_t blocks = (n + REFIT_ROWS - 1) / REFIT_ROWS;
    #pragma omp parallel num_threads(threads)
    {
        float *b = (float *)aligned_alloc(64, (size_t)(REFIT_ROWS * (kk + 1) * REFIT_TILE) * sizeof(float));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t r0 = blk * REFIT_ROWS, r1 = r0 + REFIT_ROWS < n ? r0 + REFIT_ROWS : n;
            memset(lhs + r0 * kk * kk, 0, (size_t)((r1 - r0) * kk * kk) * sizeof(double));
            for (int64_t j0 = 0; j0 < K; j0 += REFIT_TILE) {
                const int64_t t = j0 + REFIT_TILE < K ? REFIT_TILE : K - j0;
                refit_rows_into(h, K, slots, r0, r1, kk, j0, t, j0, j0 + t, b);  /* the diagonal block */
                refit_flush(slots, K, r0, r1, kk, j0, t, b, 0, lhs);
                if (j0 + t < K) {
                    refit_rows_into(h, K, slots, r0, r1, kk, j0, t, j0 + t, K, b);  /* below it, and its mirror */
                    refit_flush(slots, K, r0, r1, kk, j0, t, b, 1, lhs);
                }
            }
        }
        free(b);
    }
}
/* One block of GPTQ columns onto per-row codebooks (torchzip.passes.calibrated.gptq with the
   nearest centroid as its grid, bit for bit). Inside a block the error feedback stays within a
   row, so each row runs alone: column i takes the first nearest of the row's kk centroids
   (q = 0 where keep is 0), err = (w - q) / u[i, i], and w[i'] -= err * u[i, i'] for i' >= i, the
   same operations in the same order as torch's (this file builds with -std=c11: no FMA
   contraction). w [n, bw] float64 in/out, u [bw, bw] the block's upper factor, book [n or 1, kk]
   float64 (bstride 0: one book), keep [n, bw] uint8 or NULL; codes [n, bw] int64 and err
   [n, bw] float64 out. Rows on OpenMP threads. */
void tz_gptq_codebook_block(double *w, int64_t wstride, const double *u, int64_t ustride, const double *book,
                            int64_t bstride, const uint8_t *keep, int64_t kstride, int64_t n, int64_t bw, int64_t kk,
                            int64_t *codes, int64_t cstride, double *err, int64_t estride, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        double *wr = w + r * wstride, *er = err + r * estride;
        const double *b = book + r * bstride;
        int64_t *cr = codes + r * cstride;
        for (int64_t i = 0; i < bw; i++) {
            const double x = wr[i];
            int64_t best = 0;
            double bd = fabs(x - b[0]);
            for (int64_t c = 1; c < kk; c++) {
                const double d = fabs(x - b[c]);
                if (d < bd) { bd = d; best = c; }
            }
            cr[i] = best;
            const double q = (keep && !keep[r * kstride + i]) ? 0.0 : b[best];
            const double e = (x - q) / u[i * ustride + i];
            const double *ui = u + i * ustride;
            for (int64_t j = i; j < bw; j++) wr[j] -= e * ui[j];
            er[i] = e;
        }
    }
}
"""

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# Threads of a dequantize. One: a block dequantized on two threads, then multiplied by torch's
# BLAS on two, took twice as long as on one thread (2-core Zen 2, M = 1: the thread teams of the
# two parallel regions fight), while a one-thread dequantize beside a two-thread matmul did not.
DEQUANTIZE_THREADS = 1
# Rows of x the fused linears take; above, dequantizing blocks of rows into a buffer + BLAS wins
# (benchmarks/scale.py; the codebook's expansion is paid once per four rows of x, int8's widening
# is cheaper).
LINEAR_MAX_M = 32
INT8_MAX_M = 64
# The fused linears sum in their own order: equal to dequantize + F.linear within fp32 rounding,
# not bit for bit. On by default (for weights over base.BLOCK values, the only ones they take);
# set_fused(False) or TORCHZIP_CPU_FUSED=0 keeps CPU outputs bitwise those of the trainable model.
_fused = os.environ.get("TORCHZIP_CPU_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


def set_fused(enabled: bool) -> None:
    """Let large packed layers on CPU use the fused linears for small M (int8: M <= INT8_MAX_M,
    codebook: M <= LINEAR_MAX_M; several times the speed of dequantize + BLAS at M = 1; outputs
    equal within fp32 rounding, not bit for bit). On by default; also ``TORCHZIP_CPU_FUSED=0``."""
    global _fused
    _fused = bool(enabled)


def fused() -> bool:
    """Whether the fused linears are turned on (see :func:`set_fused`)."""
    return _fused


def fused_rows(x: torch.Tensor, k: int, max_m: int) -> int:
    """Rows of ``x`` (``[..., k]``) a fused linear takes: ``M`` when the linears are on, built,
    and ``0 < M <= max_m`` for an fp32/bf16/fp16 ``x``; else 0."""
    m = x.numel() // max(k, 1)
    return m if _fused and 0 < m <= max_m and x.dtype in _KIND and available() else 0

def fused_output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A fused linear's fp32 ``[M, N]`` result as the layer returns it: plus ``bias`` (rounded to
    ``x.dtype`` first, as ``F.linear`` would see it), in ``x.dtype``, shaped ``[..., N]``."""
    if bias is not None:
        y += bias.to(x.dtype).float()
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[1])


def _cpu_flags() -> set[str]:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split())


# Vector width of the int8 and 4-bit codebook linears: AVX-512 where the CPU has it, unless
# TORCHZIP_CPU_ISA=avx2 (to measure what an AVX2-only CPU would run).
ISA = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags()
       and os.environ.get("TORCHZIP_CPU_ISA", "").strip().lower() != "avx2" else "avx2")

_lib: ctypes.CDLL | None = None
_state = "unknown"  # "unknown" until first use, then "ok" or why not
_lock = threading.Lock()


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "gcc")
    key = hashlib.sha256((SOURCE + " ".join(FLAGS) + cc).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCHZIP_CACHE", Path.home() / ".cache" / "torchzip"))
    path = cache / f"cpu_{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "cpu.c"
            src.write_text(SOURCE)
            lib = Path(tmp) / "lib.so"
            subprocess.run([cc, *FLAGS, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
            os.replace(lib, path)  # atomic: a concurrent process sees the whole file or none
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.tz_codebook_dequantize.argtypes = [ptr, i64, ptr, i64, i32, i64, i64, ptr, i64, i32, i32]
    lib.tz_codebook_dequantize.restype = None
    lib.tz_codebook_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i32, i64, ptr, i32]
    lib.tz_codebook_linear.restype = None
    lib.tz_int8_dequantize.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, i32]
    lib.tz_int8_dequantize.restype = None
    lib.tz_codebook_linear4_avx512.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, ptr, i32]
    lib.tz_codebook_linear4_avx512.restype = None
    for isa in ("avx2", "avx512"):
        fn = getattr(lib, f"tz_int8_linear_{isa}")
        fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i32]
        fn.restype = None
    lib.tz_lloyd_sorted.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i32, ptr, ptr, i32]
    lib.tz_lloyd_sorted.restype = None
    lib.tz_refit_lhs.argtypes = [ptr, i64, ptr, i64, i64, ptr, i32]
    lib.tz_refit_lhs.restype = None
    lib.tz_gptq_codebook_block.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i32]
    lib.tz_gptq_codebook_block.restype = None
    return lib


def _self_check(lib: ctypes.CDLL) -> bool:
    # Every bit width, a ragged row and per-row / shared tables against torch's own lookup.
    global _lib
    _lib = lib
    gen = torch.Generator().manual_seed(0)
    from torchzip.packed.bits import pack_bits

    for bits in range(1, 9):
        for rows_of_books in (5, 1):
            idx = torch.randint(0, 2**bits, (5, 37), generator=gen)
            book = torch.randn(rows_of_books, 2**bits, generator=gen)
            want = book.gather(1, idx) if rows_of_books > 1 else book[0][idx]
            got = torch.empty(5, 37)
            dequantize_rows(pack_bits(idx, bits), book, bits, got)
            if not torch.equal(got, want):
                return False
            for m in (3, 1):  # M = 1 dots in registers
                x = torch.randn(m, 37, generator=gen)
                y = linear(x, pack_bits(idx, bits), book, bits, 37)
                ref = x.double() @ want.double().t()
                if not bool(((y.double() - ref).abs() <= 1e-5 * (x.double().abs() @ want.double().abs().t()) + 1e-30).all()):
                    return False
    for group in (37 * 2, 8, 3):  # one scale a row (k = 74), groups of 8 (vector path), ragged groups
        q = torch.randint(-128, 128, (5, 74), generator=gen, dtype=torch.int8)
        scales = torch.rand(5, 74 // group if 74 % group == 0 else -(-74 // group), generator=gen) + 1e-3
        got = torch.empty(5, 74)
        int8_dequantize_rows(q, scales, group, got)
        w = q.float() * scales.repeat_interleave(group, 1)[:, :74]
        if not torch.equal(got, w):
            return False
        x = torch.randn(6, 74, generator=gen)
        ref, bound = x.double() @ w.double().t(), 1e-5 * (x.double().abs() @ w.double().abs().t())
        for isa in ("avx2", "avx512") if ISA == "avx512" else ("avx2",):
            y = torch.empty(6, 5)
            getattr(lib, f"tz_int8_linear_{isa}")(x.data_ptr(), 6, 74, q.data_ptr(), 74, scales.data_ptr(),
                                                  scales.shape[1], group, 5, y.data_ptr(), 1)
            if not bool(((y.double() - ref).abs() <= bound).all()):
                return False
    return True


def available() -> bool:
    """Whether the compiled kernels can be used (built, checked; not turned off by the environment)."""
    global _lib, _state
    if os.environ.get("TORCHZIP_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if _state == "unknown":
        with _lock:
            if _state == "unknown":
                try:
                    if not _cpu_ok():
                        _state = "the CPU lacks AVX2/FMA/F16C"
                    else:
                        lib = _build()
                        _state = "ok" if _self_check(lib) else "the compiled lookup disagreed with torch"
                except subprocess.CalledProcessError as e:
                    _state = f"could not build: {e.stderr.decode(errors='replace').strip()[-300:]}"
                except (OSError, subprocess.SubprocessError) as e:
                    _state = f"could not build: {e}"
                if _state != "ok":
                    _lib = None
    return _state == "ok"


def why_not() -> str:
    """``"ok"``, or why the compiled kernels are not used."""
    if not available() and _state in ("ok", "unknown"):
        return "turned off by TORCHZIP_CPU_KERNELS"
    return _state


_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _books(book: torch.Tensor) -> tuple[torch.Tensor, int]:
    # One table per row, or one for all rows (stride 0).
    book = book.float().contiguous()
    return book, (book.shape[1] if book.shape[0] > 1 else 0)


def _need(ok: bool, what: str) -> None:
    if _lib is None or not ok:
        raise RuntimeError(f"cpu kernels: {what}" if _lib is not None else "cpu kernels: kernels not available()")


def dequantize_rows(packed: torch.Tensor, book: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """``out[r] = book[r or 0][codes of packed[r]]``: ``packed`` ``[R, words]`` int32, ``book``
    ``[R or 1, 2**bits]`` holding values exact in ``out.dtype``, ``out`` ``[R, K]`` fp32/bf16/fp16
    with unit stride along K. Returns ``out``."""
    _need(out.dtype in _KIND and out.stride(-1) == 1 and packed.is_contiguous() and packed.dtype == torch.int32,
          "dequantize_rows takes contiguous int32 codes and an fp32/bf16/fp16 out with unit stride")
    book, bstride = _books(book)
    _lib.tz_codebook_dequantize(packed.data_ptr(), packed.shape[1], book.data_ptr(), bstride, bits, out.shape[0],
                                out.shape[1], out.data_ptr(), out.stride(0), _KIND[out.dtype], DEQUANTIZE_THREADS)
    return out


def int8_dequantize_rows(q: torch.Tensor, scales: torch.Tensor, group: int, out: torch.Tensor) -> torch.Tensor:
    """``out[r, j] = float(q[r, j]) * scales[r, j // group]`` (bit for bit torch's widen then
    multiply): ``q`` ``[R, K]`` int8, ``scales`` ``[R, ceil(K / group)]`` fp32, ``out`` ``[R, K]``
    fp32; unit stride along K for all three. Returns ``out``."""
    rows, k = q.shape
    _need(q.dtype == torch.int8 and scales.dtype == torch.float32 and out.dtype == torch.float32
          and q.stride(-1) == 1 and scales.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == q.shape
          and scales.shape[0] == rows and group >= 1 and scales.shape[1] * group >= k,
          "int8_dequantize_rows takes int8 q, fp32 scales and an fp32 out of q's shape, unit stride along K")
    _lib.tz_int8_dequantize(q.data_ptr(), q.stride(0), scales.data_ptr(), scales.stride(0), group, rows, k,
                            out.data_ptr(), out.stride(0), DEQUANTIZE_THREADS)
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, book: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``x @ W.T`` (fp32 ``[M, K]`` in, fp32 ``[M, N]`` out) for the codebook weight ``W`` whose
    codes are ``packed`` ``[N, words]`` and tables ``book`` ``[N or 1, 2**bits]`` (fp32)."""
    _need(x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and packed.dtype == torch.int32,
          "linear takes fp32 x [M, K] and int32 codes")
    x, packed = x.contiguous(), packed.contiguous()
    n = packed.shape[0]
    book, bstride = _books(book)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if bits == 4 and ISA == "avx512":  # one vpermps for 16 weights
        _lib.tz_codebook_linear4_avx512(x.data_ptr(), x.shape[0], k, packed.data_ptr(), packed.shape[1], book.data_ptr(),
                                        bstride, n, y.data_ptr(), torch.get_num_threads())
        return y
    _lib.tz_codebook_linear(x.data_ptr(), x.shape[0], k, packed.data_ptr(), packed.shape[1], book.data_ptr(),
                            bstride, bits, n, y.data_ptr(), torch.get_num_threads())
    return y


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ W.T`` (fp32 ``[M, K]`` in, fp32 ``[M, N]`` out) for the int8 weight
    ``W[r, j] = q[r, j] * scales[r, j // group]`` (``q`` ``[N, K]`` int8, ``scales``
    ``[N, ceil(K / group)]`` fp32; ``group`` = K: one scale a row). Reads ``q`` once per four rows
    of ``x``; rows of the output split over ``torch.get_num_threads()`` threads."""
    n, k = q.shape
    _need(x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and q.dtype == torch.int8
          and scales.dtype == torch.float32 and scales.dim() == 2 and scales.shape[0] == n
          and 1 <= group and scales.shape[1] * group >= k,
          "int8_linear takes fp32 x [M, K], int8 q [N, K] and fp32 scales [N, ceil(K / group)]")
    x, q, scales = x.contiguous(), q.contiguous(), scales.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    group = min(group, k)
    # 16-wide vectors need groups of 16 (per channel: any K); else 8-wide.
    isa = "avx512" if ISA == "avx512" and (group == k or group % 16 == 0) else "avx2"
    getattr(_lib, f"tz_int8_linear_{isa}")(x.data_ptr(), x.shape[0], k, q.data_ptr(), q.stride(0), scales.data_ptr(),
                                           scales.stride(0), group, n, y.data_ptr(), torch.get_num_threads())
    return y


def lloyd_sorted(keys: torch.Tensor, order: torch.Tensor, n_valid: torch.Tensor, sum_x: torch.Tensor | None,
                 sum_w: torch.Tensor | None, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations and the final assignment of ``torchzip.passes.codebook._lloyd_sorted``
    from its sorted rows and running sums (``sum_x`` None: the running sums of the valid keys,
    summed here), bit for bit, a row per thread. Returns ``(centroids
    [G, k] fp32, assign [G, n] int16 in the input's order, -1 past each row's valid count)``."""
    _need(keys.dtype == torch.float32 and order.dtype == torch.int64, "lloyd_sorted takes fp32 keys, int64 order")
    g, n = keys.shape
    keys, order = keys.contiguous(), order.contiguous()
    sum_x = None if sum_x is None else sum_x.contiguous()
    sum_w = None if sum_w is None else sum_w.contiguous()
    n_valid = n_valid.reshape(g).to(torch.int64).contiguous()
    centroids = centroids.float().contiguous().clone()
    assign = torch.empty(g, n, dtype=torch.int16)
    _lib.tz_lloyd_sorted(keys.data_ptr(), None if sum_x is None else sum_x.data_ptr(), None if sum_w is None else sum_w.data_ptr(),
                         n_valid.data_ptr(), g, n, centroids.shape[1], centroids.data_ptr(), iterations,
                         order.data_ptr(), assign.data_ptr(), torch.get_num_threads())
    return centroids, assign


def refit_lhs(h: torch.Tensor, slots: torch.Tensor, k: int) -> torch.Tensor:
    """``A_r^T H A_r`` ``[N, k, k]`` (float64) for each row's one-hot ``A_r`` of ``slots``
    ``[N, K]`` (codes ``0..k-1``; ``k``: no centroid, left out) and a symmetric ``H`` ``[K, K]``
    (only its lower triangle read): ``H`` summed in fp32 by code, then in float64; rows on
    OpenMP threads. For :func:`torchzip.passes.calibrated.refit_codebook`."""
    n, size = slots.shape
    _need(h.shape == (size, size) and 0 < k and bool(((slots >= 0) & (slots <= k)).all()),
          "refit_lhs takes H [K, K] and slots [N, K] in 0..k")
    h = h.float().contiguous()
    slots = slots.to(torch.int32).contiguous()
    lhs = torch.empty(n, k, k, dtype=torch.float64)
    _lib.tz_refit_lhs(h.data_ptr(), size, slots.data_ptr(), n, k, lhs.data_ptr(), torch.get_num_threads())
    return lhs


def gptq_codebook_block(w: torch.Tensor, u: torch.Tensor, book: torch.Tensor, keep: torch.Tensor | None,
                        codes: torch.Tensor, err: torch.Tensor) -> None:
    """One block of GPTQ columns onto codebooks, in place: ``w`` ``[N, B]`` float64 (the block
    with the earlier blocks' feedback; left updated), ``u`` ``[B, B]`` float64 (its part of the
    inverse Hessian factor), ``book`` ``[N or 1, k]`` float64, ``keep`` ``[N, B]`` bool or None;
    writes each weight's nearest centroid into ``codes`` ``[N, B]`` int64 and its scaled error
    into ``err`` ``[N, B]`` float64, as :func:`torchzip.passes.calibrated.gptq` does (bit for bit)."""
    n, bw = w.shape
    _need(w.dtype == u.dtype == book.dtype == err.dtype == torch.float64 and codes.dtype == torch.int64
          and u.shape == (bw, bw) and book.dim() == 2 and book.shape[0] in (1, n) and codes.shape == err.shape == (n, bw)
          and all(t.stride(-1) == 1 for t in (w, u, codes, err)) and (keep is None or keep.shape == (n, bw)),
          "gptq_codebook_block takes float64 w [N, B], u [B, B], book [N or 1, k], err, int64 codes, unit stride")
    book = book.contiguous()
    keep = None if keep is None else keep.to(torch.uint8).contiguous()
    _lib.tz_gptq_codebook_block(w.data_ptr(), w.stride(0), u.data_ptr(), u.stride(0), book.data_ptr(),
                                book.shape[1] if book.shape[0] > 1 else 0, None if keep is None else keep.data_ptr(),
                                bw, n, bw, book.shape[1], codes.data_ptr(), codes.stride(0), err.data_ptr(),
                                err.stride(0), torch.get_num_threads())
