/* The elementwise sweeps (float32 and half data, float arithmetic): normalize,
   affine, dx, for channels-first runs (scalar constants), channels-last rows
   (per-channel constants) and LayerNorm rows (per-element weight).

   Every sweep is cn_sweep over 32-value steps: the head before the output's
   first line boundary and the tail go through the same vector arithmetic with
   masked loads and stores, so where a value falls never changes it. When
   cn_nt_store is set (outputs much larger than the caches) whole lines are
   written with streaming stores: the output then costs one write to memory
   instead of a read-for-ownership plus a write; whoever sets it calls
   cn_sfence() on every thread that stored, before the output is read. */
#ifndef CN_ELEMENTWISE_HPP
#define CN_ELEMENTWISE_HPP
#include <atomic>
#include "vec/vec.hpp"

namespace {

/* Set per call by the Python wrappers. Concurrent calls from several Python
   threads may overwrite each other's value: that is harmless because it is
   only a hint (both store paths write the same values) and every parallel
   region fences its own thread's streaming stores unconditionally before the
   join. It is atomic (relaxed: a plain load and store on x86) so that the
   sharing is not a data race, which C++ would leave undefined. */
std::atomic<int> cn_nt_store{0};

CN_INLINE void cn_set_nt_store(int on) { cn_nt_store.store(on, std::memory_order_relaxed); }
CN_INLINE bool cn_nt_hint() { return cn_nt_store.load(std::memory_order_relaxed) != 0; }

/* Runs shorter than this keep ordinary stores: a head to the line boundary
   would cost more than streaming saves. */
constexpr ptrdiff_t CN_NT_MIN = 256;

/* elements of T before y reaches a 64-byte boundary (all of them if y is not
   even aligned to T) */
template <class T>
CN_INLINE ptrdiff_t cn_head(const T* y, ptrdiff_t n) {
    uintptr_t a = (uintptr_t)y;
    ptrdiff_t h = (a % sizeof(T)) ? n : (ptrdiff_t)(((64 - a % 64) % 64) / sizeof(T));
    return h < n ? h : n;
}

/* Calls f(i, m, nt) over [0, n) writing y: m == 32 in the body (nt true when
   streaming: y + i is then line-aligned), 0 < m < 32 for the head and the
   tail (nt false). */
template <class T, class F>
CN_INLINE void cn_sweep(const T* y, ptrdiff_t n, F f, bool stream = true) {
    const bool nt = stream && cn_nt_hint() && n >= CN_NT_MIN;
    ptrdiff_t i = 0, h = nt ? cn_head(y, n) : 0;
    while (i < h) {
        ptrdiff_t m = h - i < 32 ? h - i : 32;
        f(i, m, false);
        i += m;
    }
    if (nt)
        for (; i + 32 <= n; i += 32) f(i, (ptrdiff_t)32, true);
    else
        for (; i + 32 <= n; i += 32) f(i, (ptrdiff_t)32, false);
    if (i < n) f(i, n - i, false);
}

/* ---- activations: y = act(z) in the sweep that stores y, before rounding ---- */
enum { CN_ACT_NONE = 0, CN_ACT_RELU = 1, CN_ACT_SILU = 2 };

/* relu(z) = max(z, 0) (NaN stays NaN); silu(z) = z·s with s = sigmoid(z),
   computed from e = e^-|z| (never overflows): s = 1 / (1 + e) for z >= 0 and
   e / (1 + e) for z < 0, so silu = (z or z·e) / (1 + e) is accurate to a few
   ulps over the whole range (-100 gives -3.7e-42, not -0); silu(-inf) is NaN
   (z·sigmoid(z) = -inf·0), as in PyTorch and the NumPy reference. */
template <int A>
CN_INLINE VF cn_act(VF z) {
    if (A == CN_ACT_RELU) return vmax(vzero(), z);
    if (A == CN_ACT_SILU) {
        VF e = vexp_nabs(z);   /* e^-|z| (NaN stays NaN) */
        return vmul_neg(z, e) / (vset(1.0f) + e);   /* (z < 0 ? z·e : z) / (1 + e) */
    }
    return z;
}
/* g = dy·act'(z): relu' = [z > 0] (exactly 0 elsewhere, NaN included);
   silu' = s·(1 + z·(1 - s)), with s and 1 - s each e/(1 + e) or 1/(1 + e)
   (e = e^-|z|): no cancellation in 1 - s where s is near 1 */
template <int A>
CN_INLINE VF cn_act_grad(VF dy, VF z) {
    if (A == CN_ACT_RELU) return vsel_gt(z, vzero(), dy, vzero());
    const VF one = vset(1.0f);
    VF e = vexp_nabs(z);
    VF d = one / (one + e), ed = e * d;
    VF s = vsel_gt(vzero(), z, ed, d), t = vsel_gt(vzero(), z, d, ed);   /* s, 1 - s */
    return dy * (s * vfma(z, t, one));
}
/* SiLU's sweeps do about 25 vector operations per 16 values: with that much
   work between loads the hardware prefetchers fell behind memory (eval
   affine, bfloat16 from memory, one thread: 12.3 cycles per 16 values plain,
   29.4 with SiLU, of which 10 in cache; 14.2 with this), so the activations'
   sweeps prefetch their inputs CN_ACT_PF bytes ahead (a hint: no value
   depends on it); relu's backward sweep gained as much. */
constexpr ptrdiff_t CN_ACT_PF = 1024;
template <int A, class T>
CN_INLINE void cn_act_pf(const T* p) {
    if (A == CN_ACT_NONE) return;
    for (int o = 0; o < 32 * (int)sizeof(T); o += 64) cn_prefetch_line_l1((const char*)p + CN_ACT_PF + o);
}

/* Calls F<A>(args...) with the activation code as a compile-time constant:
   each sweep is compiled once per activation and the test stays outside its
   loop (act 0 runs exactly the sweep without activation). */
#define CN_ACT_SWITCH(act, F, ...)                                     \
    do {                                                               \
        if ((act) == CN_ACT_RELU) F<CN_ACT_RELU>(__VA_ARGS__);         \
        else if ((act) == CN_ACT_SILU) F<CN_ACT_SILU>(__VA_ARGS__);    \
        else F<CN_ACT_NONE>(__VA_ARGS__);                              \
    } while (0)
/* The forward sweeps' entry points: the plain sweep where it was (the
   caller inlines it as before), the activations behind one call. Inlining
   all three variants into every caller cost short LayerNorm rows 2-6% in
   A/B (the row loop grew; a call and a switch per row did too). */
#define CN_ACT_ENTRY(F, params, ...)                                                  \
    template <class T>                                                               \
    CN_NOINLINE void F##_act params {                                                \
        if (act == CN_ACT_RELU) F##_a<CN_ACT_RELU>(__VA_ARGS__);                     \
        else F##_a<CN_ACT_SILU>(__VA_ARGS__);                                        \
    }                                                                                \
    template <class T>                                                               \
    CN_INLINE void F params {                                                        \
        if (act == CN_ACT_NONE) F##_a<CN_ACT_NONE>(__VA_ARGS__);                     \
        else F##_act(__VA_ARGS__, act);                                              \
    }

