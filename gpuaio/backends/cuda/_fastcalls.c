/* The driver calls every awaited operation makes, called straight through
 * the driver's own function pointers (gpuaio.backends.cuda._fast), and a
 * gated copy's stream work in one call (gated()).
 *
 * Through cuda.bindings each of cuMemcpyAsync, cuEventRecord and
 * cuEventQuery costs a Python-level call that converts its arguments, a
 * result tuple and a CUresult enum object, and so does the cuCtxGetCurrent
 * before it that checks the stream's context is current: four such calls
 * for one small copy (issue 13). Here each is one METH_FASTCALL function
 * that checks the context and makes the call, and answers the CUresult as
 * an int.
 *
 * Nothing here links against the driver: bind() takes the addresses
 * cuGetProcAddress gave (through cuda.bindings), so that the same library
 * loads on a machine without CUDA, and the calls are the ones the bindings
 * themselves resolve. Until bind() has run every call answers NOT_BOUND.
 *
 * Each call first compares the calling thread's current context with the
 * one its handle belongs to. Where they differ it does nothing and answers
 * NOT_CURRENT: the caller then takes its slow path, which switches
 * contexts (and switches back for a thread that is not gpuaio's). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*ctx_get_current_fn)(void **ctx);
typedef int (*memcpy_async_fn)(uint64_t dst, uint64_t src, size_t n, void *stream);
typedef int (*event_record_fn)(void *event, void *stream);
typedef int (*event_query_fn)(void *event);
typedef int (*write_value32_fn)(void *stream, uint64_t addr, uint32_t value, unsigned int flags);
typedef int (*wait_value32_fn)(void *stream, uint64_t addr, uint32_t value, unsigned int flags);

static ctx_get_current_fn p_ctx_get_current;
static memcpy_async_fn p_memcpy_async;
static event_record_fn p_event_record;
static event_query_fn p_event_query;
static write_value32_fn p_write_value32; /* optional: NULL, and gated() answers NOT_BOUND */
static wait_value32_fn p_wait_value32;

/* CU_STREAM_WRITE_VALUE_DEFAULT (a memory barrier first: the stores before
 * the word are visible before it) and CU_STREAM_WAIT_VALUE_GEQ. */
#define WRITE_DEFAULT 0u
#define WAIT_GEQ 0u

/* Answers that are no CUresult (those are all >= 0). */
#define NOT_CURRENT (-1)
#define NOT_BOUND (-2)

/* Every driver call here lets the GIL go, as cuda.bindings does. Any of them
 * may block: an enqueue while the stream's launch queue is full, a copy from
 * or into pageable memory until its data is staged or has landed. And what
 * the driver waits for may need the GIL: a host function on the stream (the
 * "hostfunc" completion strategy) is Python. Holding the GIL across such a
 * call deadlocked the GPU suite's cancellation storm on that strategy (issue
 * 13, run DU). Letting it go and taking it back costs about 0.1 us. */

static int arg_u64(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int arg_ptr(PyObject *o, void **out)
{
    uint64_t v;
    if (arg_u64(o, &v))
        return -1;
    *out = (void *)(uintptr_t)v;
    return 0;
}

/* Whether a call may go ahead: 0 where fn is bound and ctx is the calling
 * thread's current context; else the answer to give, NOT_BOUND, or
 * NOT_CURRENT where another context (or none) is current or the driver could
 * not say (the slow path then reports what is wrong). */
static int blocked(const void *fn, void *ctx)
{
    if (fn == NULL || p_ctx_get_current == NULL)
        return NOT_BOUND;
    void *cur = NULL;
    if (p_ctx_get_current(&cur) != 0 || cur != ctx)
        return NOT_CURRENT;
    return 0;
}

static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *what)
{
    if (nargs == want)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", what, want, nargs);
    return 0;
}

/* bind(ctx_get_current, memcpy_async, event_record, event_query
 *      [, write_value32, wait_value32]): the addresses of cuCtxGetCurrent,
 * cuMemcpyAsync, cuEventRecord and cuEventQuery, and optionally of
 * cuStreamWriteValue32 and cuStreamWaitValue32 (for gated(); 0: none). Any of
 * the first four 0 unbinds all. */
