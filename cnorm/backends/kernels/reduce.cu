// Two-stage deterministic reductions: per-channel statistics and gradient
// sums (BatchNorm, dweight/dbias), and per-row statistics of rows too long
// for one block.
//
// Stage 1 (`*_partial`) writes one partial result per (segment, chunk) into
// float32 (float64 for double) buffers; stage 2 (`*_finalize`) combines a
// segment's partials in a fixed order, one warp per segment. Chunk sizes are
// chosen by the host from the problem shape alone, so results do not depend
// on timing or on the device.
//
// Segment addressing (all in VEC-element vectors): segment `seg` starts at
// base = (seg / segdiv) * sa + (seg % segdiv) * sb, and its vector k, with
// (q, r) = divmod(k, d), lives at base + q * qstride + r.
#include "common.cuh"

using namespace cnorm;

// Statistics partials accumulate in double for every input type: a float32 M2
// overflows once |x| reaches ~1e19 (squares past 3.4e38), and BatchNorm's
// channels are long. The extra cost is arithmetic on a memory-bound pass.
typedef double StatAcc;

// Welford partial statistics of chunk `blockIdx.x % nchunks` of segment
// `blockIdx.x / nchunks`; partial index blockIdx.x. With ADD (the fused
// residual add of a row split over blocks) the statistics are those of
// h = x + r (add_vec), and h is stored: each thread loads x and r at a vector
// before it stores h there, so h may be x or r itself. Without ADD, r and h
// are not accessed.
template <typename T, int VEC, bool ADD>
__global__ void seg_stats_partial(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ h, i64 segdiv,
                                  i64 sa, i64 sb, i64 d, i64 qstride, i64 length, i64 chunk, int nchunks,
                                  double* __restrict__ pn, double* __restrict__ pmean, double* __restrict__ pm2) {
    typedef StatAcc A;
    __shared__ Welford<A> scratch[32];
    const i64 seg = blockIdx.x / nchunks;
    const i64 ch = blockIdx.x - seg * nchunks;
    const i64 base = (seg / segdiv) * sa + (seg % segdiv) * sb;
    const i64 k1 = min((ch + 1) * chunk, length);
    const int step = blockDim.x;
    i64 k = ch * chunk + threadIdx.x;
    Welford<A> w = wf_empty<A>();
    Walker it;
    it.init(k, d, step);
    for (; k + 3 * step < k1; k += 4 * step) {
        Vec<T, VEC> v[4];
        i64 o[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            o[u] = base + it.q * qstride + it.r;
            v[u] = load_vec<T, VEC>(x, o[u]);
            it.advance();
        }
        if constexpr (ADD) add_residual4<T, VEC>(v, r, h, o);
#pragma unroll
        for (int u = 0; u < 4; ++u) wf_add_vec(w, v[u]);
    }
    for (; k < k1; k += step) {
        const i64 o = base + it.q * qstride + it.r;
        Vec<T, VEC> v = load_vec<T, VEC>(x, o);
        if constexpr (ADD) {
            v = add_vec(v, load_vec<T, VEC>(r, o));
            store_vec<T, VEC>(h, o, v);
        }
        wf_add_vec(w, v);
        it.advance();
    }
    w = wf_group_reduce(w, scratch, blockDim.x);
    if (threadIdx.x == 0) {
        pn[blockIdx.x] = w.n;
        pmean[blockIdx.x] = w.mean;
        pm2[blockIdx.x] = w.m2;
    }
}

// Channels-last cross-sample statistics: x is R rows of C channels (CV
// vectors). blockIdx.x = chunk * ncolblk + colblk; the block is TX vector
// columns by TY = 256 / TX rows. Partial index chunk * C + channel.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) col_stats_partial(const T* __restrict__ x, i64 R, i64 CV, int TX, i64 chunk,
                                                         int ncolblk, double* __restrict__ pn,
                                                         double* __restrict__ pmean, double* __restrict__ pm2) {
    typedef StatAcc A;
    __shared__ Welford<A> sh[256 * VEC];
    const int TY = blockDim.x / TX;
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const i64 chunk_id = blockIdx.x / ncolblk;
    const i64 cv = (blockIdx.x - chunk_id * ncolblk) * TX + tx;
    const i64 r1 = min((chunk_id + 1) * chunk, R);
    Welford<A> w[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = wf_empty<A>();
    if (cv < CV) {
        i64 r = chunk_id * chunk + ty;
        for (; r + 3 * TY < r1; r += 4 * TY) {
            Vec<T, VEC> v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = load_vec<T, VEC>(x, (r + u * TY) * CV + cv);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                A a[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) a[u] = to_acc(v[u].v[j]);
                const A m = ((a[0] + a[1]) + (a[2] + a[3])) * A(0.25);
                A q = A(0);
#pragma unroll
                for (int u = 0; u < 4; ++u) q += (a[u] - m) * (a[u] - m);
                wf_merge(w[j], A(4), m, q);
            }
        }
        for (; r < r1; r += TY) {
            const Vec<T, VEC> v = load_vec<T, VEC>(x, r * CV + cv);
#pragma unroll
            for (int j = 0; j < VEC; ++j) wf_merge(w[j], A(1), A(to_acc(v.v[j])), A(0));
        }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sh[threadIdx.x * VEC + j] = w[j];
    __syncthreads();
    for (int s = TY / 2; s > 0; s >>= 1) {
        if (ty < s) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) wf_merge(sh[threadIdx.x * VEC + j], sh[(threadIdx.x + s * TX) * VEC + j]);
        }
        __syncthreads();
    }
    if (ty == 0 && cv < CV) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const i64 o = chunk_id * CV * VEC + cv * VEC + j;
            const Welford<A> r = sh[threadIdx.x * VEC + j];
            pn[o] = r.n;
            pmean[o] = r.mean;
            pm2[o] = r.m2;
        }
    }
}

