// Shared device code for cnorm's CUDA kernels: dtype traits, 16-byte vector
// access, Welford/Chan statistics, deterministic reductions and the index
// walker that maps a flat vector index of a segment to its address.
//
// Every reduction here combines values in a fixed order that depends only on
// the launch geometry (never on timing), so results are bit-identical run to
// run. The Python loader inlines this file into each .cu source, so that
// CuPy's kernel cache key covers it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cnorm {

typedef long long i64;

#define CNORM_FULL_MASK 0xffffffffu

// Accumulator (statistics) type: float for float/half/bfloat16, double for double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Cvt;
template <> struct Cvt<float> { __device__ __forceinline__ static float from(float v) { return v; } };
template <> struct Cvt<double> { __device__ __forceinline__ static double from(double v) { return v; } };
template <> struct Cvt<__half> { __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); } };
template <> struct Cvt<__nv_bfloat16> {
    __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Compile-time type equality (NVRTC has no <type_traits>).
template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

// ---------------------------------------------------------------- activations
// ACT, a template parameter of every kernel that writes a normalized value or
// differentiates through one: ACT_NONE, ACT_RELU or ACT_SILU (the Python
// launcher's codes 0, 1, 2). Forward stores act(z); backward uses
// g = dy * act'(z) in place of dy. z is always formed by norm_z, one fused
// multiply-add, so a backward that recomputes z from x and the saved
// statistics gets the forward's bits (no dependence on the compiler's choice
// to contract a*b + c).
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2 };

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// z = xc * k + b rounded once: xc the centred value (x - mean, or x for RMS and
// eval), k = rstd * weight (the cross-sample scale is that product too) or eval's scale.
template <typename A> __device__ __forceinline__ A norm_z(A xc, A k, A b) { return fma_acc(xc, k, b); }

// act(z): relu(z) = max(z, 0) with NaN kept (as NumPy's maximum and PyTorch),
// silu(z) = z * sigmoid(z) = z / (1 + exp(-z)).
template <int ACT, typename A> __device__ __forceinline__ A act_value(A z) {
    if (ACT == ACT_RELU) return (z > A(0) || z != z) ? z : A(0);
    if (ACT == ACT_SILU) return z / (A(1) + exp_acc(-z));
    return z;
}

// g * act'(z): relu' = [z > 0]; silu' = s * (1 + z * (1 - s)) with s = sigmoid(z).
template <int ACT, typename A> __device__ __forceinline__ A act_grad(A g, A z) {
    if (ACT == ACT_RELU) return g * (z > A(0) ? A(1) : A(0));
    if (ACT == ACT_SILU) {
        const A s = A(1) / (A(1) + exp_acc(-z));
        return g * (s * (A(1) + z * (A(1) - s)));
    }
    return g;
}

// VEC consecutive elements moved as one aligned access (16 bytes when VEC*sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* __restrict__ p, i64 i) {
    return reinterpret_cast<const Vec<T, VEC>*>(p)[i];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, i64 i, const Vec<T, VEC>& v) {
    reinterpret_cast<Vec<T, VEC>*>(p)[i] = v;
}

// ---------------------------------------------------------------- residual add
// h = x + r for the fused residual add: summed in the statistics type (float
// for half data, as PyTorch's x + residual), rounded once to T.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> add_vec(const Vec<T, VEC>& x, const Vec<T, VEC>& r) {
    Vec<T, VEC> h;
#pragma unroll
    for (int j = 0; j < VEC; ++j) h.v[j] = Cvt<T>::from(to_acc(x.v[j]) + to_acc(r.v[j]));
    return h;
}

// The fused add over four vectors already loaded from x (at offsets o): v = x + r,
// stored to h as it is (h may be x or r itself: each element is read first).
template <typename T, int VEC, typename I>
__device__ __forceinline__ void add_residual4(Vec<T, VEC> (&v)[4], const T* __restrict__ r, T* __restrict__ h,
                                              const I (&o)[4]) {
    Vec<T, VEC> rv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) rv[u] = load_vec<T, VEC>(r, o[u]);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        v[u] = add_vec(v[u], rv[u]);
        store_vec<T, VEC>(h, o[u], v[u]);
    }
}

// dx = dh + dxn for the fused residual add's backward: the norm's dx rounded to
// T first, then added to dh in the statistics type and rounded again (what the
// two separate steps give).
template <typename T, typename A> __device__ __forceinline__ T add_grad(A dxn, T dh) {
    return Cvt<T>::from(to_acc(Cvt<T>::from(dxn)) + to_acc(dh));
}

// ---------------------------------------------------------------- Welford/Chan
template <typename A> struct Welford {
    A n, mean, m2;
};

template <typename A> __device__ __forceinline__ Welford<A> wf_empty() {
    Welford<A> w;
    w.n = A(0);
    w.mean = A(0);
    w.m2 = A(0);
    return w;
}

