// Per-sample rows held in registers (LayerNorm, GroupNorm, InstanceNorm):
// one row (sample, group) per group of tpr = 2^tpr_shift threads (a warp or
// a whole block, at most 512 threads: under __launch_bounds__(1024) ptxas cut
// some instances to 32 registers and spilled, which cost 7% on LayerNorm
// float32), each thread holding ITEMS 16-byte vectors of it. Every load
// of a thread is issued before any arithmetic uses it, x is read from device
// memory once, there is no per-element index arithmetic beyond 32-bit offsets
// inside the row, and the statistics are two-pass from the registers (the sum,
// then the sum of squared deviations from the mean): exact-order warp
// butterflies, then one shared-memory step across the row's warps, so every
// thread of the row gets bit-identical results, run to run.
//
// MODE (how a row lies in memory and where its affine parameters come from):
//   0  contiguous row, one parameter per element (S == 1: LayerNorm, and a
//      per-sample norm of an (N, C) input); vector k covers channels
//      g*cg + k*VEC + [0, VEC).
//   1  contiguous row of cg channels of S values (channels-first GroupNorm,
//      InstanceNorm); vector k lies in channel g*cg + k*VEC / S (S % VEC == 0).
//   2  channels-last with S > 1: the row is S runs of cg values, C apart;
//      vector k = (q, r) = divmod(k, cg/VEC) is at q*C + g*cg + r*VEC.
//
// Variants (template parameters), as in rows.cu: ACT the activation
// (common.cuh), RMS the mean-square statistics of RMSNorm, ADD the fused
// residual add (forward: the row is h = x + r, stored to h; backward:
// dx = dh + the norm's dx). The launcher takes RMS and ADD to MODE 0 only
// (their rows have S == 1); pointers a variant does not use are not accessed.
//
// The launcher guarantees: VEC is the 16-byte width, the row's M vectors fit
// ITEMS * tpr, nrows and the per-sample element count are below 2^31, for
// MODES 0 and 2 that weight and bias (where read) are 16-byte aligned, and
// that a row of more than one warp has its block to itself (blockDim.x == tpr
// when tpr > 32).
#include "common.cuh"

using namespace cnorm;

namespace {

// Sum over the tpr = 2^tpr_shift consecutive threads of a row; every thread of
// the row gets the same bits. red: 32 slots, used by this call alone. Must be
// reached by every thread of the block (it may hold a barrier).
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* red, int tpr_shift) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(CNORM_FULL_MASK, v, off);
    if (tpr_shift > 5) {
        const int lane = threadIdx.x & 31;
        if (lane == 0) red[threadIdx.x >> 5] = v;
        __syncthreads();
        const int nw = 1 << (tpr_shift - 5);
        const int first = (threadIdx.x >> tpr_shift) << (tpr_shift - 5);
        v = lane < nw ? red[first + lane] : A(0);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(CNORM_FULL_MASK, v, off);
    }
    return v;
}

// The same for two sums at once (one barrier).
template <typename A>
__device__ __forceinline__ void row_sum2(A& a, A& b, A* red_a, A* red_b, int tpr_shift) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_xor_sync(CNORM_FULL_MASK, a, off);
        b += __shfl_xor_sync(CNORM_FULL_MASK, b, off);
    }
    if (tpr_shift > 5) {
        const int lane = threadIdx.x & 31;
        if (lane == 0) {
            red_a[threadIdx.x >> 5] = a;
            red_b[threadIdx.x >> 5] = b;
        }
        __syncthreads();
        const int nw = 1 << (tpr_shift - 5);
        const int first = (threadIdx.x >> tpr_shift) << (tpr_shift - 5);
        a = lane < nw ? red_a[first + lane] : A(0);
        b = lane < nw ? red_b[first + lane] : A(0);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_xor_sync(CNORM_FULL_MASK, a, off);
            b += __shfl_xor_sync(CNORM_FULL_MASK, b, off);
        }
    }
}

