/* The neon level's float -> bfloat16 conversions, checked bit for bit against
   cn_f32_to_bf16 (the definition every level follows), over every float whose
   low 16 bits are one of a set of patterns around the rounding point (ties,
   just below and above, zero, all ones) for all 65536 high halves: every
   exponent and sign, subnormals, infinities, quiet and signalling NaNs.

   Run under qemu-aarch64 twice by tools/aarch64_test.sh: with -cpu max
   (FEAT_BF16: the BFCVTN path, whose agreement this proves) and with a core
   without it (the integer path). Each store form is checked: nf_store (4
   values), nf_store2 (8: a's then b's), nf_store_eo (8 interleaved), and the
   tail stores. Prints which path ran; exits 1 on the first difference.

   aarch64-linux-gnu-g++ -std=c++17 -O2 -DCN_LEVEL_NEON=1 tools/aarch64_bf16_check.cpp -o check
   qemu-aarch64 -cpu max -L ROOT ./check */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "../cnorm/backends/cpu/kernels.hpp"

static int fail(const char* form, uint32_t u, unsigned got, unsigned want) {
    printf("%s: %08x gave %04x, cn_f32_to_bf16 %04x (BFCVTN path: %d)\n", form, u, got, want, cn_hw_bf16);
    return 1;
}

int main() {
    cn_native_init();
    static const uint32_t lows[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000};
    const int nl = sizeof lows / sizeof lows[0];
    float in[8];
    uint32_t bits[8];
    cn_bf16 out[8], want[8];
    long checked = 0;
    for (uint32_t hi = 0; hi < 0x10000u; hi++) {
        for (int l = 0; l < nl; l += 1) {
            for (int j = 0; j < 8; j++) {   /* 8 neighbours: the patterns, shifted by lane */
                bits[j] = (hi << 16) | lows[(l + j) % nl];
                memcpy(&in[j], &bits[j], 4);
                want[j] = cn_f32_to_bf16(in[j]);
            }
            nf a = nf_load(in), b = nf_load(in + 4);
            nf_store(out, a, false);
            for (int j = 0; j < 4; j++)
                if (out[j].v != want[j].v) return fail("nf_store", bits[j], out[j].v, want[j].v);
            nf_store2(out, a, b, false);
            for (int j = 0; j < 8; j++)
                if (out[j].v != want[j].v) return fail("nf_store2", bits[j], out[j].v, want[j].v);
            nf_store_eo(out, a, b, false);   /* a at even positions, b at odd */
            for (int j = 0; j < 4; j++) {
                if (out[2 * j].v != want[j].v) return fail("nf_store_eo even", bits[j], out[2 * j].v, want[j].v);
                if (out[2 * j + 1].v != want[4 + j].v)
                    return fail("nf_store_eo odd", bits[4 + j], out[2 * j + 1].v, want[4 + j].v);
            }
            memset(out, 0, sizeof out);
            nf_store_n(out, a, 3);
            for (int j = 0; j < 3; j++)
                if (out[j].v != want[j].v) return fail("nf_store_n", bits[j], out[j].v, want[j].v);
            if (out[3].v != 0) return fail("nf_store_n past the tail", bits[3], out[3].v, 0);
            checked += 8;
        }
    }
    printf("bfloat16 conversions: %ld values, all equal to cn_f32_to_bf16 (%s path)\n", checked,
           cn_hw_bf16 ? "BFCVTN" : "integer");
    return 0;
}
