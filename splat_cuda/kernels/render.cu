// GPS-token splatting kernels (SPEC.md section 2), compiled at run time with NVRTC.
//
//   out[b, k, y, x] = sum_i g_i(px, py) * f_i[k]
//   g_i = exp(-q),  q = (ux - rho uy)^2 / (2 (1 - rho^2)) + uy^2 / 2,  ux = dx / sx,  uy = dy / sy
//   g_i = 0 unless |dx| <= dmax sx and |dy| <= dmax sy          (dx = px - mu_x, dy = py - mu_y)
//
// q is written as a sum of two non-negative terms (the usual form ux^2 - 2 rho ux uy + uy^2 cancels
// badly when |rho| -> 1). Pixel centres px = 2 j / (W - 1) - 1 are carried as a float pair (hi + lo)
// so that dx keeps full relative precision even for tiny sigma.
//
// Work split: blocks of 256 threads, one per (16x16 pixel tile, image); blockIdx.y is the image, so a whole
// batch is one launch of each kernel. The tile's pixel centres are staged once in shared memory.
// `render_forward`: each round the block tests ROUND tokens' boxes against the tile (no division), compacts the
//   hits (in token order, so sums are order-stable) into a shared list with their derived geometry and features;
//   warp w owns an 8x4 pixel group, lane = pixel, channel accumulators in registers; a warp ballot skips the list
//   entries whose box misses the group. It also writes what the backward needs: the tile's mask (one bit per
//   token whose box touches the tile: the round's ballots, stored as they are) and, when the op asks, zeros in its
//   share of the backward's gradient accumulator. 16-bit maps of whole tiles leave through shared memory, four
//   pixels per store (`store_tile_staged`); float32 maps from the registers, by streaming stores.
// `render_backward`: expands the tile's mask into the list of its tokens, stages the tile's dL/dout in shared
//   memory (by streaming loads: it is read once); each half-warp takes one list entry at a time (the next one
//   nobody has taken, from a shared counter, so that the work evens out) and walks the pixels of the token's box
//   inside the tile (16 lanes = 16 pixels; the range estimated with an outward margin, so that at most one pixel
//   per end lies outside the box, where the weight is 0), with the token (as float32) in shared memory, loaded
//   while the previous token is processed (its features then in registers up to 16 channels), and its derived
//   geometry computed as the forward computes it;
//   per-lane partial sums are reduced across the half-warp once per (tile, token) and then either added
//   atomically to dL/dtokens or, in deterministic mode, stored in a per-tile buffer that `reduce_tile_gradients`
//   sums in a fixed tile order (the tiles come from the masks).
// `cast_gradient`: the float32 gradient in the tokens' 16-bit dtype.
// On sm_90 and newer every kernel is launched as a programmatic dependent of the kernel before it (see
// "programmatic dependent launch" below).
//
// Entry points are extern "C" (no name mangling), instantiated per (dtype, CPT) by the host (see the
// end of this file). CPT is the channel count padded to 4, 8, 16, 32 or 64.

#define FULL_MASK 0xffffffffu
#define TILE 16
#define THREADS 256
#define WARPS 8
#define HALF_WARP 16
// Tokens culled per round into the forward block's shared list (splat_cuda/compiler.py mirrors this).
#define ROUND_SIZE(CPT) ((CPT) <= 32 ? 256 : 128)
// The backward builds a tile's token list from at most THREADS mask words (one per thread), so N <= 32 * THREADS
// tokens (splat_cuda.compiler.MAX_TOKENS; the host refuses more).
// FORWARD_MIN_BLOCKS and BACKWARD_MIN_BLOCKS (blocks per SM the compiler must leave registers for:
// more resident blocks hide more latency, fewer leave more registers) are defined by the host per
// channel padding (splat_cuda/compiler.py).

// ---- storage types: 16-bit floats are read and written as raw bits (NVRTC needs no headers) ----
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }
__device__ __forceinline__ float to_float(f16_t v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.bits));
    return r;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
    bf16_t r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#else
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);               // round to nearest even
        r.bits = (unsigned short)(u >> 16);
    }
#endif
    return r;
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float v) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

