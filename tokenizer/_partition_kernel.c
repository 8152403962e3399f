/*
 * Gradient-magnitude histograms of many image regions, for tokenizer/partition.py (SPEC.md section 3).
 *
 * For each region of a float32 image: resize to 64x64 exactly as cv2.resize(INTER_LINEAR) does for float32,
 * 3x3 Sobel in x and y with replicated border in float64 exactly as cv2.Sobel(CV_64F) does, magnitude
 * sqrt(gx*gx + gy*gy) in float64 as numpy computes it, and count the magnitudes into the upper half of
 * numpy's 512-bin histogram over [-5.5, 5.5] (bins 256..511 hold [0, 5.5]; a magnitude is never negative).
 * The entropy of the counts is left to numpy, which defines it.
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
 * and pick one by the CPU's features when the library is loaded (without FMA, fmaf is a library call). Every variant computes the same values: the arithmetic
 * is IEEE in all of them, fmaf is exact everywhere, and no variant contracts or reassociates. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define CPU_VARIANTS __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define CPU_VARIANTS
#endif

#define SIDE 64
#define MAGNITUDE_BINS 256
/* Width of one of the 512 histogram bins, 11/512: a dyadic fraction, so j * BIN_WIDTH is exact. */
#define BIN_WIDTH (11.0 / 512.0)

/* Where each of the 64 output pixels of one axis reads its source, for a source axis of n pixels:
 * OpenCV's INTER_LINEAR mapping (pixel centres, coordinate and fraction in float, clamped at both ends). */
CPU_VARIANTS static void linear_axis(int n, int *first, float *fraction)
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
        fraction[d] = position;
    }
}

/* One source row, resized along x to 64 pixels: s0 + (s1 - s0) * a with a single rounding of the product-sum. */
CPU_VARIANTS static void resize_row(const float *row, int width, const int *first, const float *fraction, float *out)
{
    for (int d = 0; d < SIDE; d++) {
        int x = first[d];
        float s0 = row[x];
        float s1 = row[x + 1 < width ? x + 1 : x];
        out[d] = fmaf(s1 - s0, fraction[d], s0);
    }
}

/* cv2.resize(region, (64, 64)) of a height x width float32 region whose rows are `stride` floats apart. */
CPU_VARIANTS void gps_resize64(const float *src, int64_t stride, int height, int width, float *out)
{
    if (height == SIDE && width == SIDE) { /* OpenCV copies an image that already has the target size */
        for (int y = 0; y < SIDE; y++)
            memcpy(out + y * SIDE, src + y * stride, SIDE * sizeof(float));
        return;
    }
    int first_x[SIDE], first_y[SIDE];
    float fraction_x[SIDE], fraction_y[SIDE];
    linear_axis(width, first_x, fraction_x);
    linear_axis(height, first_y, fraction_y);

    /* The x-resized source rows first_y[d] and first_y[d] + 1 (clamped), kept while they are reused. */
    float upper[SIDE], lower[SIDE];
    int upper_row = -1, lower_row = -1;
    for (int d = 0; d < SIDE; d++) {
        int y0 = first_y[d], y1 = y0 + 1 < height ? y0 + 1 : y0;
        if (y0 != upper_row) {
            if (y0 == lower_row)
                memcpy(upper, lower, sizeof upper);
            else
                resize_row(src + y0 * stride, width, first_x, fraction_x, upper);
            upper_row = y0;
        }
        if (y1 != lower_row) {
            resize_row(src + y1 * stride, width, first_x, fraction_x, lower);
            lower_row = y1;
        }
        const float b = fraction_y[d];
        float *dst = out + d * SIDE;
        for (int x = 0; x < SIDE; x++)
            dst[x] = fmaf(lower[x] - upper[x], b, upper[x]);
    }
}

/* Row passes of the separable 3x3 Sobel over one image row, borders replicated, in float64 and in OpenCV's
 * order of additions: difference[x] = S[x+1] - S[x-1] (the x derivative's -1 0 1), smooth[x] =
 * (S[x-1] + 2 S[x]) + S[x+1] (the y derivative's 1 2 1 along the row). */
CPU_VARIANTS static void sobel_rows(const float *row, double *difference, double *smooth)
{
    double padded[SIDE + 2];
    padded[0] = row[0];
    for (int x = 0; x < SIDE; x++)
        padded[x + 1] = row[x];
    padded[SIDE + 1] = row[SIDE - 1];
    for (int x = 0; x < SIDE; x++) {
        difference[x] = padded[x + 2] - padded[x];
        smooth[x] = (padded[x] + 2.0 * padded[x + 1]) + padded[x + 2];
    }
}

/* numpy's bin of the magnitude m = sqrt(squared) (rounded to float64): an estimate, corrected against the
 * exact bin edges j * BIN_WIDTH, as numpy.histogram does. */
CPU_VARIANTS static int exact_bin(double squared)
{
    double m = sqrt(squared);
    int j = (int)(m * (1.0 / BIN_WIDTH));
    j -= m < j * BIN_WIDTH;
    j += m >= (j + 1) * BIN_WIDTH;
    return j;
}

/* A value below e^2 * CERTAINLY_BELOW has a rounded square root below e, for every bin edge e (see below). */
#define CERTAINLY_BELOW (1.0 - 0x1p-40)