static PyObject *py_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 && nargs != 6) {
        PyErr_Format(PyExc_TypeError,
                     "bind(ctx_get_current, memcpy_async, event_record, event_query"
                     "[, write_value32, wait_value32]) takes 4 or 6 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    void *p[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (arg_ptr(args[i], &p[i]))
            return NULL;
    if (!p[0] || !p[1] || !p[2] || !p[3]) {
        p_ctx_get_current = NULL;
        p_memcpy_async = NULL;
        p_event_record = NULL;
        p_event_query = NULL;
        p_write_value32 = NULL;
        p_wait_value32 = NULL;
        Py_RETURN_FALSE;
    }
    p_ctx_get_current = (ctx_get_current_fn)p[0];
    p_memcpy_async = (memcpy_async_fn)p[1];
    p_event_record = (event_record_fn)p[2];
    p_event_query = (event_query_fn)p[3];
    p_write_value32 = (p[4] && p[5]) ? (write_value32_fn)p[4] : NULL;
    p_wait_value32 = (p[4] && p[5]) ? (wait_value32_fn)p[5] : NULL;
    Py_RETURN_TRUE;
}

/* memcpy(ctx, dst, src, nbytes, stream) -> int: cuMemcpyAsync on stream,
 * whose context is ctx. */
static PyObject *py_memcpy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 5, "memcpy(ctx, dst, src, nbytes, stream)"))
        return NULL;
    void *ctx, *stream;
    uint64_t dst, src;
    if (arg_ptr(args[0], &ctx) || arg_u64(args[1], &dst) || arg_u64(args[2], &src))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[3]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "memcpy: nbytes must not be negative");
        return NULL;
    }
    if (arg_ptr(args[4], &stream))
        return NULL;
    int err = blocked((const void *)(uintptr_t)p_memcpy_async, ctx);
    if (err)
        return PyLong_FromLong(err);
    Py_BEGIN_ALLOW_THREADS
    err = p_memcpy_async(dst, src, (size_t)n, stream);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

/* record(ctx, event, stream) -> int: cuEventRecord. */
static PyObject *py_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 3, "record(ctx, event, stream)"))
        return NULL;
    void *ctx, *event, *stream;
    if (arg_ptr(args[0], &ctx) || arg_ptr(args[1], &event) || arg_ptr(args[2], &stream))
        return NULL;
    int err = blocked((const void *)(uintptr_t)p_event_record, ctx);
    if (err)
        return PyLong_FromLong(err);
    Py_BEGIN_ALLOW_THREADS
    err = p_event_record(event, stream);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

/* query(ctx, event) -> int: cuEventQuery (0: done, CUDA_ERROR_NOT_READY:
 * not yet). */
static PyObject *py_query(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 2, "query(ctx, event)"))
        return NULL;
    void *ctx, *event;
    if (arg_ptr(args[0], &ctx) || arg_ptr(args[1], &event))
        return NULL;
    int err = blocked((const void *)(uintptr_t)p_event_query, ctx);
    if (err)
        return PyLong_FromLong(err);
    Py_BEGIN_ALLOW_THREADS
    err = p_event_query(event);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

/* The most chunks gated() takes (gpuaio._engine.gated.GATED_CHUNKS is 4). */
#define GATED_MAX_CHUNKS 16

/* Which call of gated() failed, in the answer's bits 16 and up. */
#define STEP_MEMCPY 1
#define STEP_WRITE 2
#define STEP_WAIT 3

