/* The neon level's native register on AArch64: 4 floats (ASIMD). Every
   instruction used here is in ARMv8.0-A's ASIMD, which every AArch64 core
   has (Apple M1, Graviton 1-4, Ampere, Grace, Cortex-A53 up): FMLA for the
   fused a*b + c (one rounding, as avx2/avx512, so the three FMA levels
   compute the same values), FCVTL/FCVTN for float16 (these conversions are
   ARMv8.0; only float16 *arithmetic* needs ARMv8.2's FP16, which the
   kernels never do), FCVTL/FCVTL2 to widen to double. So the level needs no
   -march flag and only HWCAP_ASIMD at run time.

   bfloat16 is rounded by BFCVTN where the CPU has FEAT_BF16 (HWCAP2_BF16 /
   hw.optional.arm.FEAT_BF16, found at run time, never required: Graviton 3
   and 4, Grace, Apple M2 and later), else with the integer code of
   native_sse.hpp (round to nearest even on the float bits, a NaN truncated
   and made quiet), as cn_f32_to_bf16 defines it. The two give the same bits:
   BFCVTN converts as the Arm ARM's FPConvertBF, which rounds by FPCR's mode
   (to nearest even: what every OS sets), keeps subnormal inputs unless
   FPCR.FZ is set (it is not: and were it set, every other float operation
   of the kernels would flush too), and turns a NaN into its quiet form with
   the top payload bits (FPConvertNaN); tools/aarch64_bf16_check.cpp checks
   this bit for bit under qemu. The instruction is emitted by inline
   assembly (".arch_extension bf16" for the assembler alone), so the module
   needs no -march flag and runs on ARMv8.0; an ARMv8.0 CPU never reaches it.

   Tails go through a small stack buffer (ASIMD has no masked loads or
   stores). Streaming stores: AArch64 has STNP (a non-temporal pair hint),
   which the intrinsics do not expose; the nt argument is accepted and
   ordinary stores are made (the values are the same). */
#ifndef CN_NATIVE_NEON_HPP
#define CN_NATIVE_NEON_HPP
#if !defined(__aarch64__) && !defined(_M_ARM64)
#error "the neon level is the AArch64 ASIMD level (setup.py builds it on aarch64 only)"
#endif
#include <arm_neon.h>
#include <math.h>
#include "../cpu_features.h"

#define CN_VEC_LEVEL "neon"
#define CN_VEC_FMA 1

namespace {

constexpr int CN_W = 4;
typedef float32x4_t nf;
typedef float64x2_t nd;

#if defined(__GNUC__) || defined(__clang__)
int cn_hw_bf16 = 0;   /* the CPU has BFCVTN (FEAT_BF16): set by cn_native_init */
inline void cn_native_init() { cn_hw_bf16 = (cn_cpu_features() & CN_F_ARM_BF16) != 0; }
#else
const int cn_hw_bf16 = 0;   /* MSVC: no inline assembly on arm64 (and no neon level built there) */
inline void cn_native_init() {}
#endif

CN_INLINE float cn_fma1(float a, float b, float c) { return fmaf(a, b, c); }   /* FMADD: one rounding, as nf_fma */

CN_INLINE nf nf_zero() { return vdupq_n_f32(0.0f); }
CN_INLINE nf nf_set1(float a) { return vdupq_n_f32(a); }
CN_INLINE nf nf_add(nf a, nf b) { return vaddq_f32(a, b); }
CN_INLINE nf nf_sub(nf a, nf b) { return vsubq_f32(a, b); }
CN_INLINE nf nf_mul(nf a, nf b) { return vmulq_f32(a, b); }
CN_INLINE nf nf_fma(nf a, nf b, nf c) { return vfmaq_f32(c, a, b); }   /* c + a*b, one rounding */

/* the operations of native_avx512.hpp for activations. x86's max/min rule
   (b where either is NaN) is a compare and a select: FMAX/FMIN would give
   NaN for a NaN in either operand, and FMAXNM/FMINNM the number. */
CN_INLINE nf nf_max(nf a, nf b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
CN_INLINE nf nf_min(nf a, nf b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
CN_INLINE nf nf_div(nf a, nf b) { return vdivq_f32(a, b); }
CN_INLINE nf nf_sel_gt(nf a, nf b, nf t, nf f) { return vbslq_f32(vcgtq_f32(a, b), t, f); }
/* the sign bit spread over the lane by an arithmetic shift selects a*b */
CN_INLINE nf nf_mul_neg(nf a, nf b) {
    uint32x4_t neg = vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_f32(a), 31));
    return vbslq_f32(neg, vmulq_f32(a, b), a);
}
CN_INLINE nf nf_nabs(nf v) {   /* the sign bit set (a NaN's payload kept) */
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(v), vdupq_n_u32(0x80000000u)));
}
CN_INLINE nf nf_exp2i32(nf t) {
    uint32x4_t u = vshlq_n_u32(vreinterpretq_u32_f32(t), 23);
    return vreinterpretq_f32_u32(vaddq_u32(u, vdupq_n_u32(159u << 23)));
}