/* Bins of the magnitudes sqrt(squared[i]), n of them, all below 5 (returns -1 otherwise), without taking
 * float64 square roots.
 *
 * An edge e = j * BIN_WIDTH has at most 12 significant bits, so e and e^2 are exact doubles. sqrt rounds to
 * nearest (ties to even, and e is even), so rounded sqrt(s) >= e exactly when s >= t, where t, the square of
 * the midpoint between e and the double below it, lies in [e^2 (1 - 2^-52), e^2]. So s >= e^2 is surely at
 * or above the edge and s < e^2 * CERTAINLY_BELOW surely below; a float32 square root gives the bin to within
 * one, and the rare values between the two bounds of an edge they are tested against are redone exactly. */
CPU_VARIANTS static int bins_of_squares(const double *squared, int n, int *bin)
{
    int unsure = 0, out_of_range = 0;
    for (int i = 0; i < n; i++) {
        double s = squared[i];
        out_of_range |= !(s < 25.0);
        int j = (int)(sqrtf((float)s) * (float)(1.0 / BIN_WIDTH));
        double low = j * BIN_WIDTH, high = low + BIN_WIDTH;
        double low2 = low * low, high2 = high * high;
        int below = s < low2 * CERTAINLY_BELOW, above = s >= high2;
        unsure |= ((s < low2) & !below) | ((s < high2) & (s >= high2 * CERTAINLY_BELOW));
        bin[i] = j - below + above;
    }
    if (out_of_range)
        return -1;
    if (unsure)
        for (int i = 0; i < n; i++) {
            double s = squared[i];
            int j = bin[i];
            double low = j * BIN_WIDTH, high = low + BIN_WIDTH;
            if ((s < low * low && s >= low * low * CERTAINLY_BELOW) ||
                (s < high * high && s >= high * high * CERTAINLY_BELOW))
                bin[i] = exact_bin(s);
        }
    return 0;
}

/* For tests: bins_of_squares over any number of values. */
CPU_VARIANTS int gps_bins_of_squares(const double *squared, int64_t n, int32_t *bin)
{
    int chunk[SIDE];
    for (int64_t start = 0; start < n; start += SIDE) {
        int size = n - start < SIDE ? (int)(n - start) : SIDE;
        if (bins_of_squares(squared + start, size, chunk))
            return -1;
        for (int i = 0; i < size; i++)
            bin[start + i] = chunk[i];
    }
    return 0;
}

/* Counts of the 4096 Sobel gradient magnitudes of a 64x64 image into the 256 bins [j, j + 1) * BIN_WIDTH.
 * Returns -1 if a magnitude is 5 or more (or NaN): impossible for values in [0, 1], whose magnitude is at
 * most sqrt(20). */
CPU_VARIANTS static int magnitude_histogram(const float *image, int64_t *counts)
{
    /* Row passes of image rows y - 1, y, y + 1 (replicated at the top and bottom), in a ring of three. */
    double difference[3][SIDE], smooth[3][SIDE];
    sobel_rows(image, difference[0], smooth[0]);
    sobel_rows(image + SIDE, difference[1], smooth[1]);
    /* Four interleaved sub-histograms, so that runs of equal bins do not serialise on one counter. */
    uint32_t partial[4][MAGNITUDE_BINS];
    memset(partial, 0, sizeof partial);
    for (int y = 0; y < SIDE; y++) {
        int above = y > 0 ? (y - 1) % 3 : 0, here = y % 3, below = y + 1 < SIDE ? (y + 1) % 3 : here;
        if (y > 0 && y + 1 < SIDE)
            sobel_rows(image + (y + 1) * SIDE, difference[below], smooth[below]);
        double squared[SIDE];
        int bin[SIDE];
        for (int x = 0; x < SIDE; x++) {
            /* Column passes: 1 2 1 over the differences gives gx, -1 0 1 over the smoothed rows gives gy. */
            double gx = (difference[above][x] + 2.0 * difference[here][x]) + difference[below][x];
            double gy = smooth[below][x] - smooth[above][x];
            squared[x] = gx * gx + gy * gy;
        }
        if (bins_of_squares(squared, SIDE, bin))
            return -1;
        for (int x = 0; x < SIDE; x += 4) {
            partial[0][bin[x]]++;
            partial[1][bin[x + 1]]++;
            partial[2][bin[x + 2]]++;
            partial[3][bin[x + 3]]++;
        }
    }
    for (int j = 0; j < MAGNITUDE_BINS; j++)
        counts[j] = (int64_t)partial[0][j] + partial[1][j] + partial[2][j] + partial[3][j];
    return 0;
}

/* Magnitude histograms of `count` regions: region k is a heights[k] x widths[k] float32 image at address
 * addresses[k], its rows strides[k] floats apart (both sides at least 2). counts: int64 (count, 256), the
 * bins 256..511 of the released 512-bin histogram. Returns 0, or -1 if a magnitude was out of range. */
CPU_VARIANTS int gps_magnitude_histograms(int count, const int64_t *addresses, const int64_t *strides, const int32_t *heights,
                             const int32_t *widths, int64_t *counts)
{
    float image[SIDE * SIDE];
    for (int k = 0; k < count; k++) {
        gps_resize64((const float *)(intptr_t)addresses[k], strides[k], heights[k], widths[k], image);
        if (magnitude_histogram(image, counts + (int64_t)k * MAGNITUDE_BINS))
            return -1;
    }
    return 0;
}
