/*
 * tunnelscope/nio/fastpath/loop.c - the event loop: one epoll set serving every bridge.
 *
 * A readable endpoint gives a receive batch: link_receive runs the pre tap, the impairment
 * chain and the output queue, then transmit the post tap and the send (pipeline.Link.receive
 * and transmit). Timers release delayed frames and flush captures. Loop.run() pumps with the
 * GIL released, holding the loop's mutex only while it touches bridges, and on the main thread
 * looks at Python signals every SIGNAL_CHECK_NS.
 */
#include "fastpath.h"

#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SIGNAL_CHECK_NS 200000000LL   /* longest wait between two looks at Python signals */
#define FREE_FRAMES_KEPT 4096         /* frame descriptors the pool keeps between passes */
#define RECV_ROUNDS 8                 /* full batches read from one endpoint per epoll event */

static void activate(LoopObject *L, dir_t *d)
{
    if (d->active >= 0)
        return;
    if (L->nactive == L->capactive) {
        size_t cap = L->capactive ? L->capactive * 2 : 16;
        dir_t **active = realloc(L->active, cap * sizeof *active);
        if (!active)
            return; /* retried at the next enqueue; the frames stay queued */
        L->active = active;
        L->capactive = cap;
    }
    d->active = (ssize_t)L->nactive;
    L->active[L->nactive++] = d;
}

void deactivate(LoopObject *L, dir_t *d)
{
    if (d->active < 0)
        return;
    dir_t *last = L->active[--L->nactive];
    L->active[d->active] = last;
    last->active = d->active;
    d->active = -1;
}

static inline uint32_t capture_flag(const dir_t *d) { return d->index == 0 ? 2 : 1; }

static inline bool tap_match(const tap_t *tap, const uint8_t *data, uint32_t len)
{
    return !tap->filter || bpf_run(tap->filter, data, len) != 0;
}

/* Record the frames in L->out at the post point and send them; `pooled`: they are the
 * pool's, given back once sent (else they are L->direct's). */
static void send_out(LoopObject *L, bridge_t *b, dir_t *d, int64_t now, bool pooled)
{
    size_t n = L->out.n;
    if (n) {
        frame_t **out = (frame_t **)L->out.a;
        int64_t ts = b->ntaps ? real_ns() : 0;
        for (size_t t = 0; t < b->ntaps; t++) {
            tap_t *tap = &b->taps[t];
            CaptureObject *c = tap->capture;
            if (tap->post < 0)
                continue;
            pthread_mutex_lock(&c->lock);
            for (size_t i = 0; i < n && !c->closed; i++) {
                if (!tap_match(tap, out[i]->data, out[i]->len))
                    continue;
                size_t off =
                    cap_begin(c, (uint32_t)tap->post, ts, out[i]->data, out[i]->len, true);
                cap_end(c, off, capture_flag(d), d, NULL, 0);
            }
            cap_appended(c, 0, now);
            pthread_mutex_unlock(&c->lock);
        }
        send_batch(&b->ends[1 - d->index], out, n, &L->tx, L->gso, &d->forwarded,
                   &d->send_errors);
        for (size_t i = 0; i < n && pooled; i++)
            frame_free(&L->pool, out[i]);
        L->out.n = 0;
    }
}

/* Release what is due, record it at the post point, send it (pipeline.Link.transmit). */
static void transmit(LoopObject *L, bridge_t *b, dir_t *d, int64_t now)
{
    L->out.n = 0;
    release(L, d, now);
    send_out(L, b, d, now, true);
    if (queued(d))
        activate(L, d);
    else
        deactivate(L, d);
}

void deregister(LoopObject *L, endpoint_t *ep)
{
    if (ep->registered)
        epoll_ctl(L->epfd, EPOLL_CTL_DEL, ep->fd, NULL);
    ep->registered = false;
}

/* Queued frames still pointing into the receive buffer get their own copy (the buffer is
 * about to be reused). */
