/* Where the completion watcher waits without the GIL: the native parker of
 * gpuaio/_engine/completion/_rest.py (which drives it through ctypes).
 *
 * Why: a Python thread that wakes from a timed wait needs the GIL back. If
 * an event loop is busy then, it asks at each of the loop's brief releases
 * (every driver call, every I/O poll), is woken by each, and loses to the
 * loop, which retakes the GIL at once: CPython restarts its 5 ms switch
 * interval whenever the waiter is woken, so it may wait for as long as the
 * loop stays busy, and every release of the loop pays to wake it. On the
 * CPU machine a release cost 15-20 us instead of 0.6 us beside such a
 * thread (tools/gil_tax_probe.py, issue 13, rounds 26-27). So the watcher,
 * while loops poll for their own ops or while nothing is pending, waits
 * here: it looks at the loops' stamp and the "need" word every few
 * milliseconds without Python, and only returns, and asks for the GIL, when
 * there is work for it.
 *
 * The words are doubles in memory that Python writes (an array('d')):
 * cell[0], until when loops are taken to poll (time.perf_counter, which is
 * CLOCK_MONOTONIC on Linux: _rest.py checks, and falls back to Python
 * otherwise), cell[1], non-zero while an op may be pending that no loop
 * polls for, and cell[2], when an op was last watched. Aligned 8-byte loads are single loads on every platform
 * CPython builds this for; a stale read costs one more look.
 *
 * No Python API is used except the module's (empty) init function. In a
 * forked child (no watcher thread was inherited, the mutex may be held)
 * every call on an inherited parker does nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__GNUC__)
#define GPK_EXPORT __attribute__((visibility("default")))
#else
#define GPK_EXPORT
#endif

typedef struct gpk_parker {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* on CLOCK_MONOTONIC */
    int flag;          /* unparked since the last park returned */
    pid_t pid;
} gpk_parker;

enum { GPK_DEADLINE = 0, GPK_UNPARKED = 1, GPK_NEEDED = 2, GPK_FORKED = -1 };

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The clock park() compares the stamps with, for the check in _rest.py. */
GPK_EXPORT double gpk_now(void) { return now_s(); }

GPK_EXPORT gpk_parker *gpk_new(void)
{
    gpk_parker *p = calloc(1, sizeof *p);
    pthread_condattr_t attr;
    if (p == NULL)
        return NULL;
    if (pthread_condattr_init(&attr) != 0) {
        free(p);
        return NULL;
    }
    if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&p->cv, &attr) != 0) {
        pthread_condattr_destroy(&attr);
        free(p);
        return NULL;
    }
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&p->mu, NULL);
    p->pid = getpid();
    return p;
}

/* Free it; its watcher has returned from park() for good. */
GPK_EXPORT void gpk_free(gpk_parker *p)
{
    if (p == NULL || p->pid != getpid())
        return;
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* Wake the parked watcher, or make its next park() return at once. */
GPK_EXPORT void gpk_unpark(gpk_parker *p)
{
    if (p->pid != getpid())
        return;
    pthread_mutex_lock(&p->mu);
    p->flag = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

/* Wait until unparked (GPK_UNPARKED), until cell[1] is set while the
 * clock has passed cell[0] (GPK_NEEDED), or until the clock passes
 * ``deadline`` or, while cell[1] is clear, ``idle_s`` after cell[2]
 * (GPK_DEADLINE). While cell[1] is clear it looks again after ``check_s``,
 * twice as long each time up to ``check_max_s``; while it is set, when
 * cell[0] is due (loops push it on as they poll), but at least ``min_s``
 * apart. */
GPK_EXPORT int gpk_park(gpk_parker *p, const volatile double *cell, double deadline,
                        double idle_s, double check_s, double check_max_s, double min_s)
{
    int result = GPK_DEADLINE;
    double look = check_s;
    if (p->pid != getpid())
        return GPK_FORKED;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (p->flag) {
            p->flag = 0;
            result = GPK_UNPARKED;
            break;
        }
        double now = now_s(), until = cell[0], target;
        int need = cell[1] != 0.0;
        if (need && now >= until) {
            result = GPK_NEEDED;
            break;
        }
        double end = need ? deadline : cell[2] + idle_s; /* idle: nothing pends */
        if (end > deadline)
            end = deadline;
        if (now >= end)
            break;
        if (need) {
            look = check_s;
            target = until > now + min_s ? until : now + min_s;
        } else {
            target = now + look;
            look = look * 2 < check_max_s ? look * 2 : check_max_s;
        }
        if (target > end)
            target = end;
        if (!(target < now + 3600.0)) /* a deadline of inf, or NaN: look hourly */
            target = now + 3600.0;
        struct timespec ts;
        ts.tv_sec = (time_t)target;
        ts.tv_nsec = (long)((target - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec += 1;
            ts.tv_nsec -= 1000000000L;
        }
        int rc = pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        if (rc != 0 && rc != ETIMEDOUT && rc != EINTR)
            break; /* cannot wait: let the caller look */
    }
    pthread_mutex_unlock(&p->mu);
    return result;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_parker",
    "The completion watcher's wait without the GIL, used through ctypes by "
    "gpuaio._engine.completion._rest.", -1, NULL,
};

PyMODINIT_FUNC PyInit__parker(void) { return PyModule_Create(&module); }
