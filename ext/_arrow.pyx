# Assemble a RecordBatch from NumPy/Arrow buffers in one step, through the Arrow C data
# interface (https://arrow.apache.org/docs/format/CDataInterface.html).
#
# Why: wrapping each output buffer with pa.Array.from_buffers and then building the batch
# with RecordBatch.from_arrays costs a dozen pyarrow calls per column; right after a kernel
# has streamed megabytes through the caches, each one runs on cold code and data, and
# together they cost more than a tenth of a 4 MiB batch's kernel time. Here the codec
# describes the output as nested tuples; one call fills ArrowArray structs that point at
# the buffers (no copy) and pyarrow imports the whole batch at once.
#
# Ownership: the root struct's private data holds a Python list of every buffer object
# (NumPy arrays, pa.Buffers), so their memory lives exactly as long as the imported batch.
# Passed-through columns are exported by pyarrow and moved in as children; releasing the
# root releases them through their own callbacks. Release takes the GIL only to drop the
# list (it may run on any thread, e.g. one of gRPC's after a send).

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_RawFree
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport calloc, free


cdef extern from "Python.h":
    int Py_IsInitialized() nogil


cdef void release_node(ArrowArray* a) noexcept nogil:
    """Release one node we built: its children (built or moved in), its arrays, and (for
    the root) the list that keeps the buffers alive."""
    cdef int64_t i
    cdef ArrowArray* child
    if a.release == NULL:
        return
    for i in range(a.n_children):
        child = a.children[i]
        if child != NULL:
            if child.release != NULL:
                child.release(child)
            free(child)
    free(a.children)
    free(a.buffers)
    if a.private_data != NULL and Py_IsInitialized():
        with gil:
            Py_DECREF(<object>a.private_data)
    a.private_data = NULL
    a.release = NULL


cdef void release_owned(ArrowArray* a) noexcept nogil:
    """Release a node that owns its buffers (allocated with PyMem_RawMalloc, as
    flightquant._engine does): its children, then every buffer. No GIL needed."""
    cdef int64_t i
    if a.release == NULL:
        return
    for i in range(a.n_buffers):
        PyMem_RawFree(<void*>a.buffers[i])
    a.n_buffers = 0
    a.private_data = NULL  # never a Python object on these nodes
    release_node(a)


cdef int take_column(ArrowArray* dst, ArrowArray* src, Py_ssize_t j, int64_t num_rows) except -1:
    """Move column ``j`` of an exported batch ``src`` into ``dst`` (a bitwise copy; the
    source's slot is marked released, so releasing ``src`` leaves it alone)."""
    if not 0 <= j < src.n_children or src.children[j].release == NULL:
        raise IndexError(f"no column {j} in the source batch to take")
    # pyarrow exports a sliced batch as offset 0 with sliced children
    if src.offset != 0 or src.children[j].length != num_rows:
        raise ValueError(f"the source batch's column {j} does not have {num_rows} rows")
    dst[0] = src.children[j][0]
    src.children[j].release = NULL
    return 0


cdef const void* address_of(object obj, list keep) except? NULL:
    """The address of a buffer-protocol object's memory; ``obj`` joins ``keep``."""
    cdef Py_buffer view
    cdef const void* ptr
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    ptr = view.buf
    PyBuffer_Release(&view)  # the pointer stays valid while ``keep`` holds obj
    keep.append(obj)
    return ptr


cdef int init_node(ArrowArray* a, int64_t length, int64_t null_count, Py_ssize_t n_buffers,
                   Py_ssize_t n_children) except -1:
    """Set ``a``'s fields (offset 0) and allocate its buffer and child pointer arrays
    (zeroed; children are added by :func:`new_child`)."""
    a.length = length
    a.null_count = null_count
    a.offset = 0
    a.n_buffers = n_buffers
    a.n_children = 0
    a.dictionary = NULL
    a.private_data = NULL
    a.buffers = <const void**>calloc(max(1, n_buffers), sizeof(void*))
    a.children = <ArrowArray**>calloc(max(1, n_children), sizeof(ArrowArray*))
    a.release = release_node  # from here on, release_node frees what was filled
    if a.buffers == NULL or a.children == NULL:
        raise MemoryError()
    return 0


cdef ArrowArray* new_child(ArrowArray* a) except NULL:
    """A zeroed child struct in ``a``'s next slot (released with ``a``)."""
    cdef ArrowArray* child = <ArrowArray*>calloc(1, sizeof(ArrowArray))
    if child == NULL:
        raise MemoryError()
    a.children[a.n_children] = child
    a.n_children += 1
    return child


cdef int fill(ArrowArray* a, tuple spec, list keep) except -1:
    """Fill ``a`` from ``(length, null_count, buffers, children)``: buffers are None or
    buffer-protocol objects, children are specs of the same form (offset is 0)."""
    cdef tuple buffers = spec[2]
    cdef tuple children = spec[3]
    cdef Py_ssize_t i
    init_node(a, spec[0], spec[1], len(buffers), len(children))
    for i in range(len(buffers)):
        if buffers[i] is not None:
            a.buffers[i] = address_of(buffers[i], keep)
    for i in range(len(children)):
        fill(new_child(a), children[i], keep)
    return 0


def make_batch(schema, int64_t num_rows, list columns, source=None):
    """A ``pyarrow.RecordBatch`` of ``schema`` whose columns are ``columns``: each an int
    (that column of the ``source`` RecordBatch, taken as it is), a ``pyarrow.Array``
    (taken as it is) or a spec ``(length, null_count, buffers, children)`` of a new
    array, wrapped around the given buffers without copying.

    The caller guarantees the specs match the schema's types (buffer count, sizes, child
    lengths): the C data interface carries no sizes, so nothing here can check them.
    """
    import pyarrow as pa

    cdef ArrowArray root
    cdef ArrowArray src
    cdef ArrowArray* child
    cdef list keep = []
    cdef Py_ssize_t i, j
    src.release = NULL
    root.release = NULL
    try:
        init_node(&root, num_rows, 0, 1, len(columns))  # a struct array, no validity
        for i in range(len(columns)):
            child = new_child(&root)
            column = columns[i]
            if isinstance(column, tuple):
                fill(child, <tuple>column, keep)
            elif isinstance(column, int):
                if src.release == NULL:  # one export of the whole source batch
                    source._export_to_c(<uintptr_t>&src)
                j = column
                take_column(child, &src, j, num_rows)
            else:
                column._export_to_c(<uintptr_t>child)
        Py_INCREF(keep)
        root.private_data = <void*>keep
    except BaseException:
        release_node(&root)
        raise
    finally:
        if src.release != NULL:  # releases the columns not moved out
            src.release(&src)
    # the import moves the struct (and releases it on error)
    return pa.RecordBatch._import_from_c(<uintptr_t>&root, schema)