/* y = act((x - mh) a + b). pf (activations only; may be null): n values the
   caller needs next, brought toward L2 a line or two per 32 values swept -
   GroupNorm's next group while an in-cache group is normalized, so memory
   keeps streaming all through SiLU's arithmetic. In one burst per channel,
   as the plain group sweep issues it, the prefetches stalled the core:
   GroupNorm+SiLU (16, 256, 32, 32) float32 forward at avx2 took 1.34-1.43x
   the plain norm, 1.24-1.29x with the burst split in four, 1.13-1.16x
   spread over the sweep. (The same spread during the backward's dx sweep,
   for the next group's dy and x, made that backward 26% slower.) */
template <int A, class T>
inline void cn_norm_run_a(const T* x, T* y, ptrdiff_t n, float mh, float a, float b, const T* pf) {
    const VF vm = vset(mh), va = vset(a), vb = vset(b);
    cn_sweep(y, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF u0, u1;
        cn_act_pf<A>(x + i);
        if (A != CN_ACT_NONE && pf)
            for (int o = 0; o < 32 * (int)sizeof(T); o += 64) cn_prefetch_line_l2((const char*)(pf + i) + o);
        vload2_n(x + i, m, u0, u1);
        vstore2_n(y + i, cn_act<A>(vfma(u0 - vm, va, vb)), cn_act<A>(vfma(u1 - vm, va, vb)), m, nt);
    });
}
CN_ACT_ENTRY(cn_norm_run, (const T* x, T* y, ptrdiff_t n, float mh, float a, float b, const T* pf, int act), x, y, n,
             mh, a, b, pf)

