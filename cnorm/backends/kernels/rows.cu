// Per-sample kernels (LayerNorm, GroupNorm, InstanceNorm, RMSNorm) for the rows
// that rows_regs.cu does not take (rows too long for registers, inputs that
// cannot use 16-byte vectors): a row is one
// (sample, group) = blockIdx.x * rows_per_block + threadIdx.x / tpr, handled
// by `tpr` threads (a multiple of 32). The row is staged in dynamic shared
// memory on its way in, so x (and dy) are read from device memory once.
// Each thread re-reads only the vectors it staged itself, so the staging
// needs no barrier of its own. Geometry: RowGeom in common.cuh.
//
// Variants (template parameters): ACT the activation (common.cuh); RMS the
// mean-square statistics of RMSNorm (no centring: mean 0, var = Σx²/m, no
// mean term in backward); ADD the fused residual add (forward: the row is
// h = x + r, stored to h; backward: dx = dh + the norm's dx). Pointers a
// variant does not use (r, h, dh, bias) are not accessed.
#include "common.cuh"

using namespace cnorm;

// y = act((x - mean) * (rstd * weight[c]) + bias[c]) for the vector of a row at the walker.
template <int ACT, typename T, int VEC, bool CL, typename A>
__device__ __forceinline__ Vec<T, VEC> normalize_vec(const Vec<T, VEC>& v, const RowGeom<CL, VEC>& geo,
                                                     const Walker& it, A mu, A rs, const A* __restrict__ weight,
                                                     const A* __restrict__ bias) {
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = geo.chan(it, j);
        o.v[j] = Cvt<T>::from(act_value<ACT>(norm_z(to_acc(v.v[j]) - mu, rs * weight[c], bias[c])));
    }
    return o;
}

// Statistics and normalization of whole rows, one read of x (and r) and one
// write of y (and h): y = act((x - mean) * rstd * weight[c] + bias[c]). With
// ADD the row is h = x + r (add_vec), stored to h as it is staged; each thread
// loads x and r at a vector before it stores h there, so h may be x or r.
template <typename T, int VEC, bool CL, int ACT, bool RMS, bool ADD>
__global__ void row_forward(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ h,
                            T* __restrict__ y, const typename Acc<T>::type* __restrict__ weight,
                            const typename Acc<T>::type* __restrict__ bias, i64 nrows, int G, int cg, i64 S, i64 C,
                            int tpr, typename Acc<T>::type eps, typename Acc<T>::type* __restrict__ mean,
                            typename Acc<T>::type* __restrict__ var, typename Acc<T>::type* __restrict__ rstd) {
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ Welford<A> scratch[32];
    const int lr = threadIdx.x / tpr, lt = threadIdx.x - lr * tpr;
    const i64 row = (i64)blockIdx.x * (blockDim.x / tpr) + lr;
    const bool active = row < nrows;
    const i64 M = (i64)cg * S / VEC;
    Vec<T, VEC>* cache = reinterpret_cast<Vec<T, VEC>*>(smem_raw) + lr * M;
    const RowGeom<CL, VEC> geo(active ? row : 0, G, cg, S, C);
    Welford<A> w = wf_empty<A>();
    if (active) {
        Walker it;
        it.init(lt, geo.d, tpr);
        i64 k = lt;
        for (; k + 3 * tpr < M; k += 4 * tpr) {
            Vec<T, VEC> v[4];
            i64 o[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                o[u] = geo.addr(it);
                v[u] = load_vec<T, VEC>(x, o[u]);
                it.advance();
            }
            if constexpr (ADD) add_residual4<T, VEC>(v, r, h, o);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                cache[k + u * tpr] = v[u];
                wf_add_vec(w, v[u]);
            }
        }
        for (; k < M; k += tpr) {
            const i64 o = geo.addr(it);
            Vec<T, VEC> v = load_vec<T, VEC>(x, o);
            if constexpr (ADD) {
                v = add_vec(v, load_vec<T, VEC>(r, o));
                store_vec<T, VEC>(h, o, v);
            }
            it.advance();
            cache[k] = v;
            wf_add_vec(w, v);
        }
    }
    const Welford<A> st = wf_group_reduce(w, scratch, tpr);
    if (!active) return;  // no barrier follows
    // RMS: the mean square Σx²/m = m2/m + mean² (Welford's statistics; no centring).
    const A mu = RMS ? A(0) : st.mean;
    const A vr = RMS ? st.m2 / st.n + st.mean * st.mean : st.m2 / st.n;
    const A rs = A(1) / sqrt(vr + eps);
    if (lt == 0) {
        mean[row] = mu;
        var[row] = vr;
        rstd[row] = rs;
    }
    Walker it;
    it.init(lt, geo.d, tpr);
#pragma unroll 4
    for (i64 k = lt; k < M; k += tpr) {
        const Vec<T, VEC> v = cache[k];
        store_vec<T, VEC>(y, geo.addr(it), normalize_vec<ACT>(v, geo, it, mu, rs, weight, bias));
        it.advance();
    }
}

