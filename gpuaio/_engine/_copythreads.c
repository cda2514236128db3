/* Copy threads that never take the GIL: the native engine of gpuaio's sliced
 * host copies (gpuaio/_engine/nativecopy.py drives it through ctypes).
 *
 * Why: a staged transfer's host copies run on a pool of threads. As Python
 * threads, each slice is a return to Python: a woken thread needs the GIL to
 * leave its queue and reach its memmove, and gets it in turn, so on an H200
 * host twelve copy threads started 30-60 us apart, and the stream thread's
 * DMA calls came back 180-880 us late, queued for the GIL behind the copy
 * threads (issue 13, runs BH-BM). These threads claim and copy slices and
 * report them copied without Python; callers wait in a ctypes call, which
 * releases the GIL.
 *
 * The semantics are those of hostwork.SlicedCopy: a copy is cut into slices
 * of ``step`` bytes, claimed front to back by the pool's threads; a thread
 * that runs out of slices takes the next copy in the pool's queue. Waiters
 * ask for a copied prefix (gcp_wait_prefix) or for the slices copied since
 * their last call, in any order (gcp_take); gcp_stop lets no thread claim
 * another slice of a copy and returns once none copies any.
 *
 * Gated copies (gpuaio/_engine/gated.py) talk to a GPU stream through flag
 * words in pinned memory: a copy may set a word once it has ended
 * (gcp_submit_copy_flag), for the stream to wait on (cuStreamWaitValue32),
 * and may wait for a word the stream sets (cuStreamWriteValue32) before its
 * first slice (gcp_submit_copy_gated). Such a copy waits with a watcher
 * thread, never in the queue: copy threads never wait for a GPU. While such
 * copies are held, up to a set number of idle copy threads may spin instead
 * of sleeping (gcp_pool_spin), bounded in time, so that a copy is started as
 * soon as the watcher queues it, not after a thread's wake-up.
 *
 * No Python API is used except the module's init function and copy(), a
 * plain memmove for small copies on the calling thread (py_copy below), so
 * that the build can make this an extension module beside the package's
 * others.
 * One mutex guards every pool and copy: a slice is megabytes (hundreds of
 * microseconds of memcpy), so it is taken a few times per slice at most.
 * In a forked child (no threads were inherited, the mutex may be held) every
 * call on an inherited pool or copy does nothing, leaking it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define GCP_NT 1
#else
#define GCP_NT 0
#endif

#if defined(__GNUC__)
#define GCP_EXPORT __attribute__((visibility("default")))
#else
#define GCP_EXPORT
#endif

/* Adaptive where glibc has it: a thread that finds mu taken spins a moment
 * before it sleeps in the kernel. mu is held for a few hundred nanoseconds
 * at a time (the watcher's scan, a slice's claim), and a sleep on it costs
 * the event loop's thread a wake-up. On an H100 host submitting a gated copy
 * took 6-16 us while the watcher polled (issue 13, run EE), the same call 2-3
 * us on an idle CPU machine; contention for mu is a suspect, not measured
 * apart. */
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
static pthread_mutex_t mu = PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP;
#else
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
#endif

typedef struct gcp_copy gcp_copy;

typedef struct gcp_pool {
    pthread_cond_t work; /* a copy was queued, or the pool closes */
    pthread_t *threads;
    int nthreads, started;
    int nice;          /* raise each thread's nice value by this much */
    uint64_t piece;    /* >0: copy a slice in pieces of this size, yielding between */
    int closing;
    pid_t pid;
    gcp_copy *head, *tail; /* copies with slices left to claim */
    /* Gated copies (gcp_submit_copy_gated): held here, not in the queue,
     * until their ready word is set; one watcher thread looks. */
    gcp_copy *gated;
    pthread_cond_t gate;   /* a gated copy was added, or the pool closes */
    pthread_t watcher;
    int watching;          /* the watcher thread was started */
    uint64_t gated_at;     /* when the last gated copy was added (now_ns) */
    /* Spinning copy threads (gcp_pool_spin): while gated copies are held,
     * up to ``spinners`` idle threads poll ``stirs`` instead of sleeping,
     * for at most ``spin_ns`` after the last gated copy was added. */
    uint64_t spin_ns;
    uint64_t spin_woken;   /* the gated_at the watcher last woke spinners for */
    int spinners, spinning;
    uint64_t stirs;        /* bumped when a copy is queued, a held one dropped or the
                            * pool closes (atomic): what spinning threads poll */
    /* Warmed threads (gcp_pool_warm): until then every idle thread spins, a
     * copy being due (a download's first chunk, once its DMA lands). */
    uint64_t warm_until;
} gcp_pool;