// Merge each segment's partials (warp per segment, fixed order) into mean,
// biased var and, with flags & 1, rstd = 1/sqrt(var + eps); with flags & 2
// also scale = weight * rstd (a segment is then a channel), the product of the
// stored (rounded) rstd, so that a backward forming rstd * weight from the saved
// statistics gets scale's bits. flags & 4 (RMSNorm): mean is stored as 0 and
// var is the mean square, m2/n + mean² (Σx²/n, in double).
template <typename O>
__global__ void stats_finalize(const double* __restrict__ pn, const double* __restrict__ pmean,
                               const double* __restrict__ pm2, i64 nseg, int nchunks, i64 seg_stride,
                               i64 chunk_stride, double eps, int flags, O* __restrict__ mean, O* __restrict__ var,
                               O* __restrict__ rstd, const O* __restrict__ weight, O* __restrict__ scale) {
    typedef StatAcc A;
    const i64 seg = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (seg >= nseg) return;  // whole warps leave together
    Welford<A> w = wf_empty<A>();
    for (int c = lane; c < nchunks; c += 32) {
        const i64 o = seg * seg_stride + c * chunk_stride;
        wf_merge(w, pn[o], pmean[o], pm2[o]);
    }
    wf_warp_reduce(w);
    if (lane == 0) {
        const bool rms = (flags & 4) != 0;
        const A v = rms ? w.m2 / w.n + w.mean * w.mean : w.m2 / w.n;
        mean[seg] = rms ? O(0) : O(w.mean);
        var[seg] = O(v);  // inf in float32 when |x| ~ 1e30; rstd below is still exact
        if (flags & 1) {
            const O rs = O(A(1) / sqrt(v + eps));
            rstd[seg] = rs;
            if (flags & 2) scale[seg] = O(A(weight[seg]) * A(rs));  // exact in double, then rounded once
        }
    }
}

// Channels-first partial gradient sums per channel: segment = channel c, its
// vectors are N runs of SV. Sums g and g * xhat, with xhat from per-channel
// statistics (G == 0) or per-(sample, group) statistics (G groups of cg), and
// g = dy * act'(z), z = (x - mean) * (rstd * weight[c]) + bias[c] recomputed as the
// forward formed it (weight and bias are read only when ACT != ACT_NONE).
// rms != 0: the mean is 0 (RMSNorm), not read.
template <typename T, int VEC, int ACT>
__global__ void seg_grad_partial(const T* __restrict__ dy, const T* __restrict__ x,
                                 const typename Acc<T>::type* __restrict__ mean,
                                 const typename Acc<T>::type* __restrict__ rstd,
                                 const typename Acc<T>::type* __restrict__ weight,
                                 const typename Acc<T>::type* __restrict__ bias, i64 C, i64 SV, i64 N, int G, int cg,
                                 int rms, i64 chunk, int nchunks, typename Acc<T>::type* __restrict__ p1,
                                 typename Acc<T>::type* __restrict__ p2) {
    typedef typename Acc<T>::type A;
    __shared__ Sum2<A> scratch[32];
    const i64 c = blockIdx.x / nchunks;
    const i64 ch = blockIdx.x - c * nchunks;
    const i64 k1 = min((ch + 1) * chunk, N * SV);
    const int step = blockDim.x;
    const i64 gc = G ? c / cg : c;
    const A wc = ACT != ACT_NONE ? weight[c] : A(0);
    const A bc = ACT != ACT_NONE ? bias[c] : A(0);
    i64 k = ch * chunk + threadIdx.x;
    Walker it;
    it.init(k, SV, step);
    Sum2<A> s;
    s.a = A(0);
    s.b = A(0);
    for (; k < k1; k += step) {
        const i64 o = it.q * C * SV + c * SV + it.r;
        const i64 si = G ? it.q * G + gc : gc;
        const Vec<T, VEC> g = load_vec<T, VEC>(dy, o);
        const Vec<T, VEC> v = load_vec<T, VEC>(x, o);
        const A m = rms ? A(0) : mean[si];
        const A rs = rstd[si];
        A sg = A(0), sgx = A(0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const A xc = to_acc(v.v[j]) - m;
            A gj = to_acc(g.v[j]);
            if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(xc, rs * wc, bc));
            sg += gj;
            sgx += gj * xc;
        }
        s.a += sg;
        s.b += sgx * rs;
        it.advance();
    }
    s = sum2_group_reduce(s, scratch, blockDim.x);
    if (threadIdx.x == 0) {
        p1[blockIdx.x] = s.a;
        p2[blockIdx.x] = s.b;
    }
}

