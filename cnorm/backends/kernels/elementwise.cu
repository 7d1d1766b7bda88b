// Per-channel elementwise kernels over the whole tensor, channels-first
// (CL = false, x is (N, C, S)) or channels-last (CL = true, x is (N, S, C)):
// the normalize-apply pass of BatchNorm, eval mode, and BatchNorm's dx (and
// eval mode's, with zero means). ACT: the activation (common.cuh).
#include "common.cuh"

using namespace cnorm;

// Grid-stride loop over the nvec vectors of x calling f(v, c), where c is the
// channel of the vector's first element (channels-first: every element of a
// vector shares it, as S % VEC == 0; channels-last: element j has c + j).
template <bool CL, int VEC, typename F>
__device__ __forceinline__ void for_each_vec(i64 nvec, i64 S, i64 C, F f) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= nvec) return;
    Walker it;
    if (CL) {
        it.init(v, C / VEC, step);
#pragma unroll 4
        for (; v < nvec; v += step) {
            f(v, (int)it.r * VEC);
            it.advance();
        }
    } else {
        it.init(v, S / VEC, step);  // it.q is the plane n * C + c
        i64 c = it.q % C;
        const i64 dqc = it.dq % C;
#pragma unroll 4
        for (; v < nvec; v += step) {
            f(v, (int)c);
            const i64 q0 = it.q;
            it.advance();
            c += dqc + (it.q - q0 - it.dq);
            if (c >= C) c -= C;
        }
    }
}

// y = act((x - m[c]) * k[c] + b[c]), with m taken as 0 when has_mean == 0.
template <typename T, int VEC, bool CL, int ACT>
__global__ void affine(const T* __restrict__ x, T* __restrict__ y, const typename Acc<T>::type* __restrict__ m,
                       const typename Acc<T>::type* __restrict__ k, const typename Acc<T>::type* __restrict__ b,
                       int has_mean, i64 nvec, i64 S, i64 C) {
    typedef typename Acc<T>::type A;
    for_each_vec<CL, VEC>(nvec, S, C, [&](i64 v, int c) {
        const Vec<T, VEC> in = load_vec<T, VEC>(x, v);
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const int cj = CL ? c + j : c;
            const A mj = has_mean ? m[cj] : A(0);
            out.v[j] = Cvt<T>::from(act_value<ACT>(norm_z(to_acc(in.v[j]) - mj, k[cj], b[cj])));
        }
        store_vec<T, VEC>(y, v, out);
    });
}

// BatchNorm dx = weight*rstd * (g - mdy - (x - mean)*rstd * mdx), per channel, with
// g = dy * act'(z), z = (x - mean) * (rstd*weight) + bias as affine formed it
// (bias is read only when ACT != ACT_NONE). Eval mode passes mdy = mdx = 0.
template <typename T, int VEC, bool CL, int ACT>
__global__ void bn_backward_apply(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                  const typename Acc<T>::type* __restrict__ mean,
                                  const typename Acc<T>::type* __restrict__ rstd,
                                  const typename Acc<T>::type* __restrict__ weight,
                                  const typename Acc<T>::type* __restrict__ bias,
                                  const typename Acc<T>::type* __restrict__ mdy,
                                  const typename Acc<T>::type* __restrict__ mdx, i64 nvec, i64 S, i64 C) {
    typedef typename Acc<T>::type A;
    for_each_vec<CL, VEC>(nvec, S, C, [&](i64 v, int c) {
        const Vec<T, VEC> g = load_vec<T, VEC>(dy, v);
        const Vec<T, VEC> in = load_vec<T, VEC>(x, v);
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const int cj = CL ? c + j : c;
            const A rs = rstd[cj];
            const A xc = to_acc(in.v[j]) - mean[cj];
            const A xhat = xc * rs;
            A gj = to_acc(g.v[j]);
            if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(xc, rs * weight[cj], bias[cj]));
            out.v[j] = Cvt<T>::from(weight[cj] * rs * (gj - mdy[cj] - xhat * mdx[cj]));
        }
        store_vec<T, VEC>(dx, v, out);
    });
}
