# C-level entry points of the ggml block kernels (ext/_ggml.pyx), shared with the codec
# engine (ext/_engine.pyx). The caller has validated every row and allocated every output.

from libc.stdint cimport int64_t, uint8_t

cdef int64_t quantize_rows(const uint8_t* values, int itemsize, const int64_t* row_starts,
                           const int64_t* bo, const int64_t* out_starts, int64_t nrows,
                           int code, int block_size, int type_size, int method,
                           bint has_clip, float lo, float hi,
                           const uint8_t* imp, const int64_t* imp_starts, const int64_t* imp_k,
                           uint8_t* out, double* block_sse, float* block_maxerr,
                           int n_threads) noexcept nogil
cdef int dequantize_rows(const uint8_t* data, const int64_t* in_starts, const int64_t* bo,
                         const int64_t* out_starts, int64_t nrows, int code, int block_size,
                         int type_size, int itemsize, uint8_t* out,
                         int n_threads) noexcept nogil