// A value read once (dL/dout): a streaming load, first in line for eviction from L1 and L2, so that it does not
// push out what is read again (the tokens and masks, and whatever the caller works on next).
__device__ __forceinline__ float load_once(const float* p) {
    float v;
    asm volatile("ld.global.cs.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
template <typename T16>
__device__ __forceinline__ T16 load_once(const T16* p) {  // bf16_t, f16_t
    T16 v;
    asm volatile("ld.global.cs.u16 %0, [%1];" : "=h"(v.bits) : "l"(p));
    return v;
}

// A map value, written once and read by a later kernel: a streaming store (first in line for eviction from L2), so
// that the map's lines leave L2 before what the next kernels read again. Measured on an H200 (benchmarks/RESULTS.md):
// B64 N256 C32 fp32 fwd+bwd 63.3 -> 62.0 us, high-resolution forward 92.8 -> 88.4 us.
__device__ __forceinline__ void store_streaming(float* p, float v) {
    asm volatile("st.global.cs.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}
template <typename T16>
__device__ __forceinline__ void store_streaming(T16* p, T16 v) {  // bf16_t, f16_t
    asm volatile("st.global.cs.u16 [%0], %1;" ::"l"(p), "h"(v.bits) : "memory");
}

// ---- geometry ----
struct __align__(16) Geo {  // one token's derived geometry (32 bytes)
    float mx, my;      // centre
    float hx, hy;      // box half-widths dmax * sigma
    float isx, isy;    // 1 / sigma
    float rho;
    float hinv;        // 1 / (2 (1 - rho^2))
};

// A token's box: centre and half-widths dmax * sigma (no division: the culling tests need only this).
struct Box { float mx, my, hx, hy; };

// From sigma_x, sigma_y, mu_x, mu_y: the one rounding of the half-widths that every box test relies on.
__device__ __forceinline__ Box make_box(float sx, float sy, float mx, float my, float dmax) {
    return Box{mx, my, __fmul_rn(dmax, sx), __fmul_rn(dmax, sy)};
}

template <typename T>
__device__ __forceinline__ Box token_box(const T* tok, float dmax) {
    return make_box(to_float(tok[0]), to_float(tok[1]), to_float(tok[3]), to_float(tok[4]), dmax);
}

// 1 / x by the hardware approximation (relative error below 2^-22): one instruction where a division takes a
// dozen; the backward derives every token's geometry once per tile that lists it. Subnormal x and 1 / x flush to
// zero: the results differ from the unflushed ones only where x or 1 / x is subnormal (|x| < 2^-126 or > 2^126).
__device__ __forceinline__ float fast_reciprocal(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// From a token's sigma_x, sigma_y, rho, mu_x, mu_y (the forward and the backward compute it alike).
__device__ __forceinline__ Geo make_geo(float sx, float sy, float rho, float mx, float my, float dmax) {
    const Box box = make_box(sx, sy, mx, my, dmax);
    Geo g;
    g.mx = box.mx;
    g.my = box.my;
    g.hx = box.hx;
    g.hy = box.hy;
    g.isx = fast_reciprocal(sx);
    g.isy = fast_reciprocal(sy);
    g.rho = rho;
    g.hinv = 0.5f * fast_reciprocal((1.0f - rho) * (1.0f + rho));
    return g;
}

// Spacing of the align-corners grid of an n-pixel axis (computed once per thread: a double
// division is expensive).
__device__ __forceinline__ double grid_step(int n) { return 2.0 / (double)(n - 1); }

// Pixel centre j * step - 1 (= 2 j / (n - 1) - 1) as hi + lo floats (hi is the rounded value).
__device__ __forceinline__ float2 pixel_coord(int j, double step) {
    const double c = (double)j * step - 1.0;
    const float hi = (float)c;
    return make_float2(hi, (float)(c - (double)hi));
}

// Hides how a value was computed, so that the compiler keeps it in a register instead of recomputing it (in
// double precision) inside a loop.
__device__ __forceinline__ float2 in_register(float2 v) {
    asm volatile("" : "+f"(v.x), "+f"(v.y));
    return v;
}

// Conservative box-vs-rectangle test: true whenever some pixel centre in [x_lo, x_hi] x [y_lo, y_hi]
// can pass the exact per-pixel box test. The margin (1e-5 relative) absorbs every rounding of the
// per-pixel test (written with _rn intrinsics, so no contraction changes it between kernels).
// (G: Box or Geo, both start with the centre and half-widths.)
template <typename G>
__device__ __forceinline__ bool box_touches(const G& g, float x_lo, float x_hi, float y_lo, float y_hi) {
    const float mxm = __fmul_rn(1e-5f, __fadd_rn(__fadd_rn(1.0f, fabsf(g.mx)), g.hx));
    const float mym = __fmul_rn(1e-5f, __fadd_rn(__fadd_rn(1.0f, fabsf(g.my)), g.hy));
    return __fsub_rn(g.mx, g.hx) <= __fadd_rn(x_hi, mxm) && __fadd_rn(g.mx, g.hx) >= __fsub_rn(x_lo, mxm) &&
           __fsub_rn(g.my, g.hy) <= __fadd_rn(y_hi, mym) && __fadd_rn(g.my, g.hy) >= __fsub_rn(y_lo, mym);
}

// A tile's pixel centres, in shared memory: col_s[i] of column min(x0 + i, W - 1), row_s[i] of row
// min(y0 + i, H - 1) (clamped: columns and rows past the map repeat its last one). Needs a barrier before use.
__device__ __forceinline__ void stage_pixel_coords(float2* col_s, float2* row_s, int x0, int y0, int W, int H) {
    const int t = threadIdx.x;
    if (t < TILE) col_s[t] = pixel_coord(min(x0 + t, W - 1), grid_step(W));
    else if (t < 2 * TILE) row_s[t - TILE] = pixel_coord(min(y0 + t - TILE, H - 1), grid_step(H));
}

// Bounds (first and last pixel centre) of the tile's columns [i0, i1] and rows [j0, j1], from the staged centres.
struct Rect { float x_lo, x_hi, y_lo, y_hi; };
__device__ __forceinline__ Rect pixel_rect(const float2* col_s, const float2* row_s, int i0, int i1, int j0, int j1) {
    return Rect{col_s[i0].x, col_s[i1].x, row_s[j0].x, row_s[j1].x};
}
template <typename G>
__device__ __forceinline__ bool box_touches(const G& g, const Rect& r) {
    return box_touches(g, r.x_lo, r.x_hi, r.y_lo, r.y_hi);
}

// e^-q for q >= 0 as 2^(-q log2 e) with the hardware approximation (relative error about 2^-22; weights below
// 2^-126 flush to zero, far under the resolution of any sum they join).
__device__ __forceinline__ float exp_neg(float q) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(q * -1.4426950408889634f));
    return r;
}

// Everything the weight and its derivatives need at one pixel.
struct Weight {
    float g;        // the Gaussian weight (0 outside the box)
    float ux, uy;   // dx / sx, dy / sy
    float e, ep;    // ux - rho uy, uy - rho ux
};
__device__ __forceinline__ Weight pixel_weight(const Geo& gd, float2 px, float2 py) {
    const float dx = (px.x - gd.mx) + px.y;
    const float dy = (py.x - gd.my) + py.y;
    Weight w;
    w.ux = dx * gd.isx;
    w.uy = dy * gd.isy;
    w.e = fmaf(-gd.rho, w.uy, w.ux);
    w.ep = fmaf(-gd.rho, w.ux, w.uy);
    const float q = fmaf(w.e * w.e, gd.hinv, 0.5f * w.uy * w.uy);
    // (computed for every pixel and then selected: no branch; `&` instead of `&&` for the same reason)
    const bool inside = (fabsf(dx) <= gd.hx) & (fabsf(dy) <= gd.hy);
    const float g = exp_neg(q);
    w.g = inside ? g : 0.0f;
    return w;
}

// ---- warp reduction of many values at once ----
// transpose_reduce<V, OFFSET>: sums each of V per-lane values over groups of L = 2 OFFSET lanes (OFFSET 16: the
// whole warp; 8: each half-warp) with about V shuffles in all (instead of V log2 L): at each butterfly step a lane
// keeps one half of its values and trades the other half with its partner. Afterwards, with l the lane's index
// in its group, for V >= L lane l holds the sums of values (V/L) l + i in v[i]; for V < L, lane l holds the sum
// of value l / (L / V) in v[0].
template <int N, int OFFSET, int M>
__device__ __forceinline__ void transpose_reduce(float (&v)[M], int lane) {
    if constexpr (N >= 2) {
        constexpr int HALF = N / 2;
        const bool upper = (lane & OFFSET) != 0;
#pragma unroll
        for (int i = 0; i < HALF; ++i) {
            const float send = upper ? v[i] : v[i + HALF];
            const float keep = upper ? v[i + HALF] : v[i];
            v[i] = keep + __shfl_xor_sync(FULL_MASK, send, OFFSET);
        }
        if constexpr (OFFSET > 1) transpose_reduce<HALF, OFFSET / 2>(v, lane);
    } else {
        v[0] += __shfl_xor_sync(FULL_MASK, v[0], OFFSET);
        if constexpr (OFFSET > 1) transpose_reduce<1, OFFSET / 2>(v, lane);
    }
}

// ---- the tiles a token's box may touch (deterministic mode) ----

// Candidate tile range of a box (one tile of slack on each side; the tile masks decide). In double, so
// that no rounding of large coordinates can push a touched tile out of the range.
struct TileRange { int x0, x1, y0, y1; };
__device__ __forceinline__ TileRange tile_range(const Box& g, int H, int W) {
    const int tiles_x = (W + TILE - 1) / TILE, tiles_y = (H + TILE - 1) / TILE;
    const double sx = 0.5 * (W - 1) / TILE, sy = 0.5 * (H - 1) / TILE;
    const double fx0 = ((double)g.mx - (double)g.hx + 1.0) * sx, fx1 = ((double)g.mx + (double)g.hx + 1.0) * sx;
    const double fy0 = ((double)g.my - (double)g.hy + 1.0) * sy, fy1 = ((double)g.my + (double)g.hy + 1.0) * sy;
    TileRange r;  // fmin/fmax drop NaN, leaving the full range (the exact test then fails)
    r.x0 = (int)fmin(fmax(floor(fx0) - 1.0, 0.0), (double)(tiles_x - 1));
    r.x1 = (int)fmin(fmax(floor(fx1) + 1.0, 0.0), (double)(tiles_x - 1));
    r.y0 = (int)fmin(fmax(floor(fy0) - 1.0, 0.0), (double)(tiles_y - 1));
    r.y1 = (int)fmin(fmax(floor(fy1) + 1.0, 0.0), (double)(tiles_y - 1));
    return r;
}

// ---- asynchronous copies ----

// 4 bytes from global to shared memory without passing through registers (cp.async on sm_80 and newer; a plain
// copy before), in flight until waited for; a thread's copies are committed in groups, which complete in order.
__device__ __forceinline__ void copy_4_async(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
                 : "memory");
#else
    *dst = __ldg(src);
#endif
}
__device__ __forceinline__ void commit_async_copies() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most one of this thread's committed groups of copies is still in flight.
__device__ __forceinline__ void wait_async_copies_but_one() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}

// ---- programmatic dependent launch (sm_90 and newer) ----
// The host launches every kernel of this file as a programmatic dependent of the kernel before it on the stream,
// so that its launch and the setup that reads no global memory overlap that kernel's last blocks. Each kernel
// therefore waits for the kernels before it (their completion and their memory) before its first global access,
// and then lets the kernel after it launch (whose blocks wait in turn, on the same terms) as soon as all of its
// own blocks have started; the backward only when the host says so (`early_dependents`: see splat_cuda/op.py).
__device__ __forceinline__ void wait_for_previous_kernels() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void begin_global_access() {
    wait_for_previous_kernels();
    let_next_kernel_launch();
}

// ---- a tile's token list, from its mask ----
// The block first counts the set bits of every mask word (one word per thread) and stores each word's
// offset into the list; a window of the list, positions [start, start + THREADS), is then expanded into
// list_s in token order.
struct TileList {
    unsigned word_s[THREADS];
    int offset_s[THREADS];
    int warp_sum_s[WARPS];
    int list_s[THREADS];
};

// `bits` is this thread's mask word (word threadIdx.x of the tile's mask, 0 past its end). Returns the list
// length. Ends with a barrier.
__device__ __forceinline__ int count_tile_tokens(unsigned bits, TileList& tl) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int count = __popc(bits);
    int inclusive = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(FULL_MASK, inclusive, o);
        if (lane >= o) inclusive += n;
    }
    if (lane == 31) tl.warp_sum_s[warp] = inclusive;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const int s = tl.warp_sum_s[w];
        before += (w < warp) ? s : 0;
        total += s;
    }
    tl.word_s[tid] = bits;
    tl.offset_s[tid] = before + inclusive - count;
    __syncthreads();
    return total;
}

