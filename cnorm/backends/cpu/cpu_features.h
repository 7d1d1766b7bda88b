/* CPU feature detection for choosing a kernel level at run time (x86-64:
   cpuid/xgetbv; AArch64: the OS's hwcaps, below).

   Included by cnorm/_cpuinfo.pyx, which is compiled without any instruction-set
   flags: it runs before any level is chosen, so it may contain only baseline
   x86-64 instructions (cpuid and xgetbv themselves are always there, xgetbv
   behind the OSXSAVE bit). The AVX-512 kernel module also includes it, after
   its level was checked, to ask whether the CPU has the AVX512-BF16
   conversions (used at run time, never required).

   A level needs both the instructions (cpuid) and the operating system's
   promise to save their registers on a context switch (XCR0 via xgetbv):
   a CPU with AVX-512 under an OS that does not enable the opmask/ZMM state
   must not run AVX-512 code. */
#ifndef CN_CPU_FEATURES_H
#define CN_CPU_FEATURES_H
#include <stdint.h>

enum {
    CN_F_SSE3 = 1 << 0, CN_F_SSSE3 = 1 << 1, CN_F_SSE41 = 1 << 2, CN_F_SSE42 = 1 << 3,
    CN_F_POPCNT = 1 << 4, CN_F_AVX = 1 << 5, CN_F_AVX2 = 1 << 6, CN_F_FMA = 1 << 7,
    CN_F_F16C = 1 << 8, CN_F_BMI1 = 1 << 9, CN_F_BMI2 = 1 << 10, CN_F_LZCNT = 1 << 11,
    CN_F_MOVBE = 1 << 12, CN_F_AVX512F = 1 << 13, CN_F_AVX512BW = 1 << 14,
    CN_F_AVX512VL = 1 << 15, CN_F_AVX512DQ = 1 << 16, CN_F_AVX512CD = 1 << 17,
    CN_F_AVX512BF16 = 1 << 18,
    CN_F_OS_YMM = 1 << 19,   /* XCR0: SSE and AVX state saved by the OS */
    CN_F_OS_ZMM = 1 << 20    /* XCR0: opmask, ZMM0-15 upper halves and ZMM16-31 saved */
};

/* What each level was compiled for (setup.py's flags): the x86-64-v2, -v3
   and -v4 feature sets, plus the OS state the wider registers need. */
#define CN_LEVEL_BASELINE_FEATURES (CN_F_SSE3 | CN_F_SSSE3 | CN_F_SSE41 | CN_F_SSE42 | CN_F_POPCNT)
#define CN_LEVEL_AVX2_FEATURES (CN_LEVEL_BASELINE_FEATURES | CN_F_AVX | CN_F_AVX2 | CN_F_FMA | CN_F_F16C | \
                                CN_F_BMI1 | CN_F_BMI2 | CN_F_LZCNT | CN_F_MOVBE | CN_F_OS_YMM)
#define CN_LEVEL_AVX512_FEATURES (CN_LEVEL_AVX2_FEATURES | CN_F_AVX512F | CN_F_AVX512BW | CN_F_AVX512VL | \
                                  CN_F_AVX512DQ | CN_F_AVX512CD | CN_F_OS_ZMM)

#if defined(__APPLE__)
#include <stddef.h>
#include <sys/types.h>
#include <sys/sysctl.h>
/* A sysctl of Apple's "hw.optional" family: 1 where the feature is there,
   0 where it is not; a name the kernel does not know is an error (0 here). */
static inline int cn_sysctl_flag(const char* name) {
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname(name, &v, &n, NULL, 0) == 0 && v != 0;
}
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define CN_X86 1
#if defined(__APPLE__)
static inline int cn_apple_avx512_os(void) { return cn_sysctl_flag("hw.optional.avx512f"); }
#endif
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static inline void cn_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    int v[4]; __cpuidex(v, (int)leaf, (int)sub);
    r[0] = (uint32_t)v[0]; r[1] = (uint32_t)v[1]; r[2] = (uint32_t)v[2]; r[3] = (uint32_t)v[3];
}
static inline uint64_t cn_xgetbv0(void) { return (uint64_t)_xgetbv(0); }
#else
#include <cpuid.h>
static inline void cn_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
/* xgetbv by its encoding: no -mxsave needed (this file has no level flags) */
static inline uint64_t cn_xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* The CN_F_* bits this CPU and OS support. */
static inline uint32_t cn_cpu_features(void) {
    uint32_t r[4], f = 0, max_leaf, max_ext;
    cn_cpuid(0, 0, r);
    max_leaf = r[0];
    if (max_leaf < 1) return 0;
    cn_cpuid(1, 0, r);
    if (r[2] & (1u << 0)) f |= CN_F_SSE3;
    if (r[2] & (1u << 9)) f |= CN_F_SSSE3;
    if (r[2] & (1u << 19)) f |= CN_F_SSE41;
    if (r[2] & (1u << 20)) f |= CN_F_SSE42;
    if (r[2] & (1u << 23)) f |= CN_F_POPCNT;
    if (r[2] & (1u << 22)) f |= CN_F_MOVBE;
    if (r[2] & (1u << 12)) f |= CN_F_FMA;
    if (r[2] & (1u << 29)) f |= CN_F_F16C;
    if (r[2] & (1u << 28)) f |= CN_F_AVX;
    if (r[2] & (1u << 27)) {  /* OSXSAVE: xgetbv may be executed */
        uint64_t xcr0 = cn_xgetbv0();
        if ((xcr0 & 0x6) == 0x6) f |= CN_F_OS_YMM;             /* XMM, YMM */
        if ((xcr0 & 0xe6) == 0xe6) f |= CN_F_OS_ZMM;           /* + opmask, ZMM_Hi256, Hi16_ZMM */
#if defined(__APPLE__)
        /* macOS turns the AVX-512 state on per thread, on demand (its
           first AVX-512 instruction), so XCR0 lacks the opmask/ZMM bits
           until then; the kernel says it supports AVX-512 through the
           hw.optional.avx512f sysctl instead. */
        if ((f & CN_F_OS_YMM) && cn_apple_avx512_os()) f |= CN_F_OS_ZMM;
#endif
    }
    if (max_leaf >= 7) {
        cn_cpuid(7, 0, r);
        if (r[1] & (1u << 3)) f |= CN_F_BMI1;
        if (r[1] & (1u << 5)) f |= CN_F_AVX2;
        if (r[1] & (1u << 8)) f |= CN_F_BMI2;
        if (r[1] & (1u << 16)) f |= CN_F_AVX512F;
        if (r[1] & (1u << 17)) f |= CN_F_AVX512DQ;
        if (r[1] & (1u << 28)) f |= CN_F_AVX512CD;
        if (r[1] & (1u << 30)) f |= CN_F_AVX512BW;
        if (r[1] & (1u << 31)) f |= CN_F_AVX512VL;
        if (r[0] >= 1) {
            cn_cpuid(7, 1, r);
            if (r[0] & (1u << 5)) f |= CN_F_AVX512BF16;
        }
    }
    cn_cpuid(0x80000000u, 0, r);
    max_ext = r[0];
    if (max_ext >= 0x80000001u) {
        cn_cpuid(0x80000001u, 0, r);
        if (r[2] & (1u << 5)) f |= CN_F_LZCNT;   /* ABM */
    }
    return f;
}
#else
#define CN_X86 0
#endif

