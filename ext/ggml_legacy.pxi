# Placeholder block functions for: q4_0 q4_1 q5_0 q5_1 q8_0 tq1_0 tq2_0 (to be written; the codec refuses these types until then).

cdef int q4_0_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q4_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q4_1_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q4_1_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q5_0_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q5_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q5_1_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q5_1_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q8_0_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q8_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int tq1_0_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void tq1_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int tq2_0_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void tq2_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