// Fills list_s[0, min(THREADS, total - start)) with list positions [start, ...). Ends with a barrier.
__device__ __forceinline__ void expand_tile_list(int words, int start, TileList& tl) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int w = warp; w < words; w += WARPS) {
        const unsigned bits = tl.word_s[w];
        const int first = tl.offset_s[w] - start;
        if (first >= THREADS || first + __popc(bits) <= 0) continue;
        if ((bits >> lane) & 1u) {
            const int slot = first + __popc(bits & ((1u << lane) - 1u));
            if (slot >= 0 && slot < THREADS) tl.list_s[slot] = w * 32 + lane;
        }
    }
    __syncthreads();
}

// ---- copying feature rows, several loads in flight per thread ----
// store(r, k, load(r, k)) for rows r in [0, rows) and channels k in [0, CPT). A row takes min(CPT, 32) lanes of
// a warp (lane = channel), so a warp holds R = 32 / min(CPT, 32) rows at a time: warp w the rows R w .. R w + R - 1,
// then those WARPS R rows further, and so on. Each lane
// issues UNROLL rows' loads before their stores, so the round trips to L2 overlap (a plain loop would wait for
// each load: the compiler cannot move a global load above a store that might alias it).
template <int CPT, int UNROLL, typename Load, typename Store>
__device__ __forceinline__ void copy_feature_rows(int rows, Load load, Store store) {
    constexpr int LANES = CPT < 32 ? CPT : 32, ROWS_PER_WARP = 32 / LANES, PER_LANE = CPT / LANES;
    constexpr int STEP = WARPS * ROWS_PER_WARP;
    const int lane = threadIdx.x & 31;
    const int k0 = lane % LANES;
    for (int r0 = (threadIdx.x >> 5) * ROWS_PER_WARP + lane / LANES; r0 < rows; r0 += UNROLL * STEP) {
        float v[UNROLL][PER_LANE];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e)
                v[u][e] = r0 + u * STEP < rows ? load(r0 + u * STEP, k0 + e * LANES) : 0.0f;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e)
                if (r0 + u * STEP < rows) store(r0 + u * STEP, k0 + e * LANES, v[u][e]);
    }
}

