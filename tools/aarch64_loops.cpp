/* The neon level's hot loops as separate functions, for counting their
   instructions per element (tools/aarch64_loops.py, docs/design_notes.md):
   compiled with the kernel modules' flags (setup.py) and CN_LEVEL_NEON or
   CN_LEVEL_BASELINE, each wrapper holds one kernel sweep exactly as the
   Cython drivers inline it. tools/aarch64_loops.py then checks that each
   loop body found here occurs, instruction for instruction, in the compiled
   module. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "../cnorm/backends/cpu/kernels.hpp"

#define CN_LOOP extern "C" __attribute__((noinline, visibility("default")))

/* LayerNorm forward of a row: y = ((x - mh) rf - ml rf) w + b */
CN_LOOP void ln_fwd_f32(const float* x, float* y, ptrdiff_t n, float mh, float ml, float rf, const float* w, const float* b) {
    cn_ln_fwd_a<CN_ACT_NONE>(x, y, n, mh, ml, rf, w, b);
}
CN_LOOP void ln_fwd_bf16(const cn_bf16* x, cn_bf16* y, ptrdiff_t n, float mh, float ml, float rf, const float* w,
                         const float* b) {
    cn_ln_fwd_a<CN_ACT_NONE>(x, y, n, mh, ml, rf, w, b);
}
CN_LOOP void ln_fwd_f16(const cn_f16* x, cn_f16* y, ptrdiff_t n, float mh, float ml, float rf, const float* w,
                        const float* b) {
    cn_ln_fwd_a<CN_ACT_NONE>(x, y, n, mh, ml, rf, w, b);
}
/* LayerNorm row statistics: Σ(x - c)^2 and Σ(x - c) */
CN_LOOP void row_sq_f32(const float* x, ptrdiff_t n, float c, double* s1, double* s2) { cn_row_lanes(x, n, c, 1, s1, s2); }
CN_LOOP void row_sq_bf16(const cn_bf16* x, ptrdiff_t n, float c, double* s1, double* s2) {
    cn_row_lanes(x, n, c, 1, s1, s2);
}
/* BatchNorm (channels-first) normalize sweep of one channel's run: y = (x - mh) a + b */
CN_LOOP void bn_norm_f32(const float* x, float* y, ptrdiff_t n, float mh, float a, float b) {
    cn_norm_run_a<CN_ACT_NONE>(x, y, n, mh, a, b, decltype(x)(nullptr));
}
CN_LOOP void bn_norm_bf16(const cn_bf16* x, cn_bf16* y, ptrdiff_t n, float mh, float a, float b) {
    cn_norm_run_a<CN_ACT_NONE>(x, y, n, mh, a, b, decltype(x)(nullptr));
}
CN_LOOP void bn_norm_f16(const cn_f16* x, cn_f16* y, ptrdiff_t n, float mh, float a, float b) {
    cn_norm_run_a<CN_ACT_NONE>(x, y, n, mh, a, b, decltype(x)(nullptr));
}
/* BatchNorm backward dx sweep: dx = g ka + ((x - mh) kb + kc) */
CN_LOOP void bn_dx_f32(const float* g, const float* x, float* dx, ptrdiff_t n, float ka, float mh, float kb, float kc) {
    cn_dx_run(g, x, dx, n, ka, mh, kb, kc);
}
/* SiLU-fused BatchNorm normalize: the exp polynomial's FMAs */
CN_LOOP void bn_norm_silu_f32(const float* x, float* y, ptrdiff_t n, float mh, float a, float b) {
    cn_norm_run_a<CN_ACT_SILU>(x, y, n, mh, a, b, decltype(x)(nullptr));
}