struct gcp_copy {
    gcp_copy *next;
    pthread_cond_t cv; /* a slice was copied, or a thread stopped copying */
    char *dst;
    const char *src;
    uint64_t nbytes, step;
    uint32_t count, claimed, prefix;
    uint32_t active;  /* threads copying a slice of it now */
    uint32_t nfresh;  /* slices copied, not yet handed out by gcp_take */
    uint32_t waiters;
    int stop;
    int nt;           /* copy with non-temporal stores (copy_nt) */
    int refs;         /* the caller's handle, the queue, each active slice */
    pid_t pid;
    uint64_t fresh_bytes, taken;
    uint32_t *flag;   /* set to 1 once the copy has ended (gcp_submit_copy_flag) */
    const uint32_t *ready; /* gated: no slice is claimed before this is non-zero */
    uint8_t *done;
    uint32_t *fresh;
};

static void copy_free(gcp_copy *c) /* its cv initialized */
{
    pthread_cond_destroy(&c->cv);
    free(c->done);
    free(c->fresh);
    free(c);
}

static void copy_unref(gcp_copy *c) /* under mu */
{
    if (--c->refs == 0)
        copy_free(c);
}

static void copy_plain(char *dst, const char *src, uint64_t n) { memmove(dst, src, n); }

/* Copy with non-temporal stores where the CPU has them (x86-64: SSE2), so
 * that the destination's lines go to memory instead of staying dirty in the
 * CPU's caches. For a pinned staging block the GPU reads next, that is the
 * point: a DMA that reads lines still dirty in the caches must have each
 * one snooped out of them, and on an H200 host a 1 MiB DMA just after a
 * memmove into its block took twice as long as one from a block not just
 * written (issue 13, run CS). The stores also skip reading the destination
 * before writing it. The fence makes them visible before whatever the
 * caller does next (reporting a slice copied, enqueueing its DMA). The
 * regions must not overlap. Elsewhere: memmove. */
static void copy_nt(char *dst, const char *src, uint64_t n)
{
#if GCP_NT
    if (n < 256) {
        memmove(dst, src, n);
        return;
    }
    uint64_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head) {
        memmove(dst, src, head);
        dst += head;
        src += head;
        n -= head;
    }
    uint64_t body = n & ~(uint64_t)63;
    for (uint64_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    if (n > body)
        memmove(dst + body, src + body, n - body);
    _mm_sfence();
#else
    memmove(dst, src, n);
#endif
}

/* One copy, on the calling thread, through copy_nt (the staging of a small
 * upload on the thread that makes it). */
GCP_EXPORT void gcp_copy_nt(uintptr_t dst, uintptr_t src, uint64_t n)
{
    copy_nt((char *)dst, (const char *)src, n);
}

/* Whether gcp_copy_nt uses non-temporal stores on this platform. */
GCP_EXPORT int gcp_has_nt(void) { return GCP_NT; }

static void copy_bytes(gcp_pool *p, char *dst, const char *src, uint64_t n, int nt)
{
    void (*copy)(char *, const char *, uint64_t) = nt ? copy_nt : copy_plain;
    if (p->piece == 0 || n <= p->piece) {
        copy(dst, src, n);
        return;
    }
    /* Few cores: give the CPU up between pieces, so that a waking event
     * loop thread need not wait for a whole scheduler time slice. */
    for (uint64_t off = 0; off < n; off += p->piece) {
        uint64_t ln = n - off < p->piece ? n - off : p->piece;
        copy(dst + off, src + off, ln);
        sched_yield();
    }
}

/* Store 1 to the copy's flag once no slice is left to copy or being copied
 * (under mu): every slice copied, or the copy stopped. The release store
 * comes after the slices' stores (copy_nt fenced its own), so whoever sees
 * the flag, a GPU stream waiting on it included (cuStreamWaitValue32), sees
 * the data. Stopped short, the destination is incomplete: only an abort
 * stops a flagged copy, and the flag must still come, or a stream waiting
 * on it would wait for ever. */