// ---- culling a round of tokens into the forward block's shared list ----
// Tests tokens [base, base + ROUND) against the tile (box only: no division), stores the round's words of the
// tile's mask, writes the hits in token order to idx_s and their geometry to geo_s (each by the thread that tested
// it), then their features (padded to CPT with zeros) to feat_s. Returns the list length.
template <typename T, int CPT, int ROUND>
__device__ __forceinline__ int cull_round(const T* tok_b, int base, int N, int C, float dmax, const Rect& tile,
                                          unsigned* mask_tile, Geo* geo_s, int* idx_s, float* feat_s,
                                          int* warp_count) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int D = 5 + C;
    const int i = base + tid, end = min(base + ROUND, N);
    const bool listed = i < end;
    float geo_values[5];  // sigma_x, sigma_y, rho, mu_x, mu_y
    if constexpr (sizeof(T) == 4) {
        // Float32 rows are wider than an L1 line, so that 32 tokens' values lie in 32 lines. The warp reads its 32
        // tokens' geometry as 160 (token, value) pairs in token order instead: lane l loads pairs l, l + 32, ...,
        // each load touching the rows of about 7 tokens (a quarter of the L1 tag lookups), and the warp then trades
        // them through shared memory (in the list's space, written only after the compaction barrier below) so
        // that each thread holds its own token's. (B64 N256 C32: forward 23.8 -> 23.3 us, high
        // resolution 89.4 -> 84.6; for 16-bit rows, half as wide, it measured slower: 78.3 -> 81.4 at high
        // resolution, so they are read as before, each thread its own token's values.)
        // (8 warps x 160 floats: within geo_s and, for ROUND = 128, the start of feat_s, both free until then)
        float* traded = reinterpret_cast<float*>(geo_s) + warp * 5 * 32;
#pragma unroll
        for (int u = 0; u < 5; ++u) {
            const int pair = lane + 32 * u, t = pair / 5, token = base + 32 * warp + t;  // (32-bit offsets: N D < 2^31)
            traded[pair] = token < end ? tok_b[(unsigned)token * (unsigned)D + (unsigned)(pair - 5 * t)] : 0.0f;
        }
        __syncwarp();
#pragma unroll
        for (int v = 0; v < 5; ++v) geo_values[v] = traded[5 * lane + v];
    } else {
#pragma unroll
        for (int v = 0; v < 5; ++v) geo_values[v] = listed ? to_float(tok_b[(size_t)i * D + v]) : 0.0f;
    }
    const bool hit = listed && box_touches(make_box(geo_values[0], geo_values[1], geo_values[3], geo_values[4],
                                                    dmax), tile);
    const unsigned mask = __ballot_sync(FULL_MASK, hit);
    if (lane == 0) {
        warp_count[warp] = __popc(mask);
        if (32 * warp < ROUND && base + 32 * warp < N) mask_tile[(base >> 5) + warp] = mask;
    }
    __syncthreads();
    int offset = 0, total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const int c = warp_count[w];
        offset += (w < warp) ? c : 0;
        total += c;
    }
    if (hit) {
        const int slot = offset + __popc(mask & ((1u << lane) - 1u));
        idx_s[slot] = i;
        geo_s[slot] = make_geo(geo_values[0], geo_values[1], geo_values[2], geo_values[3], geo_values[4], dmax);
    }
    __syncthreads();
    copy_feature_rows<CPT, 4>(
        total, [&](int r, int k) { return k < C ? to_float(tok_b[(size_t)idx_s[r] * D + 5 + k]) : 0.0f; },
        [&](int r, int k, float v) { feat_s[r * CPT + k] = v; });
    __syncthreads();
    return total;
}

// ---- the forward's map stores of 16-bit values, four pixels per lane ----
// A tile's values are staged in shared memory, channel by channel, in tile rows of 16 floats (the halves of rows 2
// and 3 mod 4 swapped, so that a warp's 8x4 group writes one channel's 32 values to 32 distinct banks), and then
// stored four pixels per lane: each warp store writes 8 tile rows of 16 contiguous pixels, where a store from the
// pixel loop's registers writes 4 rows of 8 two-byte values. Measured on an H200 (benchmarks/RESULTS.md): bf16
// forward 24.5 -> 22.9 us at B64 N256 C32, but fp32 23.8 -> 26.0 (the staging adds about 10% to the shared-memory
// traffic that the forward is bound by, more than 4-byte stores save), so float32 maps are stored from registers.
__device__ __forceinline__ int staged_index(int k, int y, int x) {
    return (k * TILE + y) * TILE + (x ^ (((y >> 1) & 1) << 3));
}

// Four consecutive 16-bit values (bf16_t or f16_t) at p, 8-byte aligned. (A plain store: as a streaming one, see
// store_streaming, bf16 forward measured 23.0 -> 23.3 us at B64 N256 C32.)
template <typename T16>
__device__ __forceinline__ void store4(T16* p, float4 v) {
    const unsigned lo = from_float<T16>(v.x).bits | ((unsigned)from_float<T16>(v.y).bits << 16);
    const unsigned hi = from_float<T16>(v.z).bits | ((unsigned)from_float<T16>(v.w).bits << 16);
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
}

// Stores the tile's map (acc: this lane's pixel (ty0 + y, tx0 + x)) through `staged` (STAGED channels of a tile,
// at a 16-byte boundary), STAGED channels per pass. For a tile inside the map whose rows start at multiples of 4
// pixels (W % 4 == 0). Starts with a barrier: the staging area may be what the block's warps are still reading.
template <typename T16, int CPT, int STAGED>
__device__ __forceinline__ void store_tile_staged(const float (&acc)[CPT], float* staged, T16* out_b, int C, int H,
                                                  int W, int tx0, int ty0, int y, int x) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int pass = 0; pass < CPT / STAGED; ++pass) {
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < STAGED; ++kk) staged[staged_index(kk, y, x)] = acc[pass * STAGED + kk];
        __syncthreads();
        const int channels = min(STAGED, C - pass * STAGED);
#pragma unroll 4
        for (int v = tid; v < channels * TILE * (TILE / 4); v += THREADS) {  // v: (channel, row, group of 4)
            const int kk = v / (TILE * TILE / 4), row = (v / (TILE / 4)) % TILE, col = (v % (TILE / 4)) * 4;
            const float4 values = *reinterpret_cast<const float4*>(staged + staged_index(kk, row, col));
            store4(out_b + ((size_t)(pass * STAGED + kk) * H + ty0 + row) * W + tx0 + col, values);
        }
    }
}