static int u64_list(PyObject *o, uint64_t *out, Py_ssize_t max, Py_ssize_t *n, const char *what)
{
    if (!PyList_Check(o)) {
        PyErr_Format(PyExc_TypeError, "gated: %s must be a list", what);
        return -1;
    }
    *n = PyList_GET_SIZE(o);
    if (*n > max) {
        PyErr_Format(PyExc_ValueError, "gated: at most %zd %s", max, what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++)
        if (arg_u64(PyList_GET_ITEM(o, i), &out[i]))
            return -1;
    return 0;
}

/* The parts of gated(): an upload's (per chunk a wait for its flag, then
 * its copy); a download's DMAs (per chunk its copy into its block, then a
 * write of its ready word); a download's waits (for each chunk's flag). A
 * download enqueues its waits only once its copy-outs are posted: a wait
 * whose flag no running thread will set would deadlock the enqueueing
 * thread's next driver call against any device-wide synchronization in
 * between, a cuMemFree on another thread (issue 13, run EG's GPU suite). */
#define PART_UP 0
#define PART_DOWN_DMAS 1
#define PART_DOWN_WAITS 2

/* gated(ctx, stream, part, device_ptr, blocks, nbytes, chunk, flags) -> int:
 * a part (PART_*) of a gated copy's stream work (Backend.enqueue_gated says
 * what), all of it with the GIL let go once. Answers 0, NOT_CURRENT or
 * NOT_BOUND (nothing done), or the first failing call's CUresult plus its
 * step (STEP_*) times 65536 (what came before it enqueued). Through
 * cuda.bindings these were six calls from Python for a 4 MiB download, 2-10
 * us each on the loop's thread (issue 13, run ED). */
static PyObject *py_gated(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 8, "gated(ctx, stream, part, device_ptr, blocks, nbytes, chunk, flags)"))
        return NULL;
    void *ctx, *stream;
    uint64_t dev, nbytes, chunk;
    uint64_t blocks[GATED_MAX_CHUNKS], flags[2 * GATED_MAX_CHUNKS];
    Py_ssize_t nblocks, nflags;
    if (arg_ptr(args[0], &ctx) || arg_ptr(args[1], &stream))
        return NULL;
    long part = PyLong_AsLong(args[2]);
    if ((part == -1 && PyErr_Occurred()) || arg_u64(args[3], &dev) ||
        arg_u64(args[5], &nbytes) || arg_u64(args[6], &chunk))
        return NULL;
    if (part != PART_UP && part != PART_DOWN_DMAS && part != PART_DOWN_WAITS) {
        PyErr_SetString(PyExc_ValueError, "gated: part must be 0, 1 or 2");
        return NULL;
    }
    int up = part == PART_UP;
    if (u64_list(args[4], blocks, GATED_MAX_CHUNKS, &nblocks, "blocks") ||
        u64_list(args[7], flags, 2 * GATED_MAX_CHUNKS, &nflags, "flags"))
        return NULL;
    if (chunk == 0 || nblocks != (Py_ssize_t)((nbytes + chunk - 1) / chunk) ||
        nflags != (up ? nblocks : 2 * nblocks)) {
        PyErr_SetString(PyExc_ValueError,
                        "gated: blocks must cover nbytes in chunks, with one flag per chunk "
                        "(an upload) or two (a download)");
        return NULL;
    }
    if (p_write_value32 == NULL || p_wait_value32 == NULL)
        return PyLong_FromLong(NOT_BOUND);
    int err = blocked((const void *)(uintptr_t)p_memcpy_async, ctx);
    if (err)
        return PyLong_FromLong(err);
    long answer = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; part != PART_DOWN_WAITS && k < nblocks && answer == 0; k++) {
        uint64_t off = (uint64_t)k * chunk;
        size_t ln = (size_t)(nbytes - off < chunk ? nbytes - off : chunk);
        if (up) {
            if ((err = p_wait_value32(stream, flags[k], 1u, WAIT_GEQ)) != 0)
                answer = err + STEP_WAIT * 65536L;
            else if ((err = p_memcpy_async(dev + off, blocks[k], ln, stream)) != 0)
                answer = err + STEP_MEMCPY * 65536L;
        } else {
            if ((err = p_memcpy_async(blocks[k], dev + off, ln, stream)) != 0)
                answer = err + STEP_MEMCPY * 65536L;
            else if ((err = p_write_value32(stream, flags[2 * k], 1u, WRITE_DEFAULT)) != 0)
                answer = err + STEP_WRITE * 65536L;
        }
    }
    for (Py_ssize_t k = 0; part == PART_DOWN_WAITS && k < nblocks && answer == 0; k++)
        if ((err = p_wait_value32(stream, flags[2 * k + 1], 1u, WAIT_GEQ)) != 0)
            answer = err + STEP_WAIT * 65536L;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(answer);
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)(void (*)(void))py_bind, METH_FASTCALL,
     "bind(ctx_get_current, memcpy_async, event_record, event_query[, write_value32, "
     "wait_value32]) -> bool: the driver functions' addresses; any of the first four 0 "
     "unbinds all."},
    {"gated", (PyCFunction)(void (*)(void))py_gated, METH_FASTCALL,
     "gated(ctx, stream, part, device_ptr, blocks, nbytes, chunk, flags) -> int: a part of a "
     "gated copy's stream work (0 an upload's, 1 a download's DMAs, 2 its waits); 0, "
     "NOT_CURRENT or NOT_BOUND (nothing done), or the failing call's CUresult + 65536 * its "
     "step (1 copy, 2 write, 3 wait)."},
    {"memcpy", (PyCFunction)(void (*)(void))py_memcpy, METH_FASTCALL,
     "memcpy(ctx, dst, src, nbytes, stream) -> int: cuMemcpyAsync's CUresult, or "
     "NOT_CURRENT or NOT_BOUND (nothing done)."},
    {"record", (PyCFunction)(void (*)(void))py_record, METH_FASTCALL,
     "record(ctx, event, stream) -> int: cuEventRecord's CUresult, or NOT_CURRENT or NOT_BOUND."},
    {"query", (PyCFunction)(void (*)(void))py_query, METH_FASTCALL,
     "query(ctx, event) -> int: cuEventQuery's CUresult, or NOT_CURRENT or NOT_BOUND."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcalls",
    "cuMemcpyAsync, cuEventRecord, cuEventQuery and a gated copy's stream work through the "
    "driver's function pointers, each behind a check of the current context "
    "(gpuaio.backends.cuda._fast).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fastcalls(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NOT_CURRENT", NOT_CURRENT) ||
        PyModule_AddIntConstant(m, "NOT_BOUND", NOT_BOUND)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
