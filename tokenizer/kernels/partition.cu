/*
 * The entropy partition of SPEC.md section 3 as one CUDA kernel: one thread block runs the whole greedy loop of one
 * tile, for all tiles of a batch of uint8 RGB images in one launch (tokenizer/partition_cuda.py launches it).
 *
 * The tile stays in shared memory as its uint8 RGB pixels. Every greedy level reads the whole tile again (a
 * picked region's halves are scored from its pixels), about ten times per tile at 128 tokens: a float32 256x256
 * tile (256 KB) does not fit on chip, and re-reading thousands of them from L2 or HBM would be bound by bandwidth.
 * Its RGB pixels (192 KB) fit in one block's shared memory on Hopper (227 KB), so each pixel is read from global
 * memory once, and its (grey + 1) / 2 value is recomputed wherever it is needed, in the released float32
 * arithmetic.
 *
 * The arithmetic is tokenizer/_partition_kernel.c's (which reproduces OpenCV and numpy bit for bit) and is meant
 * literally: the file must be compiled without floating-point contraction (NVRTC --fmad=false), so that the only
 * fused multiply-adds are the explicit fmaf calls of OpenCV's resize.
 *  - Resize to 64x64: OpenCV's INTER_LINEAR taps (linear_axis in the C kernel), a horizontal then a vertical pass,
 *    each s0 + (s1 - s0) * a with one rounding. A 64-pixel axis gets the identity taps (weight 0), which is the
 *    copy OpenCV makes of an image that already has the target size.
 *  - Sobel in float64 with replicated border, in OpenCV's order of additions; magnitude sqrt(gx^2 + gy^2); numpy's
 *    bin of it (an estimate corrected against the exact bin edges).
 *  - Entropy: numpy's own terms p * log2(p + 1e-10), looked up by count (`terms`, see tokenizer/partition.py), summed
 *    in numpy's pairwise order, so the entropy is numpy's bit for bit.
 *  - Score pow(entropy, weight) * h * w. CUDA's pow is at most 2 ulp from the exact value and may differ from the
 *    C library's in the last bits; that can only reorder two regions whose scores are a few ulp apart.
 */

#define SIDE 64                            /* every region is resized to SIDE x SIDE */
#define THREADS 512                        /* threads per block (partition_cuda.THREADS) */
#define WARPS (THREADS / 32)
#define STRIPS (THREADS / SIDE)            /* thread t works on pixel column t % SIDE ... */
#define STRIP_ROWS (SIDE / STRIPS)         /* ... of the STRIP_ROWS rows of strip t / SIDE */
#define MAGNITUDE_BINS 256                 /* the upper half of numpy's 512 bins over [-5.5, 5.5] */
#define BIN_WIDTH (11.0 / 512.0)           /* dyadic: j * BIN_WIDTH is exact, and so are numpy's edges */
#define SUM_BLOCK 128                      /* numpy's pairwise sum: blocks of 128 terms ... */
#define ACCUMULATORS 8                     /* ... each summed by 8 interleaved accumulators */
#define PARTIAL_SUMS (MAGNITUDE_BINS / SUM_BLOCK * ACCUMULATORS)
#define MAX_ROW_BYTES 768                  /* 3 * the largest tile side, 256 (box corners are stored as bytes) */

static_assert(THREADS == STRIPS * SIDE && SIDE == STRIPS * STRIP_ROWS, "threads must cover the 64x64 image");
static_assert(THREADS >= MAGNITUDE_BINS && THREADS >= 256, "one thread per histogram bin and per uint8 value");
static_assert(WARPS <= 32, "the pick's second reduction runs in one warp");

/* A region: inclusive pixel ranges [y0, y1] x [x0, x1] of the tile. */
struct Box {
    int y0, y1, x0, x1;
};

__device__ __forceinline__ unsigned pack(Box b)
{
    return (unsigned)b.y0 | ((unsigned)b.y1 << 8) | ((unsigned)b.x0 << 16) | ((unsigned)b.x1 << 24);
}

__device__ __forceinline__ Box unpack(unsigned packed)
{
    return Box{(int)(packed & 255u), (int)((packed >> 8) & 255u), (int)((packed >> 16) & 255u), (int)(packed >> 24)};
}

/* The block's shared memory, laid out by carve; partition_cuda.shared_memory_bytes gives its size. */
extern __shared__ __align__(16) unsigned char shared_memory[];