/* y = act(x a + b) */
template <int A, class T>
inline void cn_scale_run_a(const T* x, T* y, ptrdiff_t n, float a, float b) {
    const VF va = vset(a), vb = vset(b);
    cn_sweep(y, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF u0, u1;
        cn_act_pf<A>(x + i);
        vload2_n(x + i, m, u0, u1);
        vstore2_n(y + i, cn_act<A>(vfma(u0, va, vb)), cn_act<A>(vfma(u1, va, vb)), m, nt);
    });
}
CN_ACT_ENTRY(cn_scale_run, (const T* x, T* y, ptrdiff_t n, float a, float b, int act), x, y, n, a, b)

/* dx = g ka + ((x - mh) kb + kc) */
template <class T>
inline void cn_dx_run(const T* g, const T* x, T* dx, ptrdiff_t n, float ka, float mh, float kb, float kc) {
    const VF vka = vset(ka), vm = vset(mh), vkb = vset(kb), vkc = vset(kc);
    cn_sweep(dx, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF g0, g1, u0, u1;
        vload2_n(g + i, m, g0, g1);
        vload2_n(x + i, m, u0, u1);
        vstore2_n(dx + i, vfma(g0, vka, vfma(u0 - vm, vkb, vkc)), vfma(g1, vka, vfma(u1 - vm, vkb, vkc)), m, nt);
    });
}

/* channels-last row: y[c] = act(x[c] a[c] + b[c]) (a, b: n floats) */
template <int A, class T>
inline void cn_row_affine_a(const T* x, T* y, ptrdiff_t n, const float* a, const float* b) {
    cn_sweep(y, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        cn_act_pf<A>(x + i);
        VF v0 = vfma(vload_n(x + i, m), vload_n(a + i, m), vload_n(b + i, m));
        VF v1 = vfma(vload_n(x + i + 16, m - 16), vload_n(a + i + 16, m - 16), vload_n(b + i + 16, m - 16));
        vstore_pair_n(y + i, cn_act<A>(v0), cn_act<A>(v1), m, nt);
    });
}
CN_ACT_ENTRY(cn_row_affine, (const T* x, T* y, ptrdiff_t n, const float* a, const float* b, int act), x, y, n, a, b)

/* LayerNorm row: y[i] = act(((x[i] - mh) rf - ml rf) w[i] + b[i]), two FMAs */
template <int A, class T>
inline void cn_ln_fwd_a(const T* x, T* y, ptrdiff_t n, float mh, float ml, float rf, const float* w, const float* b) {
    const VF vm = vset(mh), vr = vset(rf), vl = vset(-ml * rf);
    cn_sweep(y, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        cn_act_pf<A>(x + i);
        VF v0 = vfma(vfma(vload_n(x + i, m) - vm, vr, vl), vload_n(w + i, m), vload_n(b + i, m));
        VF v1 = vfma(vfma(vload_n(x + i + 16, m - 16) - vm, vr, vl), vload_n(w + i + 16, m - 16),
                     vload_n(b + i + 16, m - 16));
        vstore_pair_n(y + i, cn_act<A>(v0), cn_act<A>(v1), m, nt);
    });
}
CN_ACT_ENTRY(cn_ln_fwd, (const T* x, T* y, ptrdiff_t n, float mh, float ml, float rf, const float* w, const float* b,
                         int act), x, y, n, mh, ml, rf, w, b)

/* LayerNorm row: dx[i] = (w[i] g[i]) rf + (((x[i] - mh) - ml) kb + kc) */
template <class T>
inline void cn_ln_dx(const T* g, const T* x, T* dx, ptrdiff_t n, const float* w, float rf, float mh, float ml,
                     float kb, float kc) {
    const VF vr = vset(rf), vm = vset(mh), vl = vset(ml), vkb = vset(kb), vkc = vset(kc);
    cn_sweep(dx, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF v[2];
        for (int h = 0; h < 2; h++) {
            ptrdiff_t o = i + 16 * h, mh2 = m - 16 * h;
            v[h] = vfma(vload_n(w + o, mh2) * vload_n(g + o, mh2), vr, vfma((vload_n(x + o, mh2) - vm) - vl, vkb, vkc));
        }
        vstore_pair_n(dx + i, v[0], v[1], m, nt);
    });
}