/* lanes [m, 4) zeroed: lane index < m as a mask */
CN_INLINE nf nf_keep(nf v, ptrdiff_t m) {
    static const int32_t idx[4] = {0, 1, 2, 3};
    int32_t mm = (int32_t)(m < 0 ? 0 : m > 4 ? 4 : m);
    uint32x4_t k = vcltq_s32(vld1q_s32(idx), vdupq_n_s32(mm));
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), k));
}

/* ---- loads ---- */
CN_INLINE nf cn_bf16_widen(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
/* float16 -> float: FCVTL, exact (subnormals, Inf, NaN payload as cn_f16_to_f32) */
CN_INLINE nf cn_f16_widen(uint16x4_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
CN_INLINE nf nf_load(const float* p) { return vld1q_f32(p); }
CN_INLINE nf nf_load(const cn_bf16* p) { return cn_bf16_widen(vld1_u16((const uint16_t*)p)); }
CN_INLINE nf nf_load(const cn_f16* p) { return cn_f16_widen(vld1_u16((const uint16_t*)p)); }
template <class T>
CN_INLINE nf nf_load_n(const T* p, ptrdiff_t m) {
    T t[4];
    memset(t, 0, sizeof t);
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 4 ? 4 : m) * sizeof(T));
    return nf_load(t);
}
/* 8 bfloat16 values: even positions are the low halves of the 32-bit lanes */
CN_INLINE void cn_split_bf16(uint32x4_t u, nf& e, nf& o) {
    e = vreinterpretq_f32_u32(vshlq_n_u32(u, 16));
    o = vreinterpretq_f32_u32(vandq_u32(u, vdupq_n_u32(0xffff0000u)));
}
CN_INLINE void nf_load_eo(const cn_bf16* p, nf& e, nf& o) { cn_split_bf16(vld1q_u32((const uint32_t*)p), e, o); }
CN_INLINE void nf_load_eo_n(const cn_bf16* p, ptrdiff_t m, nf& e, nf& o) {
    uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(t, p, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
    nf_load_eo((const cn_bf16*)t, e, o);
}

/* ---- stores ---- */
CN_INLINE void nf_store(float* p, nf v, bool) { vst1q_f32(p, v); }
/* float -> bfloat16 as cn_f32_to_bf16, in the high half of each lane: round
   to nearest even by integer addition; a NaN lane instead keeps its bits with
   the quiet bit (0x400000) set, so truncation leaves a quiet NaN. The select
   is unconditional: two instructions per register, no branch on a reduction. */
CN_INLINE uint32x4_t cn_bf16_round_hi(nf v) {
    uint32x4_t u = vreinterpretq_u32_f32(v);
    /* u + 0x7fff + bit 16 of u (the kept part's lowest bit): USRA adds the shifted bit */
    uint32x4_t r = vsraq_n_u32(vaddq_u32(u, vdupq_n_u32(0x7fffu)), vandq_u32(u, vdupq_n_u32(0x10000u)), 16);
    uint32x4_t num = vceqq_f32(v, v);   /* all-ones where v is not NaN */
    return vbslq_u32(num, r, vorrq_u32(u, vdupq_n_u32(0x400000u)));
}
/* float -> float16 bits: FCVTN rounds to nearest even (the FPCR default that
   every OS sets), subnormal results correctly rounded (FZ off), a NaN kept
   with its top payload bits and made quiet: the values of cn_f32_to_f16 */
CN_INLINE uint16x4_t cn_f16_round(nf v) { return vreinterpret_u16_f16(vcvt_f16_f32(v)); }
/* BFCVTN: 4 floats to 4 bfloat16 in the low half (only where cn_hw_bf16) */
CN_INLINE uint16x4_t cn_bf16_cvt_hw(nf v) {
#if defined(__GNUC__) || defined(__clang__)
    uint16x4_t r;
    /* volatile: a plain asm is a pure function to GCC, which may then run it ahead of the
       cn_hw_bf16 test (if-conversion) and trap on a CPU without the instruction */
    __asm__ volatile(".arch_extension bf16\n\tbfcvtn %0.4h, %1.4s" : "=w"(r) : "w"(v));
    return r;
#else
    return vshrn_n_u32(cn_bf16_round_hi(v), 16);
#endif
}
/* 4 floats to bfloat16 bits: one instruction with FEAT_BF16, five without */
CN_INLINE uint16x4_t cn_bf16_pack(nf v) {
    if (cn_hw_bf16) return cn_bf16_cvt_hw(v);
    return vshrn_n_u32(cn_bf16_round_hi(v), 16);
}
CN_INLINE void nf_store(cn_bf16* p, nf v, bool) { vst1_u16((uint16_t*)p, cn_bf16_pack(v)); }
CN_INLINE void nf_store(cn_f16* p, nf v, bool) { vst1_u16((uint16_t*)p, cn_f16_round(v)); }
/* 8 values: a's then b's (UZP2 takes the high halves of both in one instruction) */
CN_INLINE void nf_store2(cn_bf16* p, nf a, nf b, bool) {
    if (cn_hw_bf16) {
        vst1q_u16((uint16_t*)p, vcombine_u16(cn_bf16_cvt_hw(a), cn_bf16_cvt_hw(b)));
        return;
    }
    uint16x8_t h = vuzp2q_u16(vreinterpretq_u16_u32(cn_bf16_round_hi(a)), vreinterpretq_u16_u32(cn_bf16_round_hi(b)));
    vst1q_u16((uint16_t*)p, h);
}
CN_INLINE void nf_store2(cn_f16* p, nf a, nf b, bool) {
    vst1q_u16((uint16_t*)p, vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(a), b)));
}
/* even positions from e, odd from o: e's high halves shifted down and
   inserted under o's (SRI) */