struct Shared {
    double *scores;           /* [num_tokens] score of the region in each slot */
    double *partial;          /* [PARTIAL_SUMS] accumulators of the entropy's pairwise sum */
    double *result;           /* [1] the score just computed, for every thread */
    float *resized;           /* [SIDE * SIDE] the region being scored, resized */
    int *histogram;           /* [MAGNITUDE_BINS] its magnitude counts */
    float *red, *green, *blue; /* [256] each: 0.299f * s, 0.587f * s, 0.114f * s of s = (float)(u / 127.5 - 1) */
    unsigned *boxes;          /* [num_tokens] packed Box of each slot */
    int *best;                /* [WARPS + 1] the pick: each warp's best slot, then the block's */
    unsigned short *created;  /* [num_tokens] creation index of each slot's region (the root 0, children 1, 2, ...) */
    unsigned char *rgb;       /* [tile_size * tile_size * 3] the tile's pixels */
};

/* Lays the block's shared memory out, widest types first (every array stays aligned). Every function that needs
 * it carves it itself rather than being passed the pointers: the compiler then knows they point to shared memory
 * and addresses it directly. */
__device__ __forceinline__ Shared carve(int num_tokens, int tile_size)
{
    Shared s;
    s.scores = (double *)shared_memory;
    s.partial = s.scores + num_tokens;
    s.result = s.partial + PARTIAL_SUMS;
    s.resized = (float *)(s.result + 1);
    s.histogram = (int *)(s.resized + SIDE * SIDE);
    s.red = (float *)(s.histogram + MAGNITUDE_BINS);
    s.green = s.red + 256;
    s.blue = s.green + 256;
    s.boxes = (unsigned *)(s.blue + 256);
    s.best = (int *)(s.boxes + num_tokens);
    s.created = (unsigned short *)(s.best + WARPS + 1);
    s.rgb = (unsigned char *)(s.created + num_tokens);
    return s;
}

/* Traps unless the block has THREADS threads and at least the shared memory carve lays out. */
__device__ void check_launch(const Shared &s, int tile_size)
{
    unsigned available;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(available));
    if (blockDim.x != THREADS || (size_t)(s.rgb + 3 * tile_size * tile_size - shared_memory) > available)
        __trap();
}

/* ------------------------------------------------------------------------------------------------------------
 * Tile */

/* Copies tile `tile` (row-major tiles of row-major images) into shared memory, one warp per pixel row. The images
 * need no alignment: rows are copied byte by byte, each lane's bytes of a row loaded together. */
__device__ void load_tile(const Shared &s, const unsigned char *__restrict__ images, int tile, int height, int width,
                          int tile_size)
{
    const int columns = width / tile_size, per_image = (height / tile_size) * columns;
    const int image = tile / per_image, index = tile % per_image;
    const int top = index / columns * tile_size, left = index % columns * tile_size;
    const unsigned char *source = images + (((size_t)image * height + top) * width + left) * 3;
    const int row_bytes = 3 * tile_size, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int y = warp; y < tile_size; y += WARPS) {
        const unsigned char *row = source + (size_t)y * width * 3;
        unsigned char bytes[MAX_ROW_BYTES / 32];
#pragma unroll
        for (int k = 0; k < MAX_ROW_BYTES / 32; k++)
            bytes[k] = lane + 32 * k < row_bytes ? row[lane + 32 * k] : 0;
#pragma unroll
        for (int k = 0; k < MAX_ROW_BYTES / 32; k++)
            if (lane + 32 * k < row_bytes)
                s.rgb[y * row_bytes + lane + 32 * k] = bytes[k];
    }
}

/* The released tile value (grey + 1) / 2 of pixel (y, x): grey = (0.299 R' + 0.587 G') + 0.114 B' in float32, each
 * channel u' = (float)(u / 127.5 - 1) (gps_unit_image in the C kernel). */
__device__ __forceinline__ float unit_value(const Shared &s, int tile_size, int y, int x)
{
    const unsigned char *p = s.rgb + 3 * (y * tile_size + x);
    const float grey = (s.red[p[0]] + s.green[p[1]]) + s.blue[p[2]];
    return (grey + 1.0f) / 2.0f;
}

/* ------------------------------------------------------------------------------------------------------------
 * Region score */

/* Where output pixel d of an axis reads its two sources in a source axis of n pixels, and the second one's weight:
 * OpenCV's INTER_LINEAR mapping (pixel centres, position and fraction in float, clamped at both ends). */
struct Tap {
    int first, second;
    float fraction;
};

__device__ __forceinline__ double axis_scale(int n)
{
    return 1.0 / ((double)SIDE / (double)n);
}

