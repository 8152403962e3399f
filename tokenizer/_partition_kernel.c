/*
 * Region scores of the entropy partition, for tokenizer/partition.py (SPEC.md section 3).
 *
 * For each region of a float32 tile: resize to 64x64 exactly as cv2.resize(INTER_LINEAR) does for float32; the
 * bin of every Sobel gradient magnitude in numpy's 512-bin histogram over [-5.5, 5.5], exactly as numpy bins the
 * float64 magnitude sqrt(gx*gx + gy*gy) of cv2.Sobel(CV_64F, ksize 3, replicated border); the entropy of the
 * histogram exactly as numpy computes it; and the score entropy**weight * height * width.
 *
 * Every floating-point operation below is meant literally: the file must be compiled with
 * -ffp-contract=off (no fused multiply-adds except the explicit fmaf calls) and without -ffast-math.
 * tokenizer/_partition_native.py compiles and loads it; tests/test_partition.py checks it against OpenCV
 * and numpy.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC and Clang on x86-64 Linux build every function for AVX-512F, for FMA (with AVX) and for plain x86-64,
 * and pick one by the CPU's features when the library is loaded (without FMA, fmaf is a library call). Every
 * variant computes the same values: the arithmetic is IEEE in all of them, fmaf is exact everywhere, and no
 * variant contracts or reassociates. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define CPU_VARIANTS __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define CPU_VARIANTS
#endif

#define SIDE 64
#define MAGNITUDE_BINS 256
/* Width of one of the 512 histogram bins, 11/512: a dyadic fraction, so j * BIN_WIDTH is exact, and so are
 * numpy's bin edges, which makes numpy's binning the exact rule j * BIN_WIDTH <= m < (j + 1) * BIN_WIDTH for the
 * upper bins 256 + j (a magnitude is never negative). */
#define BIN_WIDTH (11.0 / 512.0)

/* ------------------------------------------------------------------------------------------------------------
 * Grey conversion */

/* The tile values (grey + 1) / 2 of `pixels` uint8 RGB pixels, in the released float32 arithmetic: each channel
 * u / 127.5 - 1 in float64 rounded to float32 (`signed`, 256 entries), then float32 throughout. */
