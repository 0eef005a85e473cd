# Helpers every ggml block kernel shares (included into _ggml.pyx).
#
# * fq_fp32_to_fp16 / fq_fp16_to_fp32: IEEE binary16 conversions, round to nearest even,
#   subnormals and overflow handled, bit-identical to NumPy's astype(np.float16) (which is
#   what gguf-py uses, and what ggml's scalar GGML_FP32_TO_FP16 gives).
# * fq_nearest_int: round half to even for |x| <= 2**22 (ggml's nearest_int, the
#   magic-constant trick), the rounding of every K-quant and of the search code.
# * fq_load_f16 / fq_store_f16: 2-byte fields at any address (blocks are 18, 20, 22... bytes
#   long, so their fields are unaligned; Flight buffers may sit at any address too).

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    static inline uint32_t fq_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float fq_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

    /* binary16 -> binary32, exact. */
    static inline float fq_fp16_to_fp32(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        uint32_t exp = (h >> 10) & 0x1Fu;
        uint32_t man = h & 0x3FFu;
        if (exp == 0x1Fu) return fq_f32_from_bits(sign | 0x7F800000u | (man << 13));
        if (exp == 0) {
            /* zero or subnormal: man * 2**-24, exact in float32 */
            float v = (float)man * 5.9604644775390625e-08f;
            return sign ? -v : v;
        }
        return fq_f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
    }

    /* binary32 -> binary16, round to nearest even (NaN stays NaN, overflow gives inf). */
    static inline uint16_t fq_fp32_to_fp16(float f) {
        uint32_t u = fq_f32_bits(f);
        uint32_t sign = (u >> 16) & 0x8000u;
        uint32_t a = u & 0x7FFFFFFFu;
        if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
        if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* rounds past 65504 */
        if (a < 0x38800000u) {
            /* result is subnormal or zero: round a * 2**24 (an integer count of 2**-24) */
            if (a < 0x33000000u) return (uint16_t)sign;          /* below half of 2**-24 */
            uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
            uint32_t shift = 126u - e;                            /* 14..24 */
            uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
            if (rem > half || (rem == half && (q & 1u))) q += 1u;
            return (uint16_t)(sign | q);
        }
        /* normal: drop 13 mantissa bits with round to nearest even (a carry may bump exp) */
        uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }

    static inline int fq_nearest_int(float fval) {
        float val = fval + 12582912.f;
        int32_t i; memcpy(&i, &val, 4);
        return (i & 0x007fffff) - 0x00400000;
    }

    static inline float fq_load_f16(const uint8_t* p) {
        uint16_t h; memcpy(&h, p, 2); return fq_fp16_to_fp32(h);
    }
    static inline void fq_store_f16(uint8_t* p, float f) {
        uint16_t h = fq_fp32_to_fp16(f); memcpy(p, &h, 2);
    }
    """
    float fq_fp16_to_fp32(uint16_t h) noexcept nogil
    uint16_t fq_fp32_to_fp16(float f) noexcept nogil
    int fq_nearest_int(float fval) noexcept nogil
    float fq_load_f16(const uint8_t* p) noexcept nogil
    void fq_store_f16(uint8_t* p, float f) noexcept nogil