// ---- forward ----
template <typename T, int CPT>
__device__ __forceinline__ void forward(const T* __restrict__ tokens, unsigned* __restrict__ masks,
                                        T* __restrict__ out, float* __restrict__ grad_accumulator, int N, int C,
                                        int H, int W, float dmax) {
    constexpr int ROUND = ROUND_SIZE(CPT);
    extern __shared__ float4 smem4[];
    Geo* geo_s = reinterpret_cast<Geo*>(smem4);
    float* feat_s = reinterpret_cast<float*>(geo_s + ROUND);
    __shared__ int idx_s[ROUND];
    __shared__ int warp_count[WARPS];
    __shared__ float2 col_s[TILE], row_s[TILE];  // pixel centres of the tile's columns and rows

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int b = blockIdx.y;
    const int tiles_x = (W + TILE - 1) / TILE, num_tiles = tiles_x * ((H + TILE - 1) / TILE);
    const int tx0 = (blockIdx.x % tiles_x) * TILE, ty0 = (blockIdx.x / tiles_x) * TILE;
    const int lx0 = (warp & 1) * 8, ly0 = (warp >> 1) * 4;  // the warp's 8x4 pixel group in the tile
    const int x = tx0 + lx0 + (lane & 7), y = ty0 + ly0 + (lane >> 3);
    const bool group_in_map = tx0 + lx0 < W && ty0 + ly0 < H;
    stage_pixel_coords(col_s, row_s, tx0, ty0, W, H);
    begin_global_access();
    // The backward's gradient accumulator, (B, N, 5 + C) float32, when the op asks for one: each block zeroes its
    // share of its image's rows, which saves the backward a fill kernel of its own.
    if (grad_accumulator != nullptr) {
        const size_t image = (size_t)N * (5 + C);
        const size_t lo = image * blockIdx.x / num_tiles, hi = image * (blockIdx.x + 1) / num_tiles;
        float* g = grad_accumulator + (size_t)b * image;
        for (size_t q = lo + tid; q < hi; q += THREADS) g[q] = 0.0f;
    }
    __syncthreads();

    const T* tok_b = tokens + (size_t)b * N * (5 + C);
    unsigned* mask_tile = masks + ((size_t)b * num_tiles + blockIdx.x) * ((N + 31) >> 5);
    const Rect tile = pixel_rect(col_s, row_s, 0, TILE - 1, 0, TILE - 1);
    const Rect group = pixel_rect(col_s, row_s, lx0, lx0 + 7, ly0, ly0 + 3);
    const float2 px = in_register(col_s[lx0 + (lane & 7)]), py = in_register(row_s[ly0 + (lane >> 3)]);

    float acc[CPT];
#pragma unroll
    for (int k = 0; k < CPT; ++k) acc[k] = 0.0f;

    for (int base = 0; base < N; base += ROUND) {
        const int total = cull_round<T, CPT, ROUND>(tok_b, base, N, C, dmax, tile, mask_tile, geo_s, idx_s, feat_s,
                                                    warp_count);
        if (group_in_map) {
            for (int wb = 0; wb < total; wb += 32) {
                const int j = wb + lane;
                unsigned hits = __ballot_sync(FULL_MASK, j < total && box_touches(geo_s[j], group));
                while (hits) {
                    const int jj = wb + __ffs(hits) - 1;
                    hits &= hits - 1u;
                    const float g = pixel_weight(geo_s[jj], px, py).g;
                    const float4* f4 = reinterpret_cast<const float4*>(feat_s + jj * CPT);
#pragma unroll
                    for (int k4 = 0; k4 < CPT / 4; ++k4) {
                        const float4 f = f4[k4];
                        acc[4 * k4 + 0] = fmaf(g, f.x, acc[4 * k4 + 0]);
                        acc[4 * k4 + 1] = fmaf(g, f.y, acc[4 * k4 + 1]);
                        acc[4 * k4 + 2] = fmaf(g, f.z, acc[4 * k4 + 2]);
                        acc[4 * k4 + 3] = fmaf(g, f.w, acc[4 * k4 + 3]);
                    }
                }
            }
        }
        if (base + ROUND < N) __syncthreads();  // the next round overwrites the shared list
    }
    if constexpr (sizeof(T) == 2) {  // (16-bit maps: four pixels per store where the tile allows it)
        if (tx0 + TILE <= W && ty0 + TILE <= H && W % 4 == 0) {
            store_tile_staged<T, CPT, CPT * ROUND / THREADS>(acc, feat_s, out + (size_t)b * C * H * W, C, H, W, tx0,
                                                             ty0, y - ty0, x - tx0);
            return;
        }
    }
    if (x < W && y < H) {
        const size_t plane = (size_t)H * W;
        T* o = out + (size_t)b * C * plane + (size_t)y * W + x;
        if (C == CPT) {  // (no test per channel)
#pragma unroll
            for (int k = 0; k < CPT; ++k, o += plane) store_streaming(o, from_float<T>(acc[k]));
        } else {
#pragma unroll
            for (int k = 0; k < CPT; ++k, o += plane)
                if (k < C) store_streaming(o, from_float<T>(acc[k]));
        }
    }
}

// ---- backward ----

// The pixels [lo, hi] of one axis (n pixels, tile starting at t0) that may pass the box test of pixel_weight,
// |(c.x - m) + c.y| <= h, clamped to the tile and the map: each end estimated in pixel units and pushed outwards by
// more than the estimate's rounding and the test's (together under 2^-21 (2 + |m| + h) map units). The range holds
// every pixel of the box; a pixel in it that fails the exact test (at most one per end, and rarely any) gets weight
// 0 from pixel_weight and adds exact zeros. NaN: the range spans the tile and every weight is 0.
__device__ __forceinline__ int2 box_pixels(float m, float h, int n, int t0) {
    const float scale = 0.5f * (float)(n - 1);
    const int last = min(t0 + TILE, n) - 1;
    const float slack = fmaf(1e-6f * scale, 2.0f + fabsf(m) + h, 1e-4f);  // pixels
    const int lo = (int)fminf(fmaxf(ceilf(fmaf(m - h + 1.0f, scale, -slack)), (float)t0), (float)last);
    const int hi = (int)fmaxf(fminf(floorf(fmaf(m + h + 1.0f, scale, slack)), (float)last), (float)t0);
    return make_int2(lo, hi);
}