static void signal_if_ended(gcp_copy *c)
{
    if (c->flag != NULL && c->active == 0 && (c->stop || c->prefix >= c->count)) {
        __atomic_store_n(c->flag, 1u, __ATOMIC_RELEASE);
        c->flag = NULL;
    }
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void cpu_relax(void)
{
#if GCP_NT
    for (int i = 0; i < 32; i++)
        _mm_pause();
#else
    sched_yield();
#endif
}

/* Until when an idle copy thread may spin, 0 if not at all (under mu): while
 * the pool is warm (gcp_pool_warm), or while gated copies are held, fewer
 * than ``spinners`` threads spin and the last gated copy came less than
 * ``spin_ns`` ago (gcp_pool_spin). */
static uint64_t spin_until(const gcp_pool *p, uint64_t now)
{
    if (p->closing)
        return 0;
    uint64_t until = p->warm_until > now ? p->warm_until : 0;
    if (p->spinners > 0 && p->gated != NULL && p->spinning < p->spinners &&
        now - p->gated_at < p->spin_ns && p->gated_at + p->spin_ns > until)
        until = p->gated_at + p->spin_ns;
    return until;
}

/* Spin, mu let go, until a copy is queued or a held one dropped, the pool
 * closes or ``until`` (spin_until); then take mu back (held on entry and on
 * return). A held gated copy's ready word is set by its stream once a DMA
 * has landed, tens of microseconds after the copy was submitted: a thread
 * asleep on the condition variable starts its copy-out only after waking,
 * a spinning one at once (issue 13, run EE: a 2 MiB chunk's copy-out ended
 * 66-76 us after its ready word with 12 spinning, 102-112 with none). */
static void spin_for_work(gcp_pool *p, uint64_t until)
{
    uint64_t seen = __atomic_load_n(&p->stirs, __ATOMIC_ACQUIRE);
    p->spinning++;
    pthread_mutex_unlock(&mu);
    while (__atomic_load_n(&p->stirs, __ATOMIC_ACQUIRE) == seen && now_ns() < until)
        cpu_relax();
    pthread_mutex_lock(&mu);
    p->spinning--;
}

static void *run(void *arg)
{
    gcp_pool *p = (gcp_pool *)arg;
#ifdef __linux__
    if (p->nice > 0) {
        /* Linux: PRIO_PROCESS with a thread id sets that thread's nice. */
        pid_t tid = (pid_t)syscall(SYS_gettid);
        errno = 0;
        int now = getpriority(PRIO_PROCESS, (id_t)tid);
        if (errno == 0)
            (void)setpriority(PRIO_PROCESS, (id_t)tid, now + p->nice);
    }
#endif
    pthread_mutex_lock(&mu);
    for (;;) {
        gcp_copy *c = p->head;
        if (c == NULL) {
            if (p->closing)
                break;
            uint64_t until = spin_until(p, now_ns());
            if (until)
                spin_for_work(p, until);
            else
                pthread_cond_wait(&p->work, &mu);
            continue;
        }
        if (c->stop || c->claimed >= c->count) {
            /* Nothing left to claim: out of the queue. */
            p->head = c->next;
            if (p->head == NULL)
                p->tail = NULL;
            c->next = NULL;
            copy_unref(c);
            continue;
        }
        uint32_t k = c->claimed++;
        c->active++;
        c->refs++;
        pthread_mutex_unlock(&mu);
        uint64_t off = (uint64_t)k * c->step;
        uint64_t ln = c->nbytes - off < c->step ? c->nbytes - off : c->step;
        copy_bytes(p, c->dst + off, c->src + off, ln, c->nt);
        pthread_mutex_lock(&mu);
        c->active--;
        c->done[k] = 1;
        while (c->prefix < c->count && c->done[c->prefix])
            c->prefix++;
        c->fresh[c->nfresh++] = k;
        c->fresh_bytes += ln;
        signal_if_ended(c);
        if (c->waiters)
            pthread_cond_broadcast(&c->cv);
        copy_unref(c);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* fork() while a copy thread or the watcher holds mu (each takes it for a
 * slice's claim or a scan, many times a millisecond while copies run) leaves
 * the child a mutex locked for ever: a fresh pool there hangs at its first
 * copy. A child of tests/test_fork.py hung so in CI's compiled session
 * (round 37; its stack, dumped before the kill, ended in its first submit),
 * and tests/test_native_copy.py makes it happen by forking while the
 * watcher polls. So the forking thread takes mu first, and parent and child
 * let it go: the child's mu is free, and its inherited pools and copies
 * refuse work by their pid. */
static void fork_prepare(void) { pthread_mutex_lock(&mu); }
static void fork_release(void) { pthread_mutex_unlock(&mu); }
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_hooks(void) { (void)pthread_atfork(fork_prepare, fork_release, fork_release); }

/* A pool of ``nthreads`` copy threads, started at its first copy. */
GCP_EXPORT gcp_pool *gcp_pool_new(int nthreads, int nice, uint64_t piece)
{
    (void)pthread_once(&fork_once, fork_hooks);
    gcp_pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->threads = calloc((size_t)(nthreads > 0 ? nthreads : 1), sizeof *p->threads);
    if (p->threads == NULL || pthread_cond_init(&p->work, NULL) != 0) {
        free(p->threads);
        free(p);
        return NULL;
    }
    if (pthread_cond_init(&p->gate, NULL) != 0) {
        pthread_cond_destroy(&p->work);
        free(p->threads);
        free(p);
        return NULL;
    }
    p->nthreads = nthreads > 0 ? nthreads : 1;
    p->nice = nice;
    p->piece = piece;
    p->pid = getpid();
    return p;
}

/* Let up to ``spinners`` idle copy threads spin, for at most ``spin_us``
 * microseconds after a gated copy was submitted, while gated copies are
 * held (0 either way: none spins, the default). */
GCP_EXPORT void gcp_pool_spin(gcp_pool *p, int spinners, uint64_t spin_us)
{
    pthread_mutex_lock(&mu);
    p->spinners = spinners > 0 ? spinners : 0;
    p->spin_ns = spin_us * 1000u;
    pthread_mutex_unlock(&mu);
}

/* Warm the pool for ``warm_us`` microseconds: its idle threads are woken now
 * and spin until then, or until a copy is queued, rather than sleep. For a
 * copy that is due but cannot start yet (a staged download's first chunk,
 * whose DMA lasts 100-300 us): a sleeping thread starts a queued copy only
 * after the kernel woke it, and twelve of them wake tens of microseconds
 * apart; warmed, they are awake and polling when the copy comes. The
 * caller's thread pays the wake-ups (a system call per thread woken), not
 * the one that queues the copy. Nothing if the pool has no thread yet or
 * closes, or if copies are queued (its threads are busy). Returns whether
 * it warmed the pool. */
GCP_EXPORT int gcp_pool_warm(gcp_pool *p, uint64_t warm_us)
{
    if (p->pid != getpid())
        return 0;
    pthread_mutex_lock(&mu);
    int warmed = !p->closing && p->started > 0 && p->head == NULL;
    if (warmed) {
        uint64_t until = now_ns() + warm_us * 1000u;
        if (until > p->warm_until)
            p->warm_until = until;
        pthread_cond_broadcast(&p->work);
    }
    pthread_mutex_unlock(&mu);
    return warmed;
}

/* How many copy threads spin now (tests). */
GCP_EXPORT int gcp_pool_spinning(gcp_pool *p)
{
    pthread_mutex_lock(&mu);
    int n = p->spinning;
    pthread_mutex_unlock(&mu);
    return n;
}

/* Put ``c`` (its queue reference held) at the end of the pool's queue: under
 * mu. The caller wakes the threads (wake_locked), once for all it queued. */
static void queue_locked(gcp_pool *p, gcp_copy *c)
{
    c->next = NULL;
    if (p->tail)
        p->tail->next = c;
    else
        p->head = c;
    p->tail = c;
    p->warm_until = 0; /* the copy that was due came (gcp_pool_warm) */
    __atomic_add_fetch(&p->stirs, 1, __ATOMIC_RELEASE);
}

/* Wake the sleeping copy threads (spinning ones see ``stirs``): a system
 * call that costs the calling thread more the more threads it wakes (issue
 * 13, run EF: twelve signals from the event loop's thread took 40 us), which
 * is why a gated copy's caller leaves the spinners' wake-up to the watcher.
 * Under mu. */
static void wake_locked(gcp_pool *p)
{
    pthread_cond_broadcast(&p->work);
}

/* How long the watcher polls without sleeping after a gated copy was added
 * or released (a mid-size DMA lasts tens of microseconds), and how long it
 * sleeps between polls after that (with a 1 us timer slack). */
#define GATE_SPIN_NS 200000u
#define GATE_SLEEP_NS 20000

/* The watcher: moves each gated copy whose ready word is set into the
 * queue, and drops those stopped (their flags set). It never copies, and no
 * copy thread ever waits for a ready word: a copy that a GPU stream waits
 * for is never queued behind one that waits for a GPU stream, so none can
 * wait for the other in a cycle. While gated copies are held it polls,
 * spinning for GATE_SPIN_NS after the last one came or went, then every
 * GATE_SLEEP_NS; with none held it sleeps on the pool's gate. When the pool
 * closes it stops those still held: their flags are set, their bytes not
 * copied (the runtime closing, nobody reads them). */
static void *watch(void *arg)
{
    gcp_pool *p = (gcp_pool *)arg;
#ifdef __linux__
    (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
#endif
    uint64_t last = now_ns();
    pthread_mutex_lock(&mu);
    for (;;) {
        if (p->gated == NULL) {
            if (p->closing)
                break;
            pthread_cond_wait(&p->gate, &mu);
            continue;
        }
        /* New gated copies: the idle threads that may spin start now, while
         * the DMAs run (woken here, not by the submitting thread). */
        int wake = p->spinners > p->spinning && p->gated_at > p->spin_woken;
        p->spin_woken = p->gated_at;
        gcp_copy **at = &p->gated;
        while (*at != NULL) {
            gcp_copy *c = *at;
            if (c->stop || p->closing) {
                *at = c->next;
                c->next = NULL;
                c->stop = 1;
                signal_if_ended(c);
                if (c->waiters)
                    pthread_cond_broadcast(&c->cv);
                copy_unref(c);
                __atomic_add_fetch(&p->stirs, 1, __ATOMIC_RELEASE); /* spinners look again */
            } else if (__atomic_load_n(c->ready, __ATOMIC_ACQUIRE) != 0) {
                *at = c->next;
                queue_locked(p, c);
                wake = 1;
                last = now_ns();
            } else {
                at = &c->next;
            }
        }
        if (wake)
            wake_locked(p);
        if (p->gated == NULL)
            continue;
        if (p->gated_at > last)
            last = p->gated_at;
        pthread_mutex_unlock(&mu);
        if (now_ns() - last < GATE_SPIN_NS) {
            cpu_relax();
        } else {
            struct timespec ts = {0, GATE_SLEEP_NS};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

static int start_threads(gcp_pool *p) /* under mu */
{
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return -1;
    (void)pthread_attr_setstacksize(&attr, 256 << 10);
    while (p->started < p->nthreads) {
        if (pthread_create(&p->threads[p->started], &attr, run, p) != 0)
            break;
        p->started++;
    }
    pthread_attr_destroy(&attr);
    return p->started > 0 ? 0 : -1;
}

/* A copy's record, its caller's handle its one reference, not yet posted
 * (post_locked): no thread sees it. NULL where memory ran out. */
static gcp_copy *copy_new(pid_t pid, uintptr_t dst, uintptr_t src, uint64_t nbytes,
                          uint64_t step, int nt, uintptr_t flag, uintptr_t ready)
{
    uint64_t count = nbytes ? (nbytes + step - 1) / step : 0;
    if (step == 0 || count > UINT32_MAX)
        return NULL;
    gcp_copy *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->done = calloc(count ? count : 1, 1);
    c->fresh = calloc(count ? count : 1, sizeof *c->fresh);
    if (c->done == NULL || c->fresh == NULL || pthread_cond_init(&c->cv, NULL) != 0) {
        free(c->done);
        free(c->fresh);
        free(c);
        return NULL;
    }
    c->dst = (char *)dst;
    c->src = (const char *)src;
    c->nbytes = nbytes;
    c->step = step;
    c->nt = nt;
    c->count = (uint32_t)count;
    c->pid = pid;
    c->refs = 1;
    c->flag = (uint32_t *)flag;
    c->ready = (const uint32_t *)ready;
    return c;
}

/* Whether the pool takes copies (gated ones too, if ``gated``): its threads
 * (and watcher) started now if they were not. Under mu. */
static int open_locked(gcp_pool *p, int gated)
{
    if (p->closing || p->pid != getpid() || (p->started == 0 && start_threads(p) != 0))
        return 0;
    if (gated && !p->watching) {
        if (pthread_create(&p->watcher, NULL, watch, p) != 0)
            return 0;
        p->watching = 1;
    }
    return 1;
}

/* Hand a copy from copy_new to the threads: held for its ready word (the
 * watcher queues it once that is set) or queued now; returns 1 if queued
 * (the caller then wakes the threads, wake_locked). A pool closed meanwhile
 * takes none: the copy is stopped, its flag set, nothing copied (as a copy
 * held when the pool closes). Under mu. */
static int post_locked(gcp_pool *p, gcp_copy *c)
{
    if (p->closing || p->pid != getpid())
        c->stop = 1;
    signal_if_ended(c); /* stopped, or nothing to copy */
    if (c->stop || c->count == 0)
        return 0;
    c->refs++;
    if (c->ready != NULL) {
        c->next = p->gated;
        p->gated = c;
        p->gated_at = now_ns();
        pthread_cond_signal(&p->gate); /* no system call while the watcher polls */
        return 0;
    }
    queue_locked(p, c);
    return 1; /* the caller wakes the threads */
}

/* gcp_submit_copy_flag and gcp_submit_copy_gated (``ready`` not 0). */
static gcp_copy *submit(gcp_pool *p, uintptr_t dst, uintptr_t src, uint64_t nbytes,
                        uint64_t step, int nt, uintptr_t flag, uintptr_t ready)
{
    if (p->pid != getpid())
        return NULL;
    gcp_copy *c = copy_new(p->pid, dst, src, nbytes, step, nt, flag, ready);
    if (c == NULL)
        return NULL;
    pthread_mutex_lock(&mu);
    if (!open_locked(p, ready != 0)) {
        pthread_mutex_unlock(&mu);
        copy_free(c);
        return NULL;
    }
    if (post_locked(p, c))
        wake_locked(p);
    pthread_mutex_unlock(&mu);
    return c;
}

/* Queue a copy of ``nbytes`` from ``src`` to ``dst`` in slices of ``step``
 * bytes, with non-temporal stores if ``nt`` (copy_nt); then, if ``flag`` is
 * not 0, store the uint32 1 at that address once the copy has ended (every
 * slice copied, or the copy stopped). Returns its handle, or NULL (out of
 * memory, no thread could start, the pool is closed, or this is a forked
 * child: then the flag is left as it was). */
GCP_EXPORT gcp_copy *gcp_submit_copy_flag(gcp_pool *p, uintptr_t dst, uintptr_t src,
                                          uint64_t nbytes, uint64_t step, int nt, uintptr_t flag)
{
    return submit(p, dst, src, nbytes, step, nt, flag, 0);
}

/* gcp_submit_copy_flag, but no slice is copied before the uint32 at
 * ``ready`` is non-zero (a GPU stream sets it with cuStreamWriteValue32 once
 * the source is there): until then the watcher thread holds the copy, and
 * no copy thread waits for it. */
GCP_EXPORT gcp_copy *gcp_submit_copy_gated(gcp_pool *p, uintptr_t dst, uintptr_t src,
                                           uint64_t nbytes, uint64_t step, int nt, uintptr_t flag,
                                           uintptr_t ready)
{
    if (ready == 0)
        return NULL;
    return submit(p, dst, src, nbytes, step, nt, flag, ready);
}

/* Whether no thread copies a slice of ``c`` and none will: under mu. */
static int ended(const gcp_copy *c)
{
    return c->active == 0 && (c->stop || c->claimed >= c->count);
}

/* Bytes copied from the start without a gap (no wait). */
GCP_EXPORT uint64_t gcp_copied(gcp_copy *c)
{
    if (c->pid != getpid())
        return 0;
    pthread_mutex_lock(&mu);
    uint64_t got = (uint64_t)c->prefix * c->step;
    pthread_mutex_unlock(&mu);
    return got < c->nbytes ? got : c->nbytes;
}

/* Block until at least ``target`` bytes (at most all) are copied from the
 * start; returns how many are, or -1 if the copy was stopped short of it. */
GCP_EXPORT int64_t gcp_wait_prefix(gcp_copy *c, uint64_t target)
{
    if (c->pid != getpid())
        return -1;
    if (target > c->nbytes)
        target = c->nbytes;
    pthread_mutex_lock(&mu);
    int64_t got;
    for (;;) {
        uint64_t p = (uint64_t)c->prefix * c->step;
        if (p > c->nbytes)
            p = c->nbytes;
        if (p >= target) {
            got = (int64_t)p;
            break;
        }
        if (ended(c)) {
            got = -1;
            break;
        }
        c->waiters++;
        pthread_cond_wait(&c->cv, &mu);
        c->waiters--;
    }
    pthread_mutex_unlock(&mu);
    return got;
}

static int by_index(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Block until slices of at least ``at_least`` bytes (or all that are left)
 * are copied that no earlier call returned; write them as (offset, bytes)
 * ranges in address order, adjacent ones merged, into ``offs``/``lens``
 * (room for one per slice) and return how many: 0 once every slice was
 * returned, -1 if the copy was stopped short of it. */
GCP_EXPORT int64_t gcp_take(gcp_copy *c, uint64_t at_least, uint64_t *offs, uint64_t *lens)
{
    if (c->pid != getpid())
        return -1;
    pthread_mutex_lock(&mu);
    uint64_t left = c->nbytes - c->taken;
    if (left == 0) {
        pthread_mutex_unlock(&mu);
        return 0;
    }
    uint64_t want = at_least ? at_least : 1;
    if (want > left)
        want = left;
    while (c->fresh_bytes < want) {
        if (ended(c)) {
            pthread_mutex_unlock(&mu);
            return -1;
        }
        c->waiters++;
        pthread_cond_wait(&c->cv, &mu);
        c->waiters--;
    }
    uint32_t n = c->nfresh;
    qsort(c->fresh, n, sizeof *c->fresh, by_index);
    int64_t ranges = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = (uint64_t)c->fresh[i] * c->step;
        uint64_t end = off + c->step < c->nbytes ? off + c->step : c->nbytes;
        if (ranges && offs[ranges - 1] + lens[ranges - 1] == off) {
            lens[ranges - 1] = end - offs[ranges - 1];
        } else {
            offs[ranges] = off;
            lens[ranges] = end - off;
            ranges++;
        }
    }
    c->taken += c->fresh_bytes;
    c->fresh_bytes = 0;
    c->nfresh = 0;
    pthread_mutex_unlock(&mu);
    return ranges;
}

/* Let no thread claim another slice of ``c``; return once none copies any. */
GCP_EXPORT void gcp_stop(gcp_copy *c)
{
    if (c->pid != getpid())
        return;
    pthread_mutex_lock(&mu);
    c->stop = 1;
    signal_if_ended(c);
    while (c->active) {
        c->waiters++;
        pthread_cond_wait(&c->cv, &mu);
        c->waiters--;
    }
    pthread_mutex_unlock(&mu);
}

/* Drop the caller's handle. A copy still running stops claiming slices and
 * is freed once its last slice is copied: its memory must outlive that
 * (the caller stops it first, with gcp_stop, when it does not). */
GCP_EXPORT void gcp_free(gcp_copy *c)
{
    if (c->pid != getpid())
        return;
    pthread_mutex_lock(&mu);
    c->stop = 1;
    signal_if_ended(c);
    copy_unref(c);
    pthread_mutex_unlock(&mu);
}

/* Stop the threads after the copies already queued. The pool's struct is
 * never freed (a few hundred bytes a pool, one pool a runtime): a thread that
 * read the handle just before another closed it may still call in with it,
 * and must find this pool closed, not freed memory or a pool made since at
 * the same address. A second close returns at once. */
GCP_EXPORT void gcp_pool_close(gcp_pool *p)
{
    if (p->pid != getpid())
        return;
    pthread_mutex_lock(&mu);
    if (p->closing) {
        pthread_mutex_unlock(&mu);
        return;
    }
    p->closing = 1;
    __atomic_add_fetch(&p->stirs, 1, __ATOMIC_RELEASE); /* ends every spin */
    pthread_cond_broadcast(&p->work);
    pthread_cond_broadcast(&p->gate);
    int started = p->started, watching = p->watching;
    pthread_mutex_unlock(&mu);
    if (watching)
        pthread_join(p->watcher, NULL);
    for (int i = 0; i < started; i++)
        pthread_join(p->threads[i], NULL);
    /* Its condition variables stay too: a late call takes mu, finds
     * ``closing`` and touches nothing else (open_locked, post_locked). */
    pthread_mutex_lock(&mu);
    free(p->threads);
    p->threads = NULL;
    pthread_mutex_unlock(&mu);
}

/* Up to this many bytes copy() keeps the GIL: such a memmove takes a few
 * microseconds at most, less than handing the GIL over and taking it back. */
#define GCP_KEEP_GIL_MAX (64u << 10)

/* copy(dst, src, nbytes): memmove between host addresses, for the small
 * copies staging makes on the calling thread (a download's copy-out, an
 * upload's source into its block). A Python function of this module, not a
 * ctypes call: on an H100 host ctypes.memmove took 1.1 us for 8 bytes, its
 * argument conversion and its release of the GIL, which can also hand the
 * event loop's thread to the back of the GIL's queue (issue 13, run DR). */
static PyObject *py_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(dst, src, nbytes) takes 3 arguments");
        return NULL;
    }
    void *dst = PyLong_AsVoidPtr(args[0]);
    if (dst == NULL && PyErr_Occurred())
        return NULL;
    void *src = PyLong_AsVoidPtr(args[1]);
    if (src == NULL && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "copy: nbytes must not be negative");
        return NULL;
    }
    if (n == 0)
        Py_RETURN_NONE;
    if (dst == NULL || src == NULL) {
        PyErr_SetString(PyExc_ValueError, "copy: a null address");
        return NULL;
    }
    if ((size_t)n <= GCP_KEEP_GIL_MAX) {
        memmove(dst, src, (size_t)n);
    } else {
        Py_BEGIN_ALLOW_THREADS
        memmove(dst, src, (size_t)n);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* The most chunks submit_chunks() takes in one call. */
#define CHUNKS_MAX 64

static int ptr_list(PyObject *o, uintptr_t *out, Py_ssize_t n, const char *what)
{
    if (!PyList_Check(o) || PyList_GET_SIZE(o) != n) {
        PyErr_Format(PyExc_ValueError, "submit_chunks: %s must be a list of %zd", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(o, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        out[i] = (uintptr_t)v;
    }
    return 0;
}

/* submit_chunks(pool, dsts, srcs, lens, step, nt, flags, readies, post)
 * -> list of handles, or None: one flagged copy per chunk (readies: None, or
 * each chunk's ready word, as gcp_submit_copy_gated), made in one call with
 * the pool's mutex taken once. With ``post`` false the copies are made but
 * not handed to the threads: post_chunks() does that later, and cannot fail
 * (a gated download enqueues its DMAs in between, so that they start before
 * this thread's bookkeeping; issue 13, run EE). None where memory ran out,
 * the pool is closed, this is a forked child or no thread could start:
 * nothing was made. The GIL is kept: no call here blocks for long. */
static PyObject *py_submit_chunks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "submit_chunks(pool, dsts, srcs, lens, step, nt, flags, readies, post) "
                        "takes 9 arguments");
        return NULL;
    }
    gcp_pool *p = (gcp_pool *)PyLong_AsVoidPtr(args[0]);
    if (p == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "submit_chunks: a null pool");
        return NULL;
    }
    if (!PyList_Check(args[1])) {
        PyErr_SetString(PyExc_ValueError, "submit_chunks: dsts must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[1]);
    if (n < 1 || n > CHUNKS_MAX) {
        PyErr_Format(PyExc_ValueError, "submit_chunks: 1 to %d chunks", CHUNKS_MAX);
        return NULL;
    }
    uintptr_t dsts[CHUNKS_MAX], srcs[CHUNKS_MAX], lens[CHUNKS_MAX], flags[CHUNKS_MAX];
    uintptr_t readies[CHUNKS_MAX] = {0};
    unsigned long long step = PyLong_AsUnsignedLongLong(args[4]);
    if (step == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int nt = PyObject_IsTrue(args[5]), post = PyObject_IsTrue(args[8]);
    if (nt < 0 || post < 0 || ptr_list(args[1], dsts, n, "dsts") ||
        ptr_list(args[2], srcs, n, "srcs") || ptr_list(args[3], lens, n, "lens") ||
        ptr_list(args[6], flags, n, "flags") ||
        (args[7] != Py_None && ptr_list(args[7], readies, n, "readies")))
        return NULL;
    if (step == 0) {
        PyErr_SetString(PyExc_ValueError, "submit_chunks: step must be positive");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (flags[i] == 0 || (args[7] != Py_None && readies[i] == 0) || dsts[i] == 0 ||
            srcs[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "submit_chunks: a null address");
            return NULL;
        }
    if (p->pid != getpid())
        Py_RETURN_NONE;
    gcp_copy *made[CHUNKS_MAX];
    Py_ssize_t k = 0;
    for (; k < n; k++) {
        made[k] = copy_new(p->pid, dsts[k], srcs[k], lens[k], step, nt, flags[k], readies[k]);
        if (made[k] == NULL)
            break;
    }
    PyObject *out = k == n ? PyList_New(n) : NULL;
    int ok = 0;
    if (out != NULL) {
        pthread_mutex_lock(&mu);
        ok = open_locked(p, args[7] != Py_None);
        int queued = 0;
        for (Py_ssize_t i = 0; ok && post && i < n; i++)
            queued |= post_locked(p, made[i]);
        if (queued)
            wake_locked(p);
        pthread_mutex_unlock(&mu);
    }
    if (!ok) {
        for (Py_ssize_t i = 0; i < k; i++)
            copy_free(made[i]);
        Py_XDECREF(out);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(out, i, PyLong_FromVoidPtr(made[i])); /* (cannot fail for a pointer) */
    return out;
}

/* post_chunks(pool, handles): hand copies made by submit_chunks(post=False)
 * to the threads (each once), the mutex taken once. */
static PyObject *py_post_chunks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "post_chunks(pool, handles) takes 2 arguments");
        return NULL;
    }
    gcp_pool *p = (gcp_pool *)PyLong_AsVoidPtr(args[0]);
    if (p == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "post_chunks: a null pool");
        return NULL;
    }
    if (!PyList_Check(args[1]) || PyList_GET_SIZE(args[1]) > CHUNKS_MAX) {
        PyErr_Format(PyExc_ValueError, "post_chunks: handles must be a list of at most %d",
                     CHUNKS_MAX);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[1]);
    gcp_copy *cs[CHUNKS_MAX];
    for (Py_ssize_t i = 0; i < n; i++) {
        cs[i] = (gcp_copy *)PyLong_AsVoidPtr(PyList_GET_ITEM(args[1], i));
        if (cs[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "post_chunks: a null handle");
            return NULL;
        }
    }
    if (p->pid != getpid())
        Py_RETURN_NONE;
    pthread_mutex_lock(&mu);
    int queued = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        queued |= post_locked(p, cs[i]);
    if (queued)
        wake_locked(p);
    pthread_mutex_unlock(&mu);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_FASTCALL,
     "copy(dst, src, nbytes): memmove between host addresses; the GIL is kept up to 64 KiB."},
    {"submit_chunks", (PyCFunction)(void (*)(void))py_submit_chunks, METH_FASTCALL,
     "submit_chunks(pool, dsts, srcs, lens, step, nt, flags, readies, post) -> list of copy "
     "handles, or None: one flagged (and, with readies, gated) copy per chunk; posted to the "
     "threads now if post, else by post_chunks()."},
    {"post_chunks", (PyCFunction)(void (*)(void))py_post_chunks, METH_FASTCALL,
     "post_chunks(pool, handles): hand copies made by submit_chunks(post=False) to the threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copythreads",
    "Copy threads without the GIL, used through ctypes by gpuaio._engine.nativecopy; "
    "and copy(), a memmove for small copies.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__copythreads(void) { return PyModule_Create(&module); }