CN_INLINE uint32x4_t cn_merge_eo(nf e, nf o) {
    if (cn_hw_bf16) {   /* ZIP1 of the two conversions: e0 o0 e1 o1 ... (each converted once:
                           the asm is volatile, so the compiler would not merge two copies) */
        uint16x4_t he = cn_bf16_cvt_hw(e), ho = cn_bf16_cvt_hw(o);
        return vreinterpretq_u32_u16(vzip1q_u16(vcombine_u16(he, he), vcombine_u16(ho, ho)));
    }
    return vsriq_n_u32(cn_bf16_round_hi(o), cn_bf16_round_hi(e), 16);
}
CN_INLINE void nf_store_eo(cn_bf16* p, nf e, nf o, bool) { vst1q_u32((uint32_t*)p, cn_merge_eo(e, o)); }
template <class T>
CN_INLINE void nf_store_n(T* p, nf v, ptrdiff_t m) {
    T t[4];
    nf_store(t, v, false);
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 4 ? 4 : m) * sizeof(T));
}
CN_INLINE void nf_store_eo_n(cn_bf16* p, nf e, nf o, ptrdiff_t m) {
    uint16_t t[8];
    vst1q_u32((uint32_t*)t, cn_merge_eo(e, o));
    memcpy(p, t, (size_t)(m < 0 ? 0 : m > 8 ? 8 : m) * 2);
}

/* ---- doubles ---- */
CN_INLINE nd nd_zero() { return vdupq_n_f64(0.0); }
CN_INLINE nd nd_add(nd a, nd b) { return vaddq_f64(a, b); }
CN_INLINE nd nd_mul(nd a, nd b) { return vmulq_f64(a, b); }
CN_INLINE nd nd_load(const double* p) { return vld1q_f64(p); }
CN_INLINE void nd_store(double* p, nd v) { vst1q_f64(p, v); }
CN_INLINE void nf_widen(nf v, nd& lo, nd& hi) {
    lo = vcvt_f64_f32(vget_low_f32(v));
    hi = vcvt_high_f64_f32(v);
}
CN_INLINE double nd_hsum(nd q) { return vgetq_lane_f64(q, 0) + vgetq_lane_f64(q, 1); }

CN_INLINE void cn_copy_line_nt(char* dst, const char* src) { memcpy(dst, src, 64); }

}  // namespace
#endif