/* Channels-last spans: n consecutive values starting at channel 0 of rows of
   C, normalized (or dx) as one stream - no call per row, whole lines for
   streaming stores whatever C is. The constants are "extended":
   k[i] = k0[i % C] for i < C + 16, so the 16 channels of any vector are one
   unaligned load. */
CN_INLINE ptrdiff_t cn_wrap(ptrdiff_t c, ptrdiff_t C) {
    while (c >= C) c -= C;
    return c;
}
template <int A, class T>
inline void cn_cl_norm_span_a(const T* x, T* y, ptrdiff_t n, ptrdiff_t C, const float* mh, const float* a,
                              const float* b) {
    ptrdiff_t c = 0;
    cn_sweep(y, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        ptrdiff_t c1 = cn_wrap(c + 16, C);
        cn_act_pf<A>(x + i);
        VF v0 = vfma(vload_n(x + i, m) - vload(mh + c), vload(a + c), vload(b + c));
        VF v1 = vfma(vload_n(x + i + 16, m - 16) - vload(mh + c1), vload(a + c1), vload(b + c1));
        vstore_pair_n(y + i, cn_act<A>(v0), cn_act<A>(v1), m, nt);
        c = cn_wrap(c + m, C);
    });
}
CN_ACT_ENTRY(cn_cl_norm_span, (const T* x, T* y, ptrdiff_t n, ptrdiff_t C, const float* mh, const float* a,
                               const float* b, int act), x, y, n, C, mh, a, b)
template <class T>
inline void cn_cl_dx_span(const T* g, const T* x, T* dx, ptrdiff_t n, ptrdiff_t C, const float* ka, const float* mh,
                          const float* kb, const float* kc) {
    ptrdiff_t c = 0;
    cn_sweep(dx, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF v[2];
        ptrdiff_t ch = c;
        for (int h = 0; h < 2; h++) {
            ptrdiff_t o = i + 16 * h, mh2 = m - 16 * h;
            v[h] = vfma(vload_n(g + o, mh2), vload(ka + ch),
                        vfma(vload_n(x + o, mh2) - vload(mh + ch), vload(kb + ch), vload(kc + ch)));
            ch = cn_wrap(ch + 16, C);
        }
        vstore_pair_n(dx + i, v[0], v[1], m, nt);
        c = cn_wrap(c + m, C);
    });
}

/* h = x + r, added in float and rounded to T (PyTorch's x + residual for
   half data), with ordinary stores: the fused add-and-norm reads h back
   from the cache at once. h may be x or r itself (each value is read before
   it is written). */
template <class T>
inline void cn_add_run(const T* x, const T* r, T* h, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i += 32) {
        const ptrdiff_t m = n - i < 32 ? n - i : 32;
        VF a0, a1, b0, b1;
        vload2_n(x + i, m, a0, a1);
        vload2_n(r + i, m, b0, b1);
        vstore2_n(h + i, a0 + b0, a1 + b1, m, false);
    }
}

/* v rounded to T and back: what a T array holding v reads as */
template <class T>
CN_INLINE VF vround_as(VF v) {
    T t[16];
    vstore(t, v, false);
    return vload(t);
}
template <>
CN_INLINE VF vround_as<float>(VF v) { return v; }

/* ---- g = dy·act'(z), z recomputed from x with the forward's arithmetic ----
   Each is the z of one forward sweep, operation for operation, so that relu's
   mask agrees with the forward's y > 0 bit for bit: cn_act_grad_run is
   cn_norm_run's (m = 0: cn_scale_run's, as x - 0 is x), cn_act_grad_span
   cn_cl_norm_span's (m = 0: cn_row_affine's), cn_act_grad_ln cn_ln_fwd's.
   g may be dy itself (each value is read before it is written there). */
template <int A, class T>
inline void cn_act_grad_run_a(const T* dy, const T* x, T* g, ptrdiff_t n, float mh, float a, float b, bool stream) {
    const VF vm = vset(mh), va = vset(a), vb = vset(b);
    cn_sweep(g, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        VF d0, d1, u0, u1;
        cn_act_pf<A>(dy + i);
        cn_act_pf<A>(x + i);
        vload2_n(x + i, m, u0, u1);
        if (A == CN_ACT_RELU) {   /* dy or 0: a masked copy, no rounding */
            vrelu_grad2_n(g + i, dy + i, vfma(u0 - vm, va, vb), vfma(u1 - vm, va, vb), m, nt);
            return;
        }
        vload2_n(dy + i, m, d0, d1);
        vstore2_n(g + i, cn_act_grad<A>(d0, vfma(u0 - vm, va, vb)), cn_act_grad<A>(d1, vfma(u1 - vm, va, vb)), m, nt);
    }, stream);
}
/* stream: 0 for scratch that the next sweep reads from cache (ordinary stores
   whatever the call's streaming hint) */