static void own_borrowed(LoopObject *L)
{
    for (size_t i = 0; i < L->borrowed.n; i++) {
        frame_t *f = L->borrowed.a[i];
        if (f->live && !f->owned)
            frame_own(f); /* on failure the frame is lost and dropped when due */
    }
    L->borrowed.n = 0;
}

/* One receive batch: pre tap, chain, queue, release, post tap, send (pipeline.Link.receive).
 * A direction with no chain and nothing queued sends the batch as it came, in arrival order,
 * which is what the queue would release at `now`: the frames skip the pool and the queue. */
static void link_receive(LoopObject *L, bridge_t *b, dir_t *d, size_t n, int64_t now)
{
    d->received += n;
    bool direct = d->nstages == 0 && queued(d) == 0 && ptrvec_reserve(&L->out, n);
    bool capturing = false;
    for (size_t t = 0; t < b->ntaps; t++) { /* lock order: the taps' order */
        tap_t *tap = &b->taps[t];
        tap->live = tap->pre >= 0;
        if (tap->live) {
            pthread_mutex_lock(&tap->capture->lock);
            capturing = true;
        }
    }
    int64_t ts = capturing ? real_ns() : 0;
    bool stays = !d->rewrites; /* the slots hold the frames as received until the batch ends */
    for (size_t i = 0; i < n; i++) {
        rxframe_t *rx = &L->rx[i];
        for (size_t t = 0; t < b->ntaps; t++) {
            tap_t *tap = &b->taps[t];
            tap->off = tap->live && tap_match(tap, rx->data, rx->len)
                           ? cap_begin(tap->capture, (uint32_t)tap->pre, ts, rx->data, rx->len,
                                       stays)
                           : SIZE_MAX;
        }
        L->survivors.n = 0;
        L->ncauses = 0;
        frame_t *f;
        if (direct) {
            L->direct[i].data = rx->data;
            L->direct[i].len = rx->len;
            L->out.a[i] = &L->direct[i];
        } else if ((f = frame_new(&L->pool))) {
            f->data = rx->data;
            f->len = rx->len;
            f->ready = now;
            run_chain(L, d, f, 0);
        } else {
            drop_no_memory(L, d, NULL);
        }
        for (size_t t = 0; t < b->ntaps; t++) {
            tap_t *tap = &b->taps[t];
            if (tap->live)
                cap_end(tap->capture, tap->off, capture_flag(d), d, L->causes, L->ncauses);
        }
        for (size_t j = 0; j < L->survivors.n; j++) {
            frame_t *s = L->survivors.a[j];
            s->seq = d->seq++;
            if (!s->owned && !ptrvec_push(&L->borrowed, s))
                frame_own(s);
            if (!heap_push(d, s))
                drop_no_memory(L, d, s); /* back in the pool: `borrowed` skips it */
        }
    }
    for (size_t t = 0; t < b->ntaps; t++) {
        tap_t *tap = &b->taps[t];
        if (tap->live) {
            cap_appended(tap->capture, 0, now);
            pthread_mutex_unlock(&tap->capture->lock);
        }
    }
    if (direct) {
        d->seq += n;
        d->sends += n;
        L->out.n = n;
        send_out(L, b, d, now, false);
        deactivate(L, d);
        return;
    }
    transmit(L, b, d, now);
    own_borrowed(L);
}

static void handle_event(LoopObject *L, uint64_t tag, uint32_t events)
{
    bridge_t *b = find_bridge(L, tag >> 1);
    if (!b) /* removed while the event waited */
        return;
    int side = (int)(tag & 1);
    endpoint_t *ep = &b->ends[side];
    dir_t *d = &b->dirs[side];
    /* A full batch says more is waiting: read on without asking epoll again (as the minimal
     * loop does), up to RECV_ROUNDS batches, so that the other endpoints and the timers wait
     * at most that long. */
    for (int round = 0; round < RECV_ROUNDS && ep->registered; round++) {
        int n = ep->kind == KIND_DGRAM ? recv_dgram(L, ep) : recv_fd(L, ep, events);
        if (n < 0)
            deregister(L, ep); /* the fd is broken for good: stop reading it, keep the bridge */
        if (n <= 0)
            return;
        /* the arrival time: read once the batch is in, so no frame leaves early */
        link_receive(L, b, d, (size_t)n, mono_ns());
        if (n < BATCH)
            return;
    }
}