CPU_VARIANTS void gps_unit_image(const uint8_t *rgb, int64_t pixels, const float *signed_value, float *out)
{
    for (int64_t i = 0; i < pixels; i++) {
        const uint8_t *p = rgb + 3 * i;
        float grey = (0.299f * signed_value[p[0]] + 0.587f * signed_value[p[1]]) + 0.114f * signed_value[p[2]];
        out[i] = (grey + 1.0f) / 2.0f;
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * Resize */

/* Where each of the 64 output pixels of one axis reads its two sources, for a source axis of n pixels:
 * OpenCV's INTER_LINEAR mapping (pixel centres, coordinate and fraction in float, clamped at both ends). */
CPU_VARIANTS static void linear_axis(int n, int *first, int *second, float *fraction)
{
    const double scale = 1.0 / ((double)SIDE / (double)n);
    for (int d = 0; d < SIDE; d++) {
        float position = (float)((d + 0.5) * scale - 0.5);
        int index = (int)floorf(position);
        position -= (float)index;
        if (index < 0) {
            index = 0;
            position = 0.0f;
        }
        if (index >= n - 1) {
            index = n - 1;
            position = 0.0f;
        }
        first[d] = index;
        second[d] = index + 1 < n ? index + 1 : index;
        fraction[d] = position;
    }
}

/* One source row, resized along x to 64 pixels: s0 + (s1 - s0) * a with a single rounding of the product-sum. */
CPU_VARIANTS static void resize_row(const float *row, const int *first, const int *second, const float *fraction,
                                    float *out)
{
    for (int d = 0; d < SIDE; d++) {
        float s0 = row[first[d]];
        out[d] = fmaf(row[second[d]] - s0, fraction[d], s0);
    }
}

/* cv2.resize(region, (64, 64)) of a height x width float32 region whose rows are `stride` floats apart, into
 * 64 rows `out_stride` floats apart. */
CPU_VARIANTS static void resize64(const float *src, int64_t stride, int height, int width, float *out, int out_stride)
{
    if (height == SIDE && width == SIDE) { /* OpenCV copies an image that already has the target size */
        for (int y = 0; y < SIDE; y++)
            memcpy(out + y * out_stride, src + y * stride, SIDE * sizeof(float));
        return;
    }
    int first_x[SIDE], second_x[SIDE], first_y[SIDE], second_y[SIDE];
    float fraction_x[SIDE], fraction_y[SIDE];
    linear_axis(width, first_x, second_x, fraction_x);
    linear_axis(height, first_y, second_y, fraction_y);

    /* The x-resized source rows first_y[d] and second_y[d], kept while they are reused. */
    float upper[SIDE], lower[SIDE];
    int upper_row = -1, lower_row = -1;
    for (int d = 0; d < SIDE; d++) {
        int y0 = first_y[d], y1 = second_y[d];
        if (y0 != upper_row) {
            if (y0 == lower_row)
                memcpy(upper, lower, sizeof upper);
            else
                resize_row(src + y0 * stride, first_x, second_x, fraction_x, upper);
            upper_row = y0;
        }
        if (y1 != lower_row) {
            resize_row(src + y1 * stride, first_x, second_x, fraction_x, lower);
            lower_row = y1;
        }
        const float b = fraction_y[d];
        float *dst = out + d * out_stride;
        for (int x = 0; x < SIDE; x++)
            dst[x] = fmaf(lower[x] - upper[x], b, upper[x]);
    }
}

/* For tests: resize64 into a 64x64 image. */
CPU_VARIANTS void gps_resize64(const float *src, int64_t stride, int height, int width, float *out)
{
    resize64(src, stride, height, width, out, SIDE);
}

/* ------------------------------------------------------------------------------------------------------------
 * Magnitude bins
 *
 * The bins come from a float32 Sobel and magnitude, v = sqrtf(gx*gx + gy*gy) * (float)(1 / BIN_WIDTH), trusted
 * where v is farther than MARGIN from a bin edge (an integer); the few others are recomputed in float64 in
 * OpenCV's and numpy's exact arithmetic. Bound on |v - m / BIN_WIDTH|, m the float64 magnitude numpy bins, for
 * a 64x64 image with every |value| <= 1.25 (checked; tiles lie in [0, 1]) and v < V_LIMIT (checked), u = 2^-24:
 *  - float32 gradient: with the orders below, each rounding adds at most u times the size of its exact result,
 *    and those are at most 2, 6, 8 (times 1.25) for gx's difference, partial sum and sum, and 3, 4, 8 for gy's
 *    partial sum, sum and difference; so |gx - gx*| <= 22 * 1.25 u and |gy - gy*| <= 22 * 1.25 u (gx*, gy*: the
 *    exact gradient of the float32 image, plus O(u^2)), and the gradient vector is off by at most 39 u.
 *  - the magnitude is 1-Lipschitz in the vector; times 1 / BIN_WIDTH = 46.55 that is 1815 u bins.
 *  - squares, sum, sqrtf, the float32 scale and the product add a relative error of at most 4 u (+O(u^2)): at
 *    most 4 u * V_LIMIT = 928 u bins.
 *  - the float64 magnitude m is within 1e-12 bins of the exact one (the same analysis with u = 2^-53).
 * So |v - m / BIN_WIDTH| < 2750 u = 1.7e-4 bins, and MARGIN = 2^-11 = 4.9e-4 bins leaves a factor 2.8.
 * An inexact bin from v would need v within that bound of an integer j >= 1 (bin 0's lower edge 0 needs no
 * margin: m >= 0). v - (float)floor(v) is exact in float32, so the test on it is exact too. */
#define MARGIN (1.0f / 2048.0f)
/* v of a magnitude of 5 (232.7 bins), less the bound: a certified v below it has m < 5, inside [0, 5.5). A
 * larger one cannot come from values in [0, 1] (at most sqrt(20) = 4.47) and is reported as an error. */
#define V_LIMIT 232.0f
#define VALUE_LIMIT 1.25f

/* numpy's bin of the float64 magnitude sqrt(squared): an estimate off by at most one, corrected against the exact
 * edges, as numpy.histogram does. */
static int exact_bin(double squared)
{
    double m = sqrt(squared);
    int j = (int)(m * (1.0 / BIN_WIDTH));
    j -= m < j * BIN_WIDTH;
    j += m >= (j + 1) * BIN_WIDTH;
    return j;
}

/* The resized region is held with a replicated border column on either side (PADDED floats a row), so that the
 * row passes read whole rows without tests (and from memory written long before: no store-forwarding stalls). */
#define PADDED (SIDE + 2)

/* The bin of pixel (y, x) of the padded 64x64 image from the float64 Sobel, in cv2.Sobel(CV_64F)'s order of
 * operations: row passes difference = S[x+1] - S[x-1] and smooth = (S[x-1] + 2 S[x]) + S[x+1], then column
 * passes gx = (d[y-1] + 2 d[y]) + d[y+1] and gy = s[y+1] - s[y-1], borders replicated. */
static int exact_pixel_bin(const float *padded, int y, int x)
{
    const int rows[3] = {y > 0 ? y - 1 : 0, y, y + 1 < SIDE ? y + 1 : y};
    double difference[3], smooth[3];
    for (int r = 0; r < 3; r++) {
        const float *p = padded + rows[r] * PADDED + x; /* p[1] is pixel x, p[0] and p[2] its neighbours */
        difference[r] = (double)p[2] - (double)p[0];
        smooth[r] = ((double)p[0] + 2.0 * (double)p[1]) + (double)p[2];
    }
    double gx = (difference[0] + 2.0 * difference[1]) + difference[2];
    double gy = smooth[2] - smooth[0];
    return exact_bin(gx * gx + gy * gy);
}

/* float32 row passes of one padded image row (see exact_pixel_bin for the order). */
CPU_VARIANTS static void row_passes(const float *restrict p, float *restrict difference, float *restrict smooth)
{
    for (int x = 0; x < SIDE; x++) {
        difference[x] = p[x + 2] - p[x];
        smooth[x] = (p[x] + 2.0f * p[x + 1]) + p[x + 2];
    }
}

/* Whether a value of the padded image is out of [-VALUE_LIMIT, VALUE_LIMIT] (NaN fails the magnitude test). */
CPU_VARIANTS static int out_of_range(const float *padded)
{
    int bad = 0;
    for (int i = 0; i < SIDE * PADDED; i++) /* bitwise, not ||: a branch-free test the compiler vectorises */
        bad |= (padded[i] < -VALUE_LIMIT) | (padded[i] > VALUE_LIMIT);
    return bad;
}

/* Row y's bins, the float32 v from which they come, and whether one of them is unsure or out of range. */
struct row_bins {
    int bin[SIDE];
    float v[SIDE];
    int unsure;
};

/* Whether the bin j = (int)v is not certain (see above), or v is out of range (or NaN). */
static inline __attribute__((always_inline)) int unsure_bin(float v, int j)
{
    float fraction = v - (float)j;
    return (fraction < MARGIN && j > 0) | (fraction > 1.0f - MARGIN) | !(v < V_LIMIT);
}

/* Makes row y's bins exact (see above) and counts them into four interleaved sub-histograms, so that runs of equal
 * bins do not serialise on one counter. Returns -1 if a magnitude is out of range. */
static int count_row(const float *padded, int y, struct row_bins *row, uint32_t (*partial)[MAGNITUDE_BINS])
{
    if (row->unsure)
        for (int x = 0; x < SIDE; x++)
            if (unsure_bin(row->v[x], row->bin[x])) {
                if (!(row->v[x] < V_LIMIT))
                    return -1;
                row->bin[x] = exact_pixel_bin(padded, y, x);
            }
    for (int x = 0; x < SIDE; x += 4) {
        partial[0][row->bin[x]]++;
        partial[1][row->bin[x + 1]]++;
        partial[2][row->bin[x + 2]]++;
        partial[3][row->bin[x + 3]]++;
    }
    return 0;
}

/* Counts of the 4096 gradient magnitudes of a padded 64x64 image in the 256 bins [j, j + 1) * BIN_WIDTH. Returns
 * -1 if a value or magnitude is out of range (see above). */
CPU_VARIANTS static int magnitude_histogram(const float *padded, uint32_t *counts)
{
    if (out_of_range(padded))
        return -1;
    /* Row passes of image rows y - 1, y, y + 1 (replicated at the top and bottom), in a ring of three. */
    float difference[3][SIDE], smooth[3][SIDE];
    row_passes(padded, difference[0], smooth[0]);
    row_passes(padded + PADDED, difference[1], smooth[1]);
    uint32_t partial[4][MAGNITUDE_BINS];
    memset(partial, 0, sizeof partial);
    /* Row y's bins are made by vector code and counted by scalar code; counting them one row later lets the
     * vector stores reach the cache first (reading them back at once would stall on store forwarding). */
    struct row_bins rows[2];
    for (int y = 0; y < SIDE; y++) {
        int above = y > 0 ? (y - 1) % 3 : 0, here = y % 3, below = y + 1 < SIDE ? (y + 1) % 3 : here;
        if (y > 0 && y + 1 < SIDE)
            row_passes(padded + (y + 1) * PADDED, difference[below], smooth[below]);
        struct row_bins *row = &rows[y % 2];
        int unsure = 0;
        for (int x = 0; x < SIDE; x++) {
            float gx = (difference[above][x] + 2.0f * difference[here][x]) + difference[below][x];
            float gy = smooth[below][x] - smooth[above][x];
            float v = sqrtf(gx * gx + gy * gy) * (float)(1.0 / BIN_WIDTH);
            int j = (int)v;
            unsure |= unsure_bin(v, j);
            row->bin[x] = j;
            row->v[x] = v;
        }
        row->unsure = unsure;
        if (y > 0 && count_row(padded, y - 1, &rows[(y - 1) % 2], partial))
            return -1;
    }
    if (count_row(padded, SIDE - 1, &rows[(SIDE - 1) % 2], partial))
        return -1;
    for (int j = 0; j < MAGNITUDE_BINS; j++)
        counts[j] = partial[0][j] + partial[1][j] + partial[2][j] + partial[3][j];
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * Entropy and score */

/* numpy's pairwise sum of n doubles (n a multiple of 8, at least 8): blocks of at most 128 summed by eight
 * interleaved accumulators, combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)); longer runs split in
 * two halves (the first a multiple of 8) whose sums are added. */
static double pairwise_sum(const double *a, int n)
{
    if (n > 128) {
        int half = n / 2;
        half -= half % 8;
        return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
    }
    double r[8];
    for (int k = 0; k < 8; k++)
        r[k] = a[k];
    for (int i = 8; i < n; i += 8)
        for (int k = 0; k < 8; k++)
            r[k] += a[i + k];
    return ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
}

/* The released entropy -sum(p * log2(p + 1e-10)), p = counts / (4096 + 1e-5), of the 512-bin histogram whose
 * upper half is `counts`. term[c] is numpy's p * log2(p + 1e-10) for a count c (computed by numpy: its log2 is
 * not necessarily the C library's). numpy sums the 512 terms as pairwise(lower 256) + pairwise(upper 256); the
 * lower half is all -0.0 (0 * a negative log), whose sum -0.0 leaves the upper half's sum unchanged, and so does
 * adding that sum to the reduction's initial 0.0, since it is negative (a histogram of 4096 values has a bin
 * with p > 0, whose term is negative). */
static double entropy(const uint32_t *counts, const double *term)
{
    double terms[MAGNITUDE_BINS];
    for (int j = 0; j < MAGNITUDE_BINS; j++)
        terms[j] = term[counts[j]];
    return -pairwise_sum(terms, MAGNITUDE_BINS);
}

/* Scores of `count` regions. Region k is regions[5k .. 5k+4] = (tile, y0, y1, x0, x1), inclusive, of the float32
 * tile at tile_addresses[tile] whose rows are tile_strides[tile] floats apart (both sides at least 2 pixels).
 * scores[k] = entropy ** weight * height * width, with the C library's pow, which Python's float ** uses.
 * counts: NULL, or int64 (count, 256) receiving the histograms (bins 256..511 of the 512). Returns 0, or -1 if a
 * value is out of range (tiles not in [0, 1]). */
CPU_VARIANTS int gps_region_scores(int count, const int32_t *regions, const int64_t *tile_addresses,
                                   const int64_t *tile_strides, const double *term, double weight, double *scores,
                                   int64_t *counts)
{
    float padded[SIDE * PADDED];
    uint32_t histogram[MAGNITUDE_BINS];
    for (int k = 0; k < count; k++) {
        const int32_t *r = regions + 5 * k;
        const int64_t stride = tile_strides[r[0]];
        const float *tile = (const float *)(intptr_t)tile_addresses[r[0]];
        const int height = r[2] - r[1] + 1, width = r[4] - r[3] + 1;
        resize64(tile + r[1] * stride + r[3], stride, height, width, padded + 1, PADDED);
        for (int y = 0; y < SIDE; y++) {
            padded[y * PADDED] = padded[y * PADDED + 1];
            padded[y * PADDED + SIDE + 1] = padded[y * PADDED + SIDE];
        }
        if (magnitude_histogram(padded, histogram))
            return -1;
        scores[k] = pow(entropy(histogram, term), weight) * (double)height * (double)width;
        if (counts)
            for (int j = 0; j < MAGNITUDE_BINS; j++)
                counts[(int64_t)k * MAGNITUDE_BINS + j] = histogram[j];
    }
    return 0;
}