__device__ __forceinline__ Tap linear_tap(int n, double scale, int d)
{
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
    return Tap{index, index + 1 < n ? index + 1 : index, position};
}

/* Source row y of region r, resized along x, at this thread's output column (taps `column`). */
__device__ __forceinline__ float row_pass(const Shared &s, int tile_size, Box r, Tap column, int y)
{
    const float s0 = unit_value(s, tile_size, r.y0 + y, r.x0 + column.first);
    return fmaf(unit_value(s, tile_size, r.y0 + y, r.x0 + column.second) - s0, column.fraction, s0);
}

/* cv2.resize(region, (64, 64)) into s.resized: this thread's column x, rows of its strip. The two x-resized source
 * rows of an output row are kept for the next output row, which often reads the same ones. */
__device__ void resize_region(const Shared &s, int tile_size, Box r, int x, int strip)
{
    const int height = r.y1 - r.y0 + 1, width = r.x1 - r.x0 + 1;
    const Tap column = linear_tap(width, axis_scale(width), x);
    const double row_scale = axis_scale(height);
    int upper_row = -1, lower_row = -1;
    float upper = 0.0f, lower = 0.0f;
    for (int k = 0; k < STRIP_ROWS; k++) {
        const int d = strip * STRIP_ROWS + k;
        const Tap row = linear_tap(height, row_scale, d);
        const float next_upper = row.first == upper_row   ? upper
                                 : row.first == lower_row ? lower
                                                          : row_pass(s, tile_size, r, column, row.first);
        const float next_lower = row.second == lower_row   ? lower
                                 : row.second == upper_row ? upper
                                                           : row_pass(s, tile_size, r, column, row.second);
        upper = next_upper;
        lower = next_lower;
        upper_row = row.first;
        lower_row = row.second;
        s.resized[d * SIDE + x] = fmaf(lower - upper, row.fraction, upper);
    }
}

/* numpy's bin of the float64 magnitude sqrt(squared): bin j holds j * BIN_WIDTH <= m < (j + 1) * BIN_WIDTH. The
 * estimate is off by at most one and corrected against the exact edges, as numpy.histogram does. Tile values lie
 * in [0, 1], where a magnitude is at most sqrt(20) ~ 4.47: j stays below 209 and no magnitude is dropped. */
__device__ __forceinline__ int magnitude_bin(double squared)
{
    const double m = sqrt(squared);
    int j = (int)(m * (1.0 / BIN_WIDTH));
    j -= m < j * BIN_WIDTH;
    j += m >= (j + 1) * BIN_WIDTH;
    return j;
}

/* Counts the bins of the Sobel magnitudes of this thread's column x of its strip into s.histogram, in the order of
 * operations of cv2.Sobel(CV_64F, ksize 3, replicated border): row passes difference = S[x+1] - S[x-1] and
 * smooth = (S[x-1] + 2 S[x]) + S[x+1], then column passes gx = (d[y-1] + 2 d[y]) + d[y+1] and gy = s[y+1] - s[y-1].
 * The lanes of a warp (one pixel row) that share a bin add to it once. */
__device__ void count_magnitudes(const Shared &s, int x, int strip)
{
    const int left = x > 0 ? x - 1 : 0, right = x < SIDE - 1 ? x + 1 : SIDE - 1;
    double difference[STRIP_ROWS + 2], smooth[STRIP_ROWS + 2]; /* rows strip * STRIP_ROWS - 1 ... + STRIP_ROWS */
#pragma unroll
    for (int k = 0; k < STRIP_ROWS + 2; k++) {
        const int y = min(max(strip * STRIP_ROWS + k - 1, 0), SIDE - 1);
        const float *row = s.resized + y * SIDE;
        const double before = row[left], here = row[x], after = row[right];
        difference[k] = after - before;
        smooth[k] = (before + 2.0 * here) + after;
    }
    const unsigned lower_lanes = (1u << (threadIdx.x % 32)) - 1u;
#pragma unroll
    for (int k = 0; k < STRIP_ROWS; k++) {
        const double gx = (difference[k] + 2.0 * difference[k + 1]) + difference[k + 2];
        const double gy = smooth[k + 2] - smooth[k];
        const int bin = magnitude_bin(gx * gx + gy * gy);
        const unsigned same = __match_any_sync(0xffffffffu, bin);
        if ((same & lower_lanes) == 0)
            atomicAdd(&s.histogram[bin], __popc(same));
    }
}