/* Timers: due frames of every direction with a queue, due capture flushes. */
static void run_timers(LoopObject *L, int64_t now)
{
    for (size_t i = 0; i < L->nactive;) {
        dir_t *d = L->active[i];
        transmit(L, d->bridge, d, now);
        if (d->active == (ssize_t)i)
            i++; /* else it left the list and another took index i */
    }
    for (size_t i = 0; i < L->ncaps; i++) {
        CaptureObject *c = L->caps[i].capture;
        pthread_mutex_lock(&c->lock);
        if (now >= cap_deadline(c))
            cap_flush(c);
        pthread_mutex_unlock(&c->lock);
    }
}

/* The earliest capture flush deadline; INT64_MAX when no capture holds unwritten records. */
static int64_t next_flush(LoopObject *L)
{
    int64_t next = INT64_MAX;
    for (size_t i = 0; i < L->ncaps; i++) {
        CaptureObject *c = L->caps[i].capture;
        pthread_mutex_lock(&c->lock);
        int64_t deadline = c->blocked ? INT64_MAX : cap_deadline(c);
        pthread_mutex_unlock(&c->lock);
        if (deadline < next)
            next = deadline;
    }
    return next;
}

/* The loop is going idle: write every capture's records now (the timer is the upper bound). */
static void flush_all(LoopObject *L)
{
    for (size_t i = 0; i < L->ncaps; i++) {
        CaptureObject *c = L->caps[i].capture;
        pthread_mutex_lock(&c->lock);
        if (!c->blocked)
            cap_flush(c);
        pthread_mutex_unlock(&c->lock);
    }
}

static int64_t next_deadline(LoopObject *L)
{
    int64_t next = INT64_MAX;
    for (size_t i = 0; i < L->nactive; i++) {
        dir_t *d = L->active[i];
        if (d->nheap && d->heap[0]->ready < next)
            next = d->heap[0]->ready;
        if (d->park_head && d->park_head->deadline < next)
            next = d->park_head->deadline;
    }
    for (size_t i = 0; i < L->ncaps; i++) {
        CaptureObject *c = L->caps[i].capture;
        pthread_mutex_lock(&c->lock);
        int64_t deadline = cap_deadline(c);
        pthread_mutex_unlock(&c->lock);
        if (deadline < next)
            next = deadline;
    }
    return next;
}

/* epoll with a nanosecond timeout (epoll_pwait2) where the kernel has it, else milliseconds
 * rounded up (a timer never fires early, so the loop never spins). */
static int wait_events(LoopObject *L, int64_t wait_ns)
{
#ifdef SYS_epoll_pwait2
    if (L->use_pwait2) {
        struct {
            int64_t tv_sec;
            long long tv_nsec;
        } ts = {wait_ns / 1000000000LL, wait_ns % 1000000000LL};
        int r = (int)syscall(SYS_epoll_pwait2, L->epfd, L->events, MAX_EVENTS, &ts, NULL, 0);
        if (r >= 0 || (errno != ENOSYS && errno != EPERM))
            return r;
        L->use_pwait2 = false;
    }
#endif
    return epoll_wait(L->epfd, L->events, MAX_EVENTS, (int)((wait_ns + 999999) / 1000000));
}

enum { RUN_DONE, RUN_SIGNAL, RUN_EXCEPTION, RUN_ERROR };