// VEC consecutive parameters (statistics type A) from a 16-byte aligned address,
// as 16-byte loads.
template <typename A, int VEC>
__device__ __forceinline__ void load_params(const A* __restrict__ p, A (&out)[VEC]) {
    constexpr int PER = 16 / sizeof(A);  // parameters per 16-byte load
    static_assert(VEC % PER == 0, "VEC parameters must be whole 16-byte loads");
#pragma unroll
    for (int h = 0; h < VEC / PER; ++h) {
        const Vec<A, PER> c = reinterpret_cast<const Vec<A, PER>*>(p)[h];
#pragma unroll
        for (int j = 0; j < PER; ++j) out[h * PER + j] = c.v[j];
    }
}

// Geometry of one row for the three modes: element offset of vector k from
// the row's base, and the first channel of vector k.
template <int VEC, int MODE>
struct RegRow {
    unsigned long long base;  // element offset of the row in x
    unsigned c0, cgv, S, C;

    __device__ __forceinline__ RegRow(unsigned row, unsigned G, unsigned cg, unsigned S_, unsigned C_, unsigned M) {
        const unsigned n = row / G, g = row - n * G;
        c0 = g * cg;
        cgv = cg / VEC;
        S = S_;
        C = C_;
        if (MODE == 2) {
            base = (unsigned long long)n * S_ * C_ + c0;
        } else {
            base = (unsigned long long)row * M * VEC;
        }
    }

    __device__ __forceinline__ unsigned offset(unsigned k) const {
        if (MODE == 2) {
            const unsigned q = k / cgv;
            return q * C + (k - q * cgv) * VEC;
        }
        return k * VEC;
    }

    // Channel of the vector's first element (MODE 1: of all its elements).
    __device__ __forceinline__ unsigned chan(unsigned k) const {
        if (MODE == 0) return c0 + k * VEC;
        if (MODE == 1) return c0 + k * VEC / S;
        return c0 + (k % cgv) * VEC;
    }
};

}  // namespace