// a / d and a % d for 0 <= a < 64, 1 <= d <= 16 without an integer division: (a + 1/2) / d lies at least 1/32
// away from an integer, far more than the error of the approximate reciprocal (2^-22 relative).
__device__ __forceinline__ int2 small_divmod(int a, int d) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"((float)d));
    const int q = __float2int_rz(((float)a + 0.5f) * r);
    return make_int2(q, a - q * d);
}

// A float4 of shared memory (at a shared-space address) by a load the compiler may not hoist out of a loop (beyond
// 16 channels it would keep CPT features in registers and spill the gradient accumulators).
__device__ __forceinline__ float4 load_shared_volatile(unsigned address) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(address));
    return v;
}

// The value, which the compiler must take as unknown: address arithmetic on it stays where it is written
// (inside a loop, instead of a register per hoisted address).
__device__ __forceinline__ unsigned opaque(unsigned v) {
    asm volatile("" : "+r"(v));
    return v;
}

// The dout_s row of tile pixel (ly, lx). A row is an odd number of float4s (CPT + 4 floats, CPT >= 8), so the
// bank group (of 8) of a row's k-th float4 is set by the row index mod 8. Rotating tile row ly by 3 ly pixels
// spreads the 8 pixels a quarter-warp reads at once over the bank groups also when the box is narrower than 8
// pixels and those pixels span several rows (row-major walk: widths 1 and 3 conflict-free, 2 and 4 at most
// 2-way, instead of up to 8-way).
__device__ __forceinline__ int dout_row(int ly, int lx) { return ly * TILE + ((lx + 3 * ly) & (TILE - 1)); }

