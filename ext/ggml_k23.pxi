# Placeholder block functions for: q2_k q3_k (to be written; the codec refuses these types until then).

cdef int q2_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q2_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


cdef int q3_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    return -1


cdef void q3_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    pass


