# The single OpenMP shim (scikit-learn ``utils/_openmp_helpers.pxd`` style).
#
# Every other Cython file cimports OpenMP functions from here, never from
# ``openmp`` directly, so that a build without OpenMP still compiles and runs,
# single-threaded: omp_get_max_threads() is 1 and FLIGHTQUANT_OPENMP is 0.

cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define FLIGHTQUANT_OPENMP 1
    #else
        #define FLIGHTQUANT_OPENMP 0
        static inline int omp_get_max_threads(void) { return 1; }
        static inline int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint FLIGHTQUANT_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
