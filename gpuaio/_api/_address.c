/* A host array's address through the buffer protocol (gpuaio._api.describe).
 *
 * Classifying a numpy argument needs its address and whether it is writable
 * and C-contiguous. The pure-Python way, ctypes.c_char.from_buffer and
 * ctypes.addressof, builds a ctypes object around the buffer each time: 250-290
 * ns per argument on the CPU machine against 75-87 ns here (issue 13, round
 * forty-one's prototype, benchmarks/results/2026-12-06-cpu-buffer-address.log),
 * of an awaited 4 KiB copy's 3 us before its driver call.
 *
 * writable_address(obj) asks for what from_buffer asks for (a writable,
 * contiguous buffer of at least one byte) and fails where it fails, with one
 * of the errors describe takes for "no": the exporter's own (numpy: ValueError
 * for a read-only or strided array, where ctypes says TypeError of a read-only
 * one), ValueError for an empty one, TypeError for an object with no buffer.
 * The buffer is released before the call returns, as the ctypes object is
 * dropped at once; the caller keeps the array alive. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *py_writable_address(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    void *buf;
    Py_ssize_t len;

    (void)self;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    buf = view.buf;
    len = view.len;
    PyBuffer_Release(&view);
    if (len <= 0) {
        PyErr_SetString(PyExc_ValueError, "an empty buffer has no address to copy from");
        return NULL;
    }
    return PyLong_FromVoidPtr(buf);
}

static PyMethodDef methods[] = {
    {"writable_address", py_writable_address, METH_O,
     "writable_address(obj) -> int: the address of obj's writable, C-contiguous, non-empty "
     "buffer; raises the exporter's error (numpy: ValueError) otherwise, ValueError if empty, "
     "TypeError for no buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_address",
    "A host array's address through the buffer protocol (gpuaio._api.describe).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__address(void)
{
    return PyModule_Create(&module);
}
