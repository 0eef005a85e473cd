# C-level kernel entry points, shared with flightquant._engine (the codec
# engine). Same contract as the def wrappers in _kernels.pyx: the caller has validated the
# layout and allocated every output; these only compute (nogil, OpenMP over blocks).

from libc.stdint cimport int64_t, uint8_t

# longest group (elements) staged through a thread's scratch; a misaligned input with
# longer groups is copied aligned first (by kernels.py, or by the engine). Python reads it
# as _kernels.stage_max().
cdef enum:
    STAGE_MAX = 1 << 20


cdef struct Params:
    int bits
    int scheme
    int method
    bint stats
    bint has_clip
    float lo            # clip bounds, -inf/+inf without clip
    float hi
    float qmin          # signed code range (before the stored offset)
    float qmax
    float offset        # stored offset as float32 (exact small integer)
    int64_t group_size
    int64_t groups_per_block
    int scale_dtype     # 0: float32 scales as computed; else SCALE_* (stored scales)


cdef void set_params(Params* p, int bits, int scheme, int method, int64_t group_size,
                     int64_t groups_per_block, int qmin, int qmax, int offset,
                     bint has_clip, float clip, bint stats, int scale_dtype) noexcept nogil

# the number of blocks holding a non-finite value (outputs then incomplete), -1: no memory.
# imp: NULL, or float32 importance weights at any address: row r with imp_starts[r] >= 0
# weighs its element e by imp[imp_starts[r] + e % imp_k[r]] in the mse search
cdef int64_t quantize_f32(const float* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems, const uint8_t* imp,
                          const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil
cdef int64_t quantize_f64(const double* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems, const uint8_t* imp,
                          const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil

# 0, or -1: no memory
cdef int dequantize_f32(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t groups_per_block, int bits, int64_t group_size,
                        const float* scales, const float* zps, float offset, float* out,
                        int n_threads) noexcept nogil
cdef int dequantize_f64(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t groups_per_block, int bits, int64_t group_size,
                        const float* scales, const float* zps, float offset, double* out,
                        int n_threads) noexcept nogil