// Forward (training statistics): y = act((x - mean) * rstd * weight + bias), with
// mean/var/rstd of each row written too. RMS: mean 0, var = Σx²/m. ADD: every
// load of x and r is issued first, then h = x + r is stored from the registers
// (so h may be x or r itself) and normalized.
template <typename T, int VEC, int ITEMS, int MODE, int ACT, bool RMS, bool ADD>
__global__ void __launch_bounds__(512) row_forward_regs(
    const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ h, T* __restrict__ y,
    const typename Acc<T>::type* __restrict__ weight, const typename Acc<T>::type* __restrict__ bias, unsigned nrows,
    unsigned G, unsigned cg, unsigned S, unsigned C, unsigned M, int tpr_shift, typename Acc<T>::type eps,
    typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ var,
    typename Acc<T>::type* __restrict__ rstd) {
    typedef typename Acc<T>::type A;
    typedef Vec<T, VEC> V;
    __shared__ A red[3][32];
    const unsigned tpr = 1u << tpr_shift;
    const unsigned lt = threadIdx.x & (tpr - 1);
    const unsigned row = blockIdx.x * (blockDim.x >> tpr_shift) + (threadIdx.x >> tpr_shift);
    const bool active = row < nrows;
    const RegRow<VEC, MODE> geo(active ? row : 0, G, cg, S, C, M);
    const T* __restrict__ xr = x + geo.base;

    V v[ITEMS];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        const unsigned k = lt + u * tpr;
        if (active && k < M) {
            v[u] = *reinterpret_cast<const V*>(xr + geo.offset(k));
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[u].v[j] = Cvt<T>::from(0.0f);
        }
    }
    if constexpr (ADD) {
        const T* __restrict__ rr = r + geo.base;
        T* __restrict__ hr = h + geo.base;
        V rv[ITEMS];
#pragma unroll
        for (int u = 0; u < ITEMS; ++u) {
            const unsigned k = lt + u * tpr;
            if (active && k < M) rv[u] = *reinterpret_cast<const V*>(rr + geo.offset(k));
        }
#pragma unroll
        for (int u = 0; u < ITEMS; ++u) {
            const unsigned k = lt + u * tpr;
            if (active && k < M) {
                v[u] = add_vec(v[u], rv[u]);
                *reinterpret_cast<V*>(hr + geo.offset(k)) = v[u];
            }
        }
    }
    const A len = A(M) * A(VEC);
    // Pass 1: the mean (absent elements hold 0); RMS: none.
    A mu = A(0);
    if constexpr (!RMS) {
        A s = A(0);
#pragma unroll
        for (int u = 0; u < ITEMS; ++u) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) s += to_acc(v[u].v[j]);
        }
        mu = row_sum(s, red[0], tpr_shift) / len;
    }
    // Pass 2: squared deviations (RMS: squares), from the registers.
    A q = A(0);
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        if (lt + u * tpr < M) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const A d = to_acc(v[u].v[j]) - mu;
                q += d * d;
            }
        }
    }
    const A vr = row_sum(q, red[1], tpr_shift) / len;
    A rs = A(1) / sqrt(vr + eps);
    if (sizeof(A) == 4 && isinf(vr)) {
        // float statistics whose squared deviations overflowed (|x - mean| > ~1e19) while
        // the variance's square root does not: sum them again scaled by 2^-64 (exact).
        // The branch is the same for every thread of the row, and a block holding a
        // row of several warps holds that row alone, so the barrier inside is safe.
        const A down = A(5.42101086242752217e-20);  // 2^-64
        A qs = A(0);
#pragma unroll
        for (int u = 0; u < ITEMS; ++u) {
            if (lt + u * tpr < M) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A d = (to_acc(v[u].v[j]) - mu) * down;
                    qs += d * d;
                }
            }
        }
        rs = down / sqrt(row_sum(qs, red[2], tpr_shift) / len);
    }
    if (!active) return;  // no barrier follows
    if (lt == 0) {
        mean[row] = mu;
        var[row] = vr;
        rstd[row] = rs;
    }
    T* __restrict__ yr = y + geo.base;
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        const unsigned k = lt + u * tpr;
        if (k < M) {
            V o;
            const unsigned c = geo.chan(k);
            if (MODE == 1) {
                const A sc = rs * weight[c], b = bias[c];
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                    o.v[j] = Cvt<T>::from(act_value<ACT>(norm_z(to_acc(v[u].v[j]) - mu, sc, b)));
            } else {
                A w[VEC], b[VEC];
                load_params<A, VEC>(weight + c, w);
                load_params<A, VEC>(bias + c, b);
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                    o.v[j] = Cvt<T>::from(act_value<ACT>(norm_z(to_acc(v[u].v[j]) - mu, rs * w[j], b[j])));
            }
            *reinterpret_cast<V*>(yr + geo.offset(k)) = o;
        }
    }
}