/* 1 on the main thread (threading.main_thread()), 0 elsewhere, -1 with an exception. */
static int on_main_thread(void)
{
    PyObject *threading = PyImport_ImportModule("threading");
    if (!threading)
        return -1;
    PyObject *main = PyObject_CallMethod(threading, "main_thread", NULL);
    Py_DECREF(threading);
    if (!main)
        return -1;
    PyObject *ident = PyObject_GetAttrString(main, "ident");
    Py_DECREF(main);
    if (!ident)
        return -1;
    unsigned long value = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (value == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    return value == PyThread_get_thread_ident();
}

PyObject *Loop_run(LoopObject *L, PyObject *arg)
{
    long long timeout_ms = PyLong_AsLongLong(arg);
    if (timeout_ms == -1 && PyErr_Occurred())
        return NULL;
    lock_with_gil(&L->lock);
    bool busy = L->running;
    L->running = true;
    pthread_mutex_unlock(&L->lock);
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "Loop.run() is already running in another thread");
        return NULL;
    }
    /* Python runs signal handlers in the main thread only: elsewhere there is nothing to
     * check, and taking the GIL for nothing could delay due frames by a switch interval. */
    int main_thread = on_main_thread();
    if (main_thread < 0) {
        lock_with_gil(&L->lock);
        L->running = false;
        pthread_mutex_unlock(&L->lock);
        return NULL;
    }
    int64_t start = mono_ns();
    int64_t end = timeout_ms < 0 || timeout_ms > INT64_MAX / 2000000 ? INT64_MAX
                                                                     : start + timeout_ms * 1000000;
    int64_t last_check = start;
    int status = RUN_DONE, err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        pthread_mutex_lock(&L->lock);
        int64_t now = mono_ns();
        run_timers(L, now);
        int64_t next = next_deadline(L);
        bool unflushed = next_flush(L) != INT64_MAX;
        pool_trim(&L->pool, FREE_FRAMES_KEPT);
        pthread_mutex_unlock(&L->lock);
        if (end < next)
            next = end;
        now = mono_ns();
        int64_t wait = next - now;
        if (wait < 0)
            wait = 0;
        if (wait > SIGNAL_CHECK_NS)
            wait = SIGNAL_CHECK_NS;
        int n = 0;
        if (unflushed && wait > 0) { /* records wait: flush them if this busy period is over */
            n = wait_events(L, 0);
            if (n == 0) {
                pthread_mutex_lock(&L->lock);
                flush_all(L);
                pthread_mutex_unlock(&L->lock);
            }
        }
        if (n == 0)
            n = wait_events(L, wait);
        if (n < 0) {
            if (errno == EINTR) { /* a signal: let Python run its handler, the caller loops */
                status = RUN_SIGNAL;
            } else {
                status = RUN_ERROR;
                err = errno;
            }
            break;
        }
        bool woken = false;
        pthread_mutex_lock(&L->lock);
        for (int i = 0; i < n; i++) {
            if (L->events[i].data.u64 == WAKE_ID) {
                uint64_t value;
                (void)!read(L->wakefd, &value, sizeof value);
                woken = true;
            } else {
                handle_event(L, L->events[i].data.u64, L->events[i].events);
            }
        }
        pthread_mutex_unlock(&L->lock);
        if (woken)
            break;
        now = mono_ns();
        if (now >= end) {
            pthread_mutex_lock(&L->lock);
            run_timers(L, now);
            pthread_mutex_unlock(&L->lock);
            break;
        }
        if (main_thread && now - last_check >= SIGNAL_CHECK_NS) {
            last_check = now;
            Py_BLOCK_THREADS
            int r = PyErr_CheckSignals();
            Py_UNBLOCK_THREADS
            if (r < 0) {
                status = RUN_EXCEPTION;
                break;
            }
        }
    }
    pthread_mutex_lock(&L->lock);
    L->running = false;
    pool_trim(&L->pool, FREE_FRAMES_KEPT);
    pthread_mutex_unlock(&L->lock);
    Py_END_ALLOW_THREADS
    if (status == RUN_EXCEPTION || (status == RUN_SIGNAL && PyErr_CheckSignals() < 0))
        return NULL;
    if (status == RUN_ERROR) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}
