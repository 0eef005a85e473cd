# The Arrow C data interface struct and the node helpers of _arrow.pyx, shared with
# flightquant._engine. https://arrow.apache.org/docs/format/CDataInterface.html

from libc.stdint cimport int64_t


cdef struct ArrowArray:
    int64_t length
    int64_t null_count
    int64_t offset
    int64_t n_buffers
    int64_t n_children
    const void** buffers
    ArrowArray** children
    ArrowArray* dictionary
    void (*release)(ArrowArray*) noexcept nogil
    void* private_data


cdef int init_node(ArrowArray* a, int64_t length, int64_t null_count, Py_ssize_t n_buffers,
                   Py_ssize_t n_children) except -1
cdef ArrowArray* new_child(ArrowArray* a) except NULL
cdef void release_node(ArrowArray* a) noexcept nogil
cdef void release_owned(ArrowArray* a) noexcept nogil
cdef int take_column(ArrowArray* dst, ArrowArray* src, Py_ssize_t j, int64_t num_rows) except -1
