# Placeholder block functions for: q4_k q5_k q6_k (to be written; the codec refuses these types until then).

cdef int q4_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q4_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q5_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q5_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q6_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q6_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