// dx with statistics depending on x (training):
// dx = rstd * (w*g - mean(w*g) - xhat * mean(w*g*xhat)), x and dy read once, with
// g = dy * act'(z), z recomputed as the forward formed it. RMS: no mean(w*g)
// term, mean not read (0). ADD: dx = dh + that (add_grad), dh loaded with x and dy.
// Every load comes before row_sum2, every store after, from the registers.
// ITEMS <= 4: a thread keeps 2 * ITEMS vectors in registers (3 * ITEMS with ADD).
// With an activation, g is recomputed where dx is formed, except for float and
// double data, whose dy registers (of the statistics type) then hold g itself.
template <typename T, int VEC, int ITEMS, int MODE, int ACT, bool RMS, bool ADD>
__global__ void __launch_bounds__(512) row_backward_regs(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ dh, T* __restrict__ dx,
    const typename Acc<T>::type* __restrict__ weight, const typename Acc<T>::type* __restrict__ bias,
    const typename Acc<T>::type* __restrict__ mean, const typename Acc<T>::type* __restrict__ rstd, unsigned nrows,
    unsigned G, unsigned cg, unsigned S, unsigned C, unsigned M, int tpr_shift) {
    typedef typename Acc<T>::type A;
    typedef Vec<T, VEC> V;
    // Keep g = dy * act'(z) in the dy registers where that loses nothing.
    constexpr bool KEEP_G = ACT != ACT_NONE && SameType<T, A>::value;
    __shared__ A red[2][32];
    const unsigned tpr = 1u << tpr_shift;
    const unsigned lt = threadIdx.x & (tpr - 1);
    const unsigned row = blockIdx.x * (blockDim.x >> tpr_shift) + (threadIdx.x >> tpr_shift);
    const bool active = row < nrows;
    const RegRow<VEC, MODE> geo(active ? row : 0, G, cg, S, C, M);
    const T* __restrict__ xr = x + geo.base;
    const T* __restrict__ gr = dy + geo.base;

    V v[ITEMS], g[ITEMS];
    V d[ADD ? ITEMS : 1];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        const unsigned k = lt + u * tpr;
        if (active && k < M) {
            const unsigned o = geo.offset(k);
            v[u] = *reinterpret_cast<const V*>(xr + o);
            g[u] = *reinterpret_cast<const V*>(gr + o);
            if constexpr (ADD) d[u] = *reinterpret_cast<const V*>(dh + geo.base + o);
        }
    }
    const A mu = (active && !RMS) ? mean[row] : A(0);
    const A rs = active ? rstd[row] : A(0);
    // The vector's weights and biases (biases only with an activation).
    auto params = [&](unsigned c, A (&w)[VEC], A (&b)[VEC]) {
        if (MODE == 1) {
            const A wc = weight[c];
            const A bc = ACT != ACT_NONE ? bias[c] : A(0);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                w[j] = wc;
                b[j] = bc;
            }
        } else {
            load_params<A, VEC>(weight + c, w);
            if (ACT != ACT_NONE) {
                load_params<A, VEC>(bias + c, b);
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) b[j] = A(0);
            }
        }
    };
    A sa = A(0), sb = A(0);
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        const unsigned k = lt + u * tpr;
        if (active && k < M) {
            const unsigned c = geo.chan(k);
            if (MODE == 1 && ACT == ACT_NONE) {
                const A w = weight[c];
                A ga = A(0), gb = A(0);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A gj = to_acc(g[u].v[j]);
                    ga += gj;
                    gb += gj * (to_acc(v[u].v[j]) - mu);
                }
                sa += w * ga;
                sb += w * gb;
            } else {
                A w[VEC], b[VEC];
                params(c, w, b);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A xc = to_acc(v[u].v[j]) - mu;
                    A gj = to_acc(g[u].v[j]);
                    if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(xc, rs * w[j], b[j]));
                    if constexpr (KEEP_G) g[u].v[j] = gj;  // (T is A: exact)
                    const A wg = w[j] * gj;
                    sa += wg;
                    sb += wg * xc;
                }
            }
        }
    }
    row_sum2(sa, sb, red[0], red[1], tpr_shift);
    if (!active) return;  // no barrier follows
    const A len = A(M) * A(VEC);
    const A m1 = RMS ? A(0) : sa / len;
    const A m2 = sb * rs / len;
    T* __restrict__ dxr = dx + geo.base;
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
        const unsigned k = lt + u * tpr;
        if (k < M) {
            const unsigned c = geo.chan(k);
            A w[VEC], b[VEC];
            params(c, w, b);
            V o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const A xc = to_acc(v[u].v[j]) - mu;
                const A xhat = xc * rs;
                A gj = to_acc(g[u].v[j]);
                if (ACT != ACT_NONE && !KEEP_G) gj = act_grad<ACT>(gj, norm_z(xc, rs * w[j], b[j]));
                const A dxn = rs * (w[j] * gj - m1 - xhat * m2);
                if constexpr (ADD) {
                    o.v[j] = add_grad<T>(dxn, d[u].v[j]);
                } else {
                    o.v[j] = Cvt<T>::from(dxn);
                }
            }
            *reinterpret_cast<V*>(dxr + geo.offset(k)) = o;
        }
    }
}