// Normalization with precomputed per-row statistics, for rows split over
// several blocks: blockIdx.x = row * nchunks + chunk, chunk of `chunk` vectors.
// (RMSNorm's rows come with mean 0 from stats_finalize; the fused add's x is h.)
template <typename T, int VEC, bool CL, int ACT>
__global__ void row_apply(const T* __restrict__ x, T* __restrict__ y, const typename Acc<T>::type* __restrict__ weight,
                          const typename Acc<T>::type* __restrict__ bias, const typename Acc<T>::type* __restrict__ mean,
                          const typename Acc<T>::type* __restrict__ rstd, int G, int cg, i64 S, i64 C, i64 chunk,
                          int nchunks) {
    typedef typename Acc<T>::type A;
    const i64 row = blockIdx.x / nchunks;
    const i64 ch = blockIdx.x - row * nchunks;
    const RowGeom<CL, VEC> geo(row, G, cg, S, C);
    const i64 k1 = min((ch + 1) * chunk, (i64)cg * S / VEC);
    const A mu = mean[row], rs = rstd[row];
    i64 k = ch * chunk + threadIdx.x;
    Walker it;
    it.init(k, geo.d, blockDim.x);
#pragma unroll 4
    for (; k < k1; k += blockDim.x) {
        const Vec<T, VEC> v = load_vec<T, VEC>(x, geo.addr(it));
        store_vec<T, VEC>(y, geo.addr(it), normalize_vec<ACT>(v, geo, it, mu, rs, weight, bias));
        it.advance();
    }
}

// dx of whole rows with statistics depending on x:
// dx = rstd * (w*g - mean(w*g) - xhat * mean(w*g*xhat)), g = dy * act'(z) with
// z recomputed as the forward formed it; RMS: xhat = x * rstd and no mean(w*g)
// term; ADD: dx = dh + that (add_grad), dh read where dx is written.
// cache_mode: 2 stages x and dy in shared memory, 1 stages x only (dy is read
// again), 0 stages nothing.
template <typename T, int VEC, bool CL, int ACT, bool RMS, bool ADD>
__global__ void row_backward(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ dh,
                             T* __restrict__ dx, const typename Acc<T>::type* __restrict__ weight,
                             const typename Acc<T>::type* __restrict__ bias,
                             const typename Acc<T>::type* __restrict__ mean,
                             const typename Acc<T>::type* __restrict__ rstd, i64 nrows, int G, int cg, i64 S, i64 C,
                             int tpr, int cache_mode) {
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ Sum2<A> scratch[32];
    const int lr = threadIdx.x / tpr, lt = threadIdx.x - lr * tpr;
    const i64 row = (i64)blockIdx.x * (blockDim.x / tpr) + lr;
    const bool active = row < nrows;
    const i64 M = (i64)cg * S / VEC;
    Vec<T, VEC>* xc = reinterpret_cast<Vec<T, VEC>*>(smem_raw) + lr * M * (cache_mode > 1 ? 2 : 1);
    Vec<T, VEC>* gc = xc + M;
    const RowGeom<CL, VEC> geo(active ? row : 0, G, cg, S, C);
    const A mu = (active && !RMS) ? mean[row] : A(0);
    const A rs = active ? rstd[row] : A(0);
    // w * dy * act'(z) for element j of a vector at walker `at`.
    auto wgrad = [&](const Vec<T, VEC>& v, const Vec<T, VEC>& g, const Walker& at, int j) -> A {
        const int c = geo.chan(at, j);
        const A wc = weight[c];
        A gj = to_acc(g.v[j]);
        if (ACT != ACT_NONE) gj = act_grad<ACT>(gj, norm_z(to_acc(v.v[j]) - mu, rs * wc, bias[c]));
        return wc * gj;
    };
    Sum2<A> s;
    s.a = A(0);
    s.b = A(0);
    if (active) {
        Walker it;
        it.init(lt, geo.d, tpr);
        i64 k = lt;
        for (; k + tpr < M; k += 2 * tpr) {
            Vec<T, VEC> v[2], g[2];
            Walker at[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                at[u] = it;
                v[u] = load_vec<T, VEC>(x, geo.addr(it));
                g[u] = load_vec<T, VEC>(dy, geo.addr(it));
                it.advance();
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (cache_mode > 0) xc[k + u * tpr] = v[u];
                if (cache_mode > 1) gc[k + u * tpr] = g[u];
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A wg = wgrad(v[u], g[u], at[u], j);
                    s.a += wg;
                    s.b += wg * (to_acc(v[u].v[j]) - mu);
                }
            }
        }
        for (; k < M; k += tpr) {
            const Vec<T, VEC> v = load_vec<T, VEC>(x, geo.addr(it));
            const Vec<T, VEC> g = load_vec<T, VEC>(dy, geo.addr(it));
            if (cache_mode > 0) xc[k] = v;
            if (cache_mode > 1) gc[k] = g;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const A wg = wgrad(v, g, it, j);
                s.a += wg;
                s.b += wg * (to_acc(v.v[j]) - mu);
            }
            it.advance();
        }
    }
    const Sum2<A> tot = sum2_group_reduce(s, scratch, tpr);
    if (!active) return;  // no barrier follows
    const A inv_m = A(1) / A((i64)cg * S);
    const A m1 = RMS ? A(0) : tot.a * inv_m;
    const A m2 = tot.b * rs * inv_m;
    Walker it;
    it.init(lt, geo.d, tpr);
#pragma unroll 2
    for (i64 k = lt; k < M; k += tpr) {
        const i64 o = geo.addr(it);
        const Vec<T, VEC> v = cache_mode > 0 ? xc[k] : load_vec<T, VEC>(x, o);
        const Vec<T, VEC> g = cache_mode > 1 ? gc[k] : load_vec<T, VEC>(dy, o);
        Vec<T, VEC> out;
        if constexpr (ADD) {
            const Vec<T, VEC> d = load_vec<T, VEC>(dh, o);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const A xhat = (to_acc(v.v[j]) - mu) * rs;
                out.v[j] = add_grad<T>(rs * (wgrad(v, g, it, j) - m1 - xhat * m2), d.v[j]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const A xhat = (to_acc(v.v[j]) - mu) * rs;
                out.v[j] = Cvt<T>::from(rs * (wgrad(v, g, it, j) - m1 - xhat * m2));
            }
        }
        store_vec<T, VEC>(dx, o, out);
        it.advance();
    }
}