// Chan's merge of (bn, bmean, bm2) into a. An empty side leaves the other
// unchanged exactly (no 0 * inf when a mean is huge).
template <typename A> __device__ __forceinline__ void wf_merge(Welford<A>& a, A bn, A bmean, A bm2) {
    if (bn == A(0)) return;
    if (a.n == A(0)) {
        a.n = bn;
        a.mean = bmean;
        a.m2 = bm2;
        return;
    }
    const A n = a.n + bn;
    const A delta = bmean - a.mean;
    const A wb = bn / n;
    a.mean += delta * wb;
    a.m2 += bm2 + delta * (delta * (a.n * wb));
    a.n = n;
}

template <typename A> __device__ __forceinline__ void wf_merge(Welford<A>& a, const Welford<A>& b) {
    wf_merge(a, b.n, b.mean, b.m2);
}

// Add VEC values: their own mean and M2 first, then one Chan merge.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void wf_add_vec(Welford<A>& a, const Vec<T, VEC>& v) {
    A s = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += to_acc(v.v[j]);
    const A m = s * (A(1) / A(VEC));
    A q = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const A d = to_acc(v.v[j]) - m;
        q += d * d;
    }
    wf_merge(a, A(VEC), m, q);
}

// Tree over the warp with shfl_down: lane 0 ends with the warp's statistics.
template <typename A> __device__ __forceinline__ void wf_warp_reduce(Welford<A>& w) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const A n = __shfl_down_sync(CNORM_FULL_MASK, w.n, off);
        const A m = __shfl_down_sync(CNORM_FULL_MASK, w.mean, off);
        const A q = __shfl_down_sync(CNORM_FULL_MASK, w.m2, off);
        wf_merge(w, n, m, q);
    }
}

// Reduce over each group of `tpr` consecutive threads (tpr a multiple of 32
// dividing blockDim.x): warp trees, then each thread merges its group's warp
// results in warp order. Every thread of the group returns the same result.
// Must be called by every thread of the block. `scratch` holds blockDim.x/32.
template <typename A>
__device__ __forceinline__ Welford<A> wf_group_reduce(Welford<A> w, Welford<A>* scratch, int tpr) {
    wf_warp_reduce(w);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = w;
    __syncthreads();
    const int nw = tpr >> 5;
    const int first = (threadIdx.x / tpr) * nw;
    Welford<A> r = scratch[first];
    for (int i = 1; i < nw; ++i) wf_merge(r, scratch[first + i]);
    __syncthreads();
    return r;
}

// The same for a pair of plain sums.
template <typename A> struct Sum2 {
    A a, b;
};

template <typename A>
__device__ __forceinline__ Sum2<A> sum2_group_reduce(Sum2<A> s, Sum2<A>* scratch, int tpr) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s.a += __shfl_down_sync(CNORM_FULL_MASK, s.a, off);
        s.b += __shfl_down_sync(CNORM_FULL_MASK, s.b, off);
    }
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = s;
    __syncthreads();
    const int nw = tpr >> 5;
    const int first = (threadIdx.x / tpr) * nw;
    Sum2<A> r = scratch[first];
    for (int i = 1; i < nw; ++i) {
        r.a += scratch[first + i].a;
        r.b += scratch[first + i].b;
    }
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------- index walker
// Walks k = k0, k0 + step, ... keeping (q, r) = divmod(k, d) without a
// division per step. A segment's vector k lives at base + q * qstride + r.
struct Walker {
    i64 q, r, d, dq, dr;

    __device__ __forceinline__ void init(i64 k0, i64 d_, i64 step) {
        d = d_;
        q = k0 / d;
        r = k0 - q * d;
        dq = step / d;
        dr = step - dq * d;
    }

    __device__ __forceinline__ void advance() {
        r += dr;
        q += dq;
        if (r >= d) {
            r -= d;
            q += 1;
        }
    }
};

// Per-sample row geometry for row (n, g) = (row / G, row % G), in vectors.
//   channels-first (N, C, S): the row is cg runs of SV = S/VEC contiguous
//     vectors; vector (q, r) is at row*cg*SV + q*SV + r, channel g*cg + q.
//   channels-last (N, S, C): the row is S runs of cgv = cg/VEC vectors with
//     run stride CV = C/VEC; vector (q, r) is at n*S*CV + g*cgv + q*CV + r,
//     channels g*cg + r*VEC + [0, VEC).
template <bool CL, int VEC> struct RowGeom {
    i64 base, qstride, d;
    int c0;  // first channel of the group

    __device__ __forceinline__ RowGeom(i64 row, int G, int cg, i64 S, i64 C) {
        const i64 n = row / G;
        const int g = (int)(row - n * G);
        c0 = g * cg;
        if (CL) {
            d = cg / VEC;
            qstride = C / VEC;
            base = n * S * qstride + g * d;
        } else {
            d = S / VEC;
            qstride = d;
            base = row * (i64)cg * d;
        }
    }

    // Vectors in the row.
    __device__ __forceinline__ i64 length(int cg, i64 S) const { return (i64)cg * S / VEC; }

    __device__ __forceinline__ i64 addr(const Walker& w) const { return base + w.q * qstride + w.r; }

    // Channel of element j of the vector at the walker.
    __device__ __forceinline__ int chan(const Walker& w, int j) const {
        return CL ? c0 + (int)w.r * VEC + j : c0 + (int)w.q;
    }
};

}  // namespace cnorm
