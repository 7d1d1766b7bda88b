// Per-sample kernels (LayerNorm, GroupNorm, InstanceNorm) for the rows that
// rows_regs.cu does not take (rows too long for registers, inputs that cannot
// use 16-byte vectors): a row is one
// (sample, group) = blockIdx.x * rows_per_block + threadIdx.x / tpr, handled
// by `tpr` threads (a multiple of 32). The row is staged in dynamic shared
// memory on its way in, so x (and dy) are read from device memory once.
// Each thread re-reads only the vectors it staged itself, so the staging
// needs no barrier of its own. Geometry: RowGeom in common.cuh.
#include "common.cuh"

using namespace cnorm;

// y = (x - mean) * rstd * weight[c] + bias[c] for the vector of a row at the walker.
template <typename T, int VEC, bool CL, typename A>
__device__ __forceinline__ Vec<T, VEC> normalize_vec(const Vec<T, VEC>& v, const RowGeom<CL, VEC>& geo,
                                                     const Walker& it, A mu, A rs, const A* __restrict__ weight,
                                                     const A* __restrict__ bias) {
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = geo.chan(it, j);
        o.v[j] = Cvt<T>::from((to_acc(v.v[j]) - mu) * (rs * weight[c]) + bias[c]);
    }
    return o;
}

// Statistics and normalization of whole rows, one read of x and one write of y:
// y = (x - mean) * rstd * weight[c] + bias[c].
template <typename T, int VEC, bool CL>
__global__ void row_forward(const T* __restrict__ x, T* __restrict__ y, const typename Acc<T>::type* __restrict__ weight,
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
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                v[u] = load_vec<T, VEC>(x, geo.addr(it));
                it.advance();
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                cache[k + u * tpr] = v[u];
                wf_add_vec(w, v[u]);
            }
        }
        for (; k < M; k += tpr) {
            const Vec<T, VEC> v = load_vec<T, VEC>(x, geo.addr(it));
            it.advance();
            cache[k] = v;
            wf_add_vec(w, v);
        }
    }
    const Welford<A> r = wf_group_reduce(w, scratch, tpr);
    if (!active) return;  // no barrier follows
    const A mu = r.mean;
    const A vr = r.m2 / r.n;
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
        store_vec<T, VEC>(y, geo.addr(it), normalize_vec(v, geo, it, mu, rs, weight, bias));
        it.advance();
    }
}

// Normalization with precomputed per-row statistics, for rows split over
// several blocks: blockIdx.x = row * nchunks + chunk, chunk of `chunk` vectors.
template <typename T, int VEC, bool CL>
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
        store_vec<T, VEC>(y, geo.addr(it), normalize_vec(v, geo, it, mu, rs, weight, bias));
        it.advance();
    }
}

// dx of whole rows with statistics depending on x:
// dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)).
// cache_mode: 2 stages x and dy in shared memory, 1 stages x only (dy is read
// again), 0 stages nothing.
template <typename T, int VEC, bool CL>
__global__ void row_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                             const typename Acc<T>::type* __restrict__ weight,
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
    const A mu = active ? mean[row] : A(0);
    const A rs = active ? rstd[row] : A(0);
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
                    const A wg = weight[geo.chan(at[u], j)] * to_acc(g[u].v[j]);
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
                const A wg = weight[geo.chan(it, j)] * to_acc(g.v[j]);
                s.a += wg;
                s.b += wg * (to_acc(v.v[j]) - mu);
            }
            it.advance();
        }
    }
    const Sum2<A> tot = sum2_group_reduce(s, scratch, tpr);
    if (!active) return;  // no barrier follows
    const A inv_m = A(1) / A((i64)cg * S);
    const A m1 = tot.a * inv_m;
    const A m2 = tot.b * rs * inv_m;
    Walker it;
    it.init(lt, geo.d, tpr);
#pragma unroll 2
    for (i64 k = lt; k < M; k += tpr) {
        const i64 o = geo.addr(it);
        const Vec<T, VEC> v = cache_mode > 0 ? xc[k] : load_vec<T, VEC>(x, o);
        const Vec<T, VEC> g = cache_mode > 1 ? gc[k] : load_vec<T, VEC>(dy, o);
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const int c = geo.chan(it, j);
            const A xhat = (to_acc(v.v[j]) - mu) * rs;
            out.v[j] = Cvt<T>::from(rs * (weight[c] * to_acc(g.v[j]) - m1 - xhat * m2));
        }
        store_vec<T, VEC>(dx, o, out);
        it.advance();
    }
}