/* AArch64: the same bit word, other meanings (CN_X86 tells which set a build
   has). The neon level uses only ARMv8.0 ASIMD (native_neon.hpp), so it needs
   CN_F_ASIMD alone; the half-precision arithmetic bits and BF16 are reported
   for show_config and for a later level or a run-time BFCVT path. */
enum {
    CN_F_ASIMD = 1 << 0,     /* Advanced SIMD (with FP): FMLA, FCVTL/FCVTN */
    CN_F_FPHP = 1 << 1,      /* scalar float16 arithmetic (ARMv8.2 FEAT_FP16) */
    CN_F_ASIMDHP = 1 << 2,   /* vector float16 arithmetic (ARMv8.2 FEAT_FP16) */
    CN_F_ARM_BF16 = 1 << 3   /* BFCVT, BFDOT, BFMMLA (FEAT_BF16) */
};
#define CN_LEVEL_NEON_FEATURES (CN_F_ASIMD)

#if defined(__aarch64__) || defined(_M_ARM64)
#define CN_AARCH64 1
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef AT_HWCAP2
#define AT_HWCAP2 26   /* C libraries older than glibc 2.18 */
#endif
/* Linux's hwcap bits (asm/hwcap.h), spelled out for older C libraries */
#define CN_HWCAP_FP (1ul << 0)
#define CN_HWCAP_ASIMD (1ul << 1)
#define CN_HWCAP_FPHP (1ul << 9)
#define CN_HWCAP_ASIMDHP (1ul << 10)
#define CN_HWCAP2_BF16 (1ul << 14)
static inline uint32_t cn_cpu_features(void) {
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    uint32_t f = 0;
    /* the kernel reports what it lets user space run (it may hide a unit) */
    if ((hw & CN_HWCAP_FP) && (hw & CN_HWCAP_ASIMD)) f |= CN_F_ASIMD;
    if (hw & CN_HWCAP_FPHP) f |= CN_F_FPHP;
    if (hw & CN_HWCAP_ASIMDHP) f |= CN_F_ASIMDHP;
    if (hw2 & CN_HWCAP2_BF16) f |= CN_F_ARM_BF16;
    return f;
}
#elif defined(__APPLE__)
/* Names from Apple's "Determining Instruction Set Characteristics"
   (sysctlbyname): Advanced SIMD and floating point are standard on every
   Apple arm64 CPU (A7, M1 and later: "don't need to be checked"), and the
   arm64 ABI assumes them, so CN_F_ASIMD is set without asking (a failing
   sysctl cannot cost the neon level). The optional units are asked by
   their documented names, then by the older name a documented one replaces
   (hw.optional.neon_fp16 for FEAT_FP16), for systems without the new one. */
static inline uint32_t cn_cpu_features(void) {
    uint32_t f = CN_F_ASIMD;
    if (cn_sysctl_flag("hw.optional.arm.FEAT_FP16") || cn_sysctl_flag("hw.optional.neon_fp16"))
        f |= CN_F_FPHP | CN_F_ASIMDHP;
    if (cn_sysctl_flag("hw.optional.arm.FEAT_BF16")) f |= CN_F_ARM_BF16;
    return f;
}
#else
/* other AArch64 systems (Windows, the BSDs): ASIMD is part of every
   AArch64 platform ABI, so it is assumed; the optional units are not */
static inline uint32_t cn_cpu_features(void) { return CN_F_ASIMD; }
#endif
#else
#define CN_AARCH64 0
#if !CN_X86
static inline uint32_t cn_cpu_features(void) { return 0; }
#endif
#endif

#endif