template <class T>
inline void cn_act_grad_run(const T* dy, const T* x, T* g, ptrdiff_t n, float mh, float a, float b, int act,
                            int stream) {
    CN_ACT_SWITCH(act, cn_act_grad_run_a, dy, x, g, n, mh, a, b, stream != 0);
}
/* channels-last span of rows of C (extended constants, as cn_cl_norm_span) */
template <int A, class T>
inline void cn_act_grad_span_a(const T* dy, const T* x, T* g, ptrdiff_t n, ptrdiff_t C, const float* mh,
                               const float* a, const float* b) {
    ptrdiff_t c = 0;
    cn_sweep(g, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        ptrdiff_t c1 = cn_wrap(c + 16, C);
        cn_act_pf<A>(dy + i);
        cn_act_pf<A>(x + i);
        VF z0 = vfma(vload_n(x + i, m) - vload(mh + c), vload(a + c), vload(b + c));
        VF z1 = vfma(vload_n(x + i + 16, m - 16) - vload(mh + c1), vload(a + c1), vload(b + c1));
        VF g0 = cn_act_grad<A>(vload_n(dy + i, m), z0), g1 = cn_act_grad<A>(vload_n(dy + i + 16, m - 16), z1);
        vstore_pair_n(g + i, g0, g1, m, nt);
        c = cn_wrap(c + m, C);
    });
}
template <class T>
inline void cn_act_grad_span(const T* dy, const T* x, T* g, ptrdiff_t n, ptrdiff_t C, const float* mh, const float* a,
                             const float* b, int act) {
    CN_ACT_SWITCH(act, cn_act_grad_span_a, dy, x, g, n, C, mh, a, b);
}
/* LayerNorm row (per-element weight and bias) */
template <int A, class T>
inline void cn_act_grad_ln_a(const T* dy, const T* x, T* g, ptrdiff_t n, float mh, float ml, float rf, const float* w,
                             const float* b) {
    const VF vm = vset(mh), vr = vset(rf), vl = vset(-ml * rf);
    cn_sweep(g, n, [&](ptrdiff_t i, ptrdiff_t m, bool nt) CN_LAMBDA {
        cn_act_pf<A>(dy + i);
        cn_act_pf<A>(x + i);
        VF z0 = vfma(vfma(vload_n(x + i, m) - vm, vr, vl), vload_n(w + i, m), vload_n(b + i, m));
        VF z1 = vfma(vfma(vload_n(x + i + 16, m - 16) - vm, vr, vl), vload_n(w + i + 16, m - 16),
                     vload_n(b + i + 16, m - 16));
        VF g0 = cn_act_grad<A>(vload_n(dy + i, m), z0), g1 = cn_act_grad<A>(vload_n(dy + i + 16, m - 16), z1);
        vstore_pair_n(g + i, g0, g1, m, nt);
    });
}
template <class T>
inline void cn_act_grad_ln(const T* dy, const T* x, T* g, ptrdiff_t n, float mh, float ml, float rf, const float* w,
                           const float* b, int act) {
    CN_ACT_SWITCH(act, cn_act_grad_ln_a, dy, x, g, n, mh, ml, rf, w, b);
}

/* dst = src, n bytes, whole lines by streaming stores (what the kernels'
   outputs cost): the benchmark's memory floor, so that the library memcpy's
   choice of stores at a given size does not decide it */
inline void cn_stream_copy(const char* src, char* dst, ptrdiff_t n) {
    ptrdiff_t h = (ptrdiff_t)((64 - (uintptr_t)dst % 64) % 64), i;
    if (h > n) h = n;
    memcpy(dst, src, (size_t)h);
    for (i = h; i + 64 <= n; i += 64) cn_copy_line_nt(dst + i, src + i);
    memcpy(dst + i, src + i, (size_t)(n - i));
}

}  // namespace
#endif