// Channels-last partial gradient sums: rows r of R = N * S, n = r / S.
// Layout and partial index as col_stats_partial; g, ACT and rms as seg_grad_partial.
template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(256) col_grad_partial(const T* __restrict__ dy, const T* __restrict__ x,
                                                        const typename Acc<T>::type* __restrict__ mean,
                                                        const typename Acc<T>::type* __restrict__ rstd,
                                                        const typename Acc<T>::type* __restrict__ weight,
                                                        const typename Acc<T>::type* __restrict__ bias, i64 R, i64 S,
                                                        i64 CV, int G, int cg, int rms, int TX, i64 chunk,
                                                        int ncolblk, typename Acc<T>::type* __restrict__ p1,
                                                        typename Acc<T>::type* __restrict__ p2) {
    typedef typename Acc<T>::type A;
    __shared__ Sum2<A> sh[256 * VEC];
    const int TY = blockDim.x / TX;
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    const i64 chunk_id = blockIdx.x / ncolblk;
    const i64 cv = (blockIdx.x - chunk_id * ncolblk) * TX + tx;
    const i64 r1 = min((chunk_id + 1) * chunk, R);
    Sum2<A> s[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        s[j].a = A(0);
        s[j].b = A(0);
    }
    if (cv < CV) {
        i64 r = chunk_id * chunk + ty;
        Walker it;  // (n, s) of row r
        it.init(r, S, TY);
        // With G groups every element of a vector is in group (cv*VEC)/cg.
        const i64 gc = G ? (cv * VEC) / cg : 0;
        A mc[VEC], rc[VEC], wc[VEC], bc[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            mc[j] = G ? A(0) : mean[cv * VEC + j];
            rc[j] = G ? A(0) : rstd[cv * VEC + j];
            wc[j] = ACT != ACT_NONE ? weight[cv * VEC + j] : A(0);
            bc[j] = ACT != ACT_NONE ? bias[cv * VEC + j] : A(0);
        }
        for (; r < r1; r += TY) {
            const Vec<T, VEC> g = load_vec<T, VEC>(dy, r * CV + cv);
            const Vec<T, VEC> v = load_vec<T, VEC>(x, r * CV + cv);
            if (G) {
                const i64 si = it.q * G + gc;
                const A m = rms ? A(0) : mean[si];
                const A rs = rstd[si];
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A xc = to_acc(v.v[j]) - m;
                    A gj = to_acc(g.v[j]);
                    if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(xc, rs * wc[j], bc[j]));
                    s[j].a += gj;
                    s[j].b += gj * (xc * rs);
                }
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A xc = to_acc(v.v[j]) - mc[j];
                    A gj = to_acc(g.v[j]);
                    if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(xc, rc[j] * wc[j], bc[j]));
                    s[j].a += gj;
                    s[j].b += gj * (xc * rc[j]);
                }
            }
            it.advance();
        }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sh[threadIdx.x * VEC + j] = s[j];
    __syncthreads();
    for (int st = TY / 2; st > 0; st >>= 1) {
        if (ty < st) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                sh[threadIdx.x * VEC + j].a += sh[(threadIdx.x + st * TX) * VEC + j].a;
                sh[threadIdx.x * VEC + j].b += sh[(threadIdx.x + st * TX) * VEC + j].b;
            }
        }
        __syncthreads();
    }
    if (ty == 0 && cv < CV) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const i64 o = chunk_id * CV * VEC + cv * VEC + j;
            p1[o] = sh[threadIdx.x * VEC + j].a;
            p2[o] = sh[threadIdx.x * VEC + j].b;
        }
    }
}

// Sum each channel's partials in a fixed order (warp per channel) into
// sum_dy and sum_dy_xhat; with flags & 1 also their means (times inv_count).
template <typename A>
__global__ void grad_finalize(const A* __restrict__ p1, const A* __restrict__ p2, i64 C, int nchunks,
                              i64 seg_stride, i64 chunk_stride, A inv_count, int flags, A* __restrict__ sum1,
                              A* __restrict__ sum2, A* __restrict__ mean1, A* __restrict__ mean2) {
    const i64 c = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (c >= C) return;
    A a = A(0), b = A(0);
    for (int k = lane; k < nchunks; k += 32) {
        const i64 o = c * seg_stride + k * chunk_stride;
        a += p1[o];
        b += p2[o];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(CNORM_FULL_MASK, a, off);
        b += __shfl_down_sync(CNORM_FULL_MASK, b, off);
    }
    if (lane == 0) {
        sum1[c] = a;
        sum2[c] = b;
        if (flags & 1) {
            mean1[c] = a * inv_count;
            mean2[c] = b * inv_count;
        }
    }
}