/* The score of the histogram in s.histogram, for every thread; clears the histogram for the next region.
 * numpy sums the 512 terms pairwise: halves of 256, each two blocks of 128 summed by 8 interleaved accumulators
 * and combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)). The lower 256 bins are empty and their
 * terms -0.0, which leaves the sum of the upper half unchanged (see entropy() in the C kernel). */
__device__ double histogram_score(const Shared &s, const double *__restrict__ terms, double weight, int height,
                                  int width)
{
    const int tid = threadIdx.x;
    if (tid < PARTIAL_SUMS) {
        const int *counts = s.histogram + tid / ACCUMULATORS * SUM_BLOCK + tid % ACCUMULATORS;
        double sum = terms[counts[0]];
#pragma unroll
        for (int i = ACCUMULATORS; i < SUM_BLOCK; i += ACCUMULATORS)
            sum += terms[counts[i]];
        s.partial[tid] = sum;
    }
    __syncthreads();
    if (tid == 0) {
        const double *r = s.partial;
        const double first = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        const double second = ((r[8] + r[9]) + (r[10] + r[11])) + ((r[12] + r[13]) + (r[14] + r[15]));
        const double entropy = -(first + second);
        *s.result = pow(entropy, weight) * (double)height * (double)width;
    }
    if (tid < MAGNITUDE_BINS)
        s.histogram[tid] = 0;
    __syncthreads();
    return *s.result;
}

static_assert(PARTIAL_SUMS == 16, "histogram_score combines two blocks of eight accumulators");

/* The score entropy**weight * h * w of region r, for every thread (all threads of the block must call it). Not
 * inlined: the scoring loops then get their registers apart from the greedy loop's (no spills). */
__device__ __noinline__ double region_score(const double *__restrict__ terms, int num_tokens, int tile_size, Box r,
                                            double weight)
{
    const Shared s = carve(num_tokens, tile_size);
    const int x = threadIdx.x % SIDE, strip = threadIdx.x / SIDE;
    resize_region(s, tile_size, r, x, strip);
    __syncthreads();
    count_magnitudes(s, x, strip);
    __syncthreads();
    return histogram_score(s, terms, weight, r.y1 - r.y0 + 1, r.x1 - r.x0 + 1);
}

/* ------------------------------------------------------------------------------------------------------------
 * Greedy loop */

/* Whether slot a comes before slot b in the released list: higher score first, then the older region (the list is
 * stable-sorted every step and children are appended, so equal scores keep creation order). */
__device__ __forceinline__ bool comes_first(const Shared &s, int a, int b)
{
    return s.scores[a] > s.scores[b] || (s.scores[a] == s.scores[b] && s.created[a] < s.created[b]);
}

/* The better of two slots (-1: none) for the pick. */
__device__ __forceinline__ int better_slot(const Shared &s, int a, int b)
{
    if (a < 0)
        return b;
    if (b < 0)
        return a;
    return comes_first(s, a, b) ? a : b;
}

/* The butterfly reduction of better_slot over a warp (every lane gets the result). */
__device__ __forceinline__ int warp_best(const Shared &s, int slot)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        slot = better_slot(s, slot, __shfl_xor_sync(0xffffffffu, slot, offset));
    return slot;
}

/* The slot the released loop splits next, among the first `count`: the first region of the sorted list that is
 * larger than min_size + 1 pixels on a side. num_tokens <= max_tokens (checked by the caller) makes sure there is
 * one. */
__device__ int pick_region(const Shared &s, int count, int min_size)
{
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int slot = -1;
    for (int i = tid; i < count; i += THREADS) {
        const Box b = unpack(s.boxes[i]);
        if (!(b.y1 - b.y0 <= min_size && b.x1 - b.x0 <= min_size))
            slot = better_slot(s, slot, i);
    }
    slot = warp_best(s, slot);
    if (lane == 0)
        s.best[warp] = slot;
    __syncthreads();
    if (warp == 0) {
        slot = warp_best(s, lane < WARPS ? s.best[lane] : -1);
        if (lane == 0)
            s.best[WARPS] = slot;
    }
    __syncthreads();
    return s.best[WARPS];
}

/* Step `step` of the released loop: splits the region in slot `pick` in two halves (first half size // 2) along its
 * longer side; a square region along x only when x's weaker half scores strictly lower than y's (a tie goes to y).
 * The first child takes the parent's slot, the second the next free one, step + 1 (slots carry no order; the
 * list order is kept by score and creation index). */