// grad: (B, N, 5 + C) fp32. Non-deterministic mode: pre-zeroed, atomically accumulated.
// Deterministic mode: a (B, tiles, N, 5 + C) buffer; only the entries of listed tokens are written.
template <typename T, int CPT, bool DETERMINISTIC>
__device__ __forceinline__ void backward(const T* __restrict__ tokens, const unsigned* __restrict__ masks,
                                         const T* __restrict__ dout, float* __restrict__ grad, int N, int C,
                                         int H, int W, float dmax, int early_dependents) {
    constexpr int DSTRIDE = CPT + 4;  // padded row of the staged dL/dout: conflict-free float4 access
    extern __shared__ float4 smem4[];
    float* dout_s = reinterpret_cast<float*>(smem4);  // THREADS rows (tile pixel (ly, lx): row dout_row(ly, lx))
    __shared__ TileList tl;
    __shared__ float2 col_s[TILE], row_s[TILE];  // pixel centres of the tile's columns and rows
    // Each half-warp's current token, as float32: value v of the token (sigma_x, sigma_y, rho, mu_x, mu_y, the
    // features) at float TOKEN_START + v, so that the features start 16-byte aligned; zeros past them to CPT.
    constexpr int TOKEN_START = 3, ROW4 = (TOKEN_START + 5 + CPT) / 4;
    __shared__ float4 token_s[WARPS][2][2][ROW4];  // two slots: the current token and the next
    __shared__ int next_item_s;  // the first list entry no half-warp has taken yet

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int half = lane / HALF_WARP, hl = lane % HALF_WARP;  // a warp works on two tokens, one per half
    const int b = blockIdx.y;
    const int tiles_x = (W + TILE - 1) / TILE, num_tiles = tiles_x * ((H + TILE - 1) / TILE);
    const int tx0 = (blockIdx.x % tiles_x) * TILE, ty0 = (blockIdx.x / tiles_x) * TILE;
    const int D = 5 + C;
    const int words = (N + 31) >> 5;
    const unsigned* mask_tile = masks + ((size_t)b * num_tiles + blockIdx.x) * words;
    stage_pixel_coords(col_s, row_s, tx0, ty0, W, H);
    for (int q = tid; q < WARPS * 2 * 2 * ROW4; q += THREADS)
        (&token_s[0][0][0][0])[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    wait_for_previous_kernels();
    if (early_dependents) let_next_kernel_launch();
    const unsigned mask_word = tid < words ? __ldg(mask_tile + tid) : 0u;  // in flight while dL/dout is staged

    // Stage dL/dout of the tile, four channels per shared store; zeros outside the map and past C.
    {
        const int x = tx0 + (tid & (TILE - 1)), y = ty0 + tid / TILE;
        const size_t plane = (size_t)H * W;
        const T* d = dout + (size_t)b * C * plane + (size_t)y * W + x;
        T raw[CPT];  // every load in flight before the first conversion
        if (x < W && y < H && C == CPT) {  // (no test per channel)
#pragma unroll
            for (int k = 0; k < CPT; ++k, d += plane) raw[k] = load_once(d);
        } else {
            const int channels = x < W && y < H ? C : 0;  // channels this thread reads
#pragma unroll
            for (int k = 0; k < CPT; ++k, d += plane) raw[k] = k < channels ? load_once(d) : T{};
        }
        float4* row = reinterpret_cast<float4*>(dout_s + dout_row(tid / TILE, tid % TILE) * DSTRIDE);
#pragma unroll
        for (int k4 = 0; k4 < CPT / 4; ++k4)
            row[k4] = make_float4(to_float(raw[4 * k4]), to_float(raw[4 * k4 + 1]), to_float(raw[4 * k4 + 2]),
                                  to_float(raw[4 * k4 + 3]));
    }

    const T* tok_b = tokens + (size_t)b * N * D;
    // dL/dtokens of this image, or this tile's partial sums (deterministic mode): N rows of D
    float* grad_rows = grad + (DETERMINISTIC ? ((size_t)b * num_tiles + blockIdx.x) : (size_t)b) * N * D;
    // (count_tile_tokens' barriers also publish dout_s, col_s, row_s and token_s)
    const int total = count_tile_tokens(mask_word, tl);
    for (int start = 0; start < total; start += THREADS) {
        if (tid == 0) next_item_s = 2 * WARPS;  // the first 2 WARPS entries are dealt out below
        expand_tile_list(words, start, tl);
        const int count = min(THREADS, total - start);
        // Each half-warp fetches its next token while it works on the current one (lane l: values l, l + 16, ...):
        // float32 tokens are copied into the other token_s slot asynchronously (the padding past the token stays
        // zero from the start), 16-bit ones loaded into registers and stored into it, as float32, when their turn
        // comes.
        constexpr int VALUES_PER_LANE = (5 + CPT + HALF_WARP - 1) / HALF_WARP;
        constexpr bool ASYNC = sizeof(T) == 4;
        float next_values[VALUES_PER_LANE];  // (16-bit tokens)
        const auto fetch = [&](int j, int slot) {
            // lane hl: values hl + 16 u of the token (a 32-bit offset within the image: N D < 2^31)
            const T* src = tok_b + ((unsigned)(j < count ? tl.list_s[j] : 0) * (unsigned)D + (unsigned)hl);
            float* dst = reinterpret_cast<float*>(token_s[warp][half][slot]) + TOKEN_START + hl;
#pragma unroll
            for (int u = 0; u < VALUES_PER_LANE; ++u) {
                const bool valid = j < count && hl + u * HALF_WARP < D;
                if constexpr (ASYNC) {
                    if (valid) copy_4_async(dst + u * HALF_WARP, reinterpret_cast<const float*>(src + u * HALF_WARP));
                } else {
                    next_values[u] = valid ? to_float(src[u * HALF_WARP]) : 0.0f;
                }
            }
            if constexpr (ASYNC) commit_async_copies();
        };
        // Makes the token fetched into `slot` visible to every lane; float32: all but the latest group of copies
        // have landed (the next token's, fetched just before, stays in flight).
        const auto land = [&](int slot) {
            if constexpr (ASYNC) {
                wait_async_copies_but_one();
            } else {
                float* dst = reinterpret_cast<float*>(token_s[warp][half][slot]) + TOKEN_START;
#pragma unroll
                for (int u = 0; u < VALUES_PER_LANE; ++u)
                    if (hl + u * HALF_WARP < 5 + CPT) dst[hl + u * HALF_WARP] = next_values[u];
            }
            __syncwarp();
        };
        // Half-warp h starts with list entry h and then takes the next entry not yet taken, so that the ones
        // whose boxes cover few pixels take more entries. A warp loops while either half has an entry (the
        // reductions below need both halves).
        int j = 2 * warp + half;
        fetch(j, 0);
        for (int slot = 0; __any_sync(FULL_MASK, j < count); slot ^= 1) {
            const bool active = j < count;
            const int i = active ? tl.list_s[j] : 0;
            const int next = __shfl_sync(FULL_MASK, hl == 0 ? atomicAdd(&next_item_s, 1) : 0, half * HALF_WARP);
            if constexpr (ASYNC) {
                fetch(next, slot ^ 1);
                land(slot);
            } else {  // (the registers hold the current token until it is stored)
                land(slot);
                fetch(next, slot ^ 1);
            }
            const float4* row = token_s[warp][half][slot];
            const Geo gd = make_geo(reinterpret_cast<const float*>(row)[TOKEN_START], row[1].x, row[1].y, row[1].z,
                                    row[1].w, dmax);  // (row[1]: sigma_y, rho, mu_x, mu_y)
            const unsigned f_shared = (unsigned)__cvta_generic_to_shared(row + 2);  // the features
            // Up to 16 channels the features stay in registers for the token's whole pixel walk; beyond, they are
            // read from shared memory at every pixel (registers for 32 would leave room for 2 blocks per SM instead
            // of 3, which measured slower: benchmarks/RESULTS.md).
            constexpr bool FEATURES_IN_REGISTERS = CPT <= 16;
            float4 features[FEATURES_IN_REGISTERS ? CPT / 4 : 1];
            if constexpr (FEATURES_IN_REGISTERS) {
#pragma unroll
                for (int k4 = 0; k4 < CPT / 4; ++k4) features[k4] = row[2 + k4];
            }
            float dfeat[CPT];
#pragma unroll
            for (int k = 0; k < CPT; ++k) dfeat[k] = 0.0f;
            // per-lane sums, in token component order: sigma_x, sigma_y, rho, mu_x, mu_y (3 pad)
            float dgeo[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            // The half-warp's lanes walk the box's pixels in the tile, row-major, 16 at a time.
            const int2 xs = box_pixels(gd.mx, gd.hx, W, tx0), ys = box_pixels(gd.my, gd.hy, H, ty0);
            const int rw = active ? xs.y - xs.x + 1 : 0, rh = ys.y - ys.x + 1;
            if (rw > 0 && rh > 0) {
                const int2 jump = small_divmod(HALF_WARP, rw), start_q = small_divmod(hl, rw);
                const int jump_x = jump.y, jump_y = jump.x;
                int qx = start_q.y, qy = start_q.x;
                while (qy < rh) {
                    const int lx = xs.x - tx0 + qx, ly = ys.x - ty0 + qy;
                    const Weight w = pixel_weight(gd, col_s[lx], row_s[ly]);
                    const float4* d4 = reinterpret_cast<const float4*>(dout_s + dout_row(ly, lx) * DSTRIDE);
                    float dg_even = 0.0f, dg_odd = 0.0f;  // dL/dg at this pixel = sum_k dout_k f_k, two chains
                    const unsigned f_address = opaque(f_shared);
#pragma unroll
                    for (int k4 = 0; k4 < CPT / 4; ++k4) {
                        const float4 dv = d4[k4];
                        const float4 f =
                            FEATURES_IN_REGISTERS ? features[k4] : load_shared_volatile(f_address + 16 * k4);
                        dg_even = fmaf(dv.x, f.x, fmaf(dv.z, f.z, dg_even));
                        dg_odd = fmaf(dv.y, f.y, fmaf(dv.w, f.w, dg_odd));
                        dfeat[4 * k4 + 0] = fmaf(w.g, dv.x, dfeat[4 * k4 + 0]);
                        dfeat[4 * k4 + 1] = fmaf(w.g, dv.y, dfeat[4 * k4 + 1]);
                        dfeat[4 * k4 + 2] = fmaf(w.g, dv.z, dfeat[4 * k4 + 2]);
                        dfeat[4 * k4 + 3] = fmaf(w.g, dv.w, dfeat[4 * k4 + 3]);
                    }
                    const float t = w.g * (dg_even + dg_odd);  // = -dL/dq
                    dgeo[0] = fmaf(t * w.e, w.ux, dgeo[0]);
                    dgeo[1] = fmaf(t * w.ep, w.uy, dgeo[1]);
                    dgeo[2] = fmaf(t * w.e, w.ep, dgeo[2]);
                    dgeo[3] = fmaf(t, w.e, dgeo[3]);
                    dgeo[4] = fmaf(t, w.ep, dgeo[4]);
                    qx += jump_x;
                    qy += jump_y;
                    if (qx >= rw) {
                        qx -= rw;
                        ++qy;
                    }
                }
            }
            // sums over each half-warp (butterflies up to offset 8 stay inside a half)
            transpose_reduce<CPT, HALF_WARP / 2>(dfeat, lane);
            transpose_reduce<8, HALF_WARP / 2>(dgeo, lane);

            if (active) {
                // the token's row of dL/dtokens (or of this tile's partial sums), by 32-bit offsets from grad_rows
                const unsigned row = (unsigned)i * (unsigned)D;
                // geometry: lane hl holds component hl / 2; scale by the chain-rule factors of the token
                const int comp = hl >> 1;
                if ((hl & 1) == 0 && comp < 5) {
                    const float inv_s = 2.0f * gd.hinv;  // 1 / (1 - rho^2)
                    const float scale =
                        comp == 2 ? inv_s * inv_s : inv_s * ((comp == 0 || comp == 3) ? gd.isx : gd.isy);
                    const float val = scale * dgeo[0];
                    float* out = grad_rows + (row + (unsigned)comp);
                    if (DETERMINISTIC) *out = val; else atomicAdd(out, val);
                }
                // features: lane hl holds channels (CPT / 16) hl + u, or channel hl / (16 / CPT) for CPT < 16
                constexpr int LANE_CHANNELS = CPT >= HALF_WARP ? CPT / HALF_WARP : 1;
                constexpr int CHANNEL_LANES = CPT >= HALF_WARP ? 1 : HALF_WARP / CPT;
                const int k0 = LANE_CHANNELS * hl / CHANNEL_LANES;
                const bool holder = hl % CHANNEL_LANES == 0;
                float* out = grad_rows + (row + 5u + (unsigned)k0);
#pragma unroll
                for (int u = 0; u < LANE_CHANNELS; ++u) {
                    if (holder && k0 + u < C) {
                        if (DETERMINISTIC) out[u] = dfeat[u]; else atomicAdd(out + u, dfeat[u]);
                    }
                }
            }
            __syncwarp();  // every lane is done with this token before the next iteration refills its slot
            j = next;
        }
        if (start + THREADS < total) __syncthreads();  // the next window overwrites the list
    }
}

// ---- deterministic mode: sum the per-tile partial gradients of each token in tile order ----
// One warp per (image, token); the tiles that listed the token are those whose mask holds its bit.
template <typename T>
__device__ __forceinline__ void reduce_tiles(const T* __restrict__ tokens, const unsigned* __restrict__ masks,
                                             const float* __restrict__ partial, float* __restrict__ grad, int B,
                                             int N, int C, int H, int W, float dmax) {
    const int lane = threadIdx.x & 31;
    const long long item = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    begin_global_access();
    if (item >= (long long)B * N) return;
    const int b = (int)(item / N), i = (int)(item % N);
    const int D = 5 + C;
    const int tiles_x = (W + TILE - 1) / TILE, num_tiles = tiles_x * ((H + TILE - 1) / TILE);
    const int words = (N + 31) >> 5;
    const TileRange r = tile_range(token_box(tokens + (size_t)item * D, dmax), H, W);
    for (int v0 = 0; v0 < D; v0 += 32) {
        const int v = v0 + lane;
        float sum = 0.0f;
        for (int ty = r.y0; ty <= r.y1; ++ty)
            for (int tx = r.x0; tx <= r.x1; ++tx) {
                const size_t tile = (size_t)b * num_tiles + ty * tiles_x + tx;
                if (!((__ldg(masks + tile * words + (i >> 5)) >> (i & 31)) & 1u)) continue;
                if (v < D) sum += partial[(tile * N + i) * D + v];
            }
        if (v < D) grad[((size_t)b * N + i) * D + v] = sum;
    }
}

// ---- the float32 gradient in the tokens' dtype ----
// out[q] = in[q] for q < n, four values per thread (n: the values of a (B, N, 5 + C) gradient).
template <typename T>
__device__ __forceinline__ void cast_values(const float* __restrict__ in, T* __restrict__ out, long long n) {
    begin_global_access();
    const long long q = 4 * ((long long)blockIdx.x * THREADS + threadIdx.x);
    if (q + 4 <= n) {  // (both buffers start at 256-byte boundaries, so q is aligned for 16- and 8-byte access)
        const float4 v = *reinterpret_cast<const float4*>(in + q);
        if constexpr (sizeof(T) == 2) store4(out + q, v);
        else *reinterpret_cast<float4*>(out + q) = v;
    } else {
        for (long long r = q; r < n; ++r) out[r] = from_float<T>(in[r]);
    }
}

// ---- entry points ----
// The host appends one `SPLAT_INSTANTIATE(storage type, CPT)` line per compiled variant, so each
// program holds only the five kernels one (dtype, channel padding) pair needs.
#define SPLAT_INSTANTIATE(T, CPT)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, FORWARD_MIN_BLOCKS)                            \
        render_forward(const T* tokens, unsigned* masks, T* out, float* grad_accumulator, int N, int C, int H, \
                       int W, float dmax) {                                                            \
        forward<T, CPT>(tokens, masks, out, grad_accumulator, N, C, H, W, dmax);                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, BACKWARD_MIN_BLOCKS) render_backward(           \
        const T* tokens, const unsigned* masks, const T* dout, float* grad, int N, int C, int H, int W, \
        float dmax, int early_dependents) {                                                            \
        backward<T, CPT, false>(tokens, masks, dout, grad, N, C, H, W, dmax, early_dependents);        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, BACKWARD_MIN_BLOCKS)                           \
        render_backward_deterministic(const T* tokens, const unsigned* masks, const T* dout,           \
                                      float* partial, int N, int C, int H, int W, float dmax,          \
                                      int early_dependents) {                                          \
        backward<T, CPT, true>(tokens, masks, dout, partial, N, C, H, W, dmax, early_dependents);      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) reduce_tile_gradients(                       \
        const T* tokens, const unsigned* masks, const float* partial, float* grad, int B, int N, int C, \
        int H, int W, float dmax) {                                                                    \
        reduce_tiles<T>(tokens, masks, partial, grad, B, N, C, H, W, dmax);                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) cast_gradient(const float* grad, T* out, long long n) { \
        cast_values<T>(grad, out, n);                                                                  \
    }