__device__ void split_region(const Shared &s, const double *__restrict__ terms, int num_tokens, int tile_size,
                             int pick, int step, double weight)
{
    const Box p = unpack(s.boxes[pick]);
    const int height = p.y1 - p.y0 + 1, width = p.x1 - p.x0 + 1;
    Box first = p, second = p;
    double first_score = 0.0, second_score = 0.0;
    if (width >= height) {
        const int middle = p.x0 + width / 2;
        first = Box{p.y0, p.y1, p.x0, middle - 1};
        second = Box{p.y0, p.y1, middle, p.x1};
        first_score = region_score(terms, num_tokens, tile_size, first, weight);
        second_score = region_score(terms, num_tokens, tile_size, second, weight);
    }
    if (height >= width) {
        const int middle = p.y0 + height / 2;
        const Box top = Box{p.y0, middle - 1, p.x0, p.x1}, bottom = Box{middle, p.y1, p.x0, p.x1};
        const double top_score = region_score(terms, num_tokens, tile_size, top, weight);
        const double bottom_score = region_score(terms, num_tokens, tile_size, bottom, weight);
        const double x_weaker = second_score < first_score ? second_score : first_score;
        const double y_weaker = bottom_score < top_score ? bottom_score : top_score;
        if (height > width || !(x_weaker < y_weaker)) {
            first = top;
            second = bottom;
            first_score = top_score;
            second_score = bottom_score;
        }
    }
    if (threadIdx.x == 0) {
        s.boxes[pick] = pack(first);
        s.scores[pick] = first_score;
        s.created[pick] = (unsigned short)(2 * step + 1);
        s.boxes[step + 1] = pack(second);
        s.scores[step + 1] = second_score;
        s.created[step + 1] = (unsigned short)(2 * step + 2);
    }
    __syncthreads();
}

/* Writes the boxes (y0, y1, x0, x1) in the released final list order: the list as sorted before the last pick
 * (score descending, creation order among equal scores), less the picked region, then the last pick's two
 * children in creation order, appended unsorted. */
__device__ void write_boxes(const Shared &s, long long *__restrict__ out, int num_tokens)
{
    const int newest = 2 * num_tokens - 3; /* creation index of the last pick's first child */
    for (int i = threadIdx.x; i < num_tokens; i += THREADS) {
        int rank;
        if (s.created[i] > 0 && s.created[i] >= newest) {
            rank = num_tokens - 2 + (s.created[i] - newest);
        } else {
            rank = 0;
            for (int j = 0; j < num_tokens; j++)
                rank += s.created[j] < newest && comes_first(s, j, i);
        }
        const Box b = unpack(s.boxes[i]);
        long long *o = out + 4 * (size_t)rank;
        o[0] = b.y0;
        o[1] = b.y1;
        o[2] = b.x0;
        o[3] = b.x1;
    }
}

/* Partitions tile blockIdx.x of `images` (uint8 RGB, height x width, tiles tile_size x tile_size, row-major) into
 * num_tokens regions; out: int64 (tiles, num_tokens, 4) boxes (y0, y1, x0, x1), inclusive, in token order.
 * terms[c]: numpy's p * log2(p + 1e-10) of a bin holding c of the 4096 magnitudes (c = 0 .. 4096).
 * The caller checks 2 <= tile_size <= 256, min_size >= 1 and num_tokens <= max_tokens(tile_size, min_size), and
 * launches THREADS threads per block with partition_cuda.shared_memory_bytes(tile_size, num_tokens) bytes. */
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    entropy_partition(const unsigned char *__restrict__ images, const double *__restrict__ terms,
                      long long *__restrict__ out, int height, int width, int tile_size, int num_tokens, int min_size,
                      double weight)
{
    const Shared s = carve(num_tokens, tile_size);
    check_launch(s, tile_size);
    const int tid = threadIdx.x;
    load_tile(s, images, blockIdx.x, height, width, tile_size);
    if (tid < 256) {
        const float u = (float)((double)tid / 127.5 - 1.0);
        s.red[tid] = 0.299f * u;
        s.green[tid] = 0.587f * u;
        s.blue[tid] = 0.114f * u;
    }
    if (tid < MAGNITUDE_BINS)
        s.histogram[tid] = 0;
    if (tid == 0) {
        /* The root's score is never compared: it is the only candidate of the first pick. */
        s.boxes[0] = pack(Box{0, tile_size - 1, 0, tile_size - 1});
        s.scores[0] = 0.0;
        s.created[0] = 0;
    }
    __syncthreads();
    for (int step = 0; step + 1 < num_tokens; step++)
        split_region(s, terms, num_tokens, tile_size, pick_region(s, step + 1, min_size), step, weight);
    write_boxes(s, out + (size_t)blockIdx.x * num_tokens * 4, num_tokens);
}
