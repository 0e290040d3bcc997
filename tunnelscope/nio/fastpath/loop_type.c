/*
 * tunnelscope/nio/fastpath/loop_type.c - the Python type Loop.
 *
 * Loop(*, gso=False) owns the epoll set, the receive buffers and the bridges. Its methods add
 * and remove bridges, impairment chains and captures while run() (loop.c) may be pumping in
 * another thread: each parses its Python arguments first, takes the loop's mutex for the
 * change, and makes Python objects only after. The C twin of tunnelscope.datapath.pipeline.Loop.
 */
#include "fastpath.h"

#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void capref_add(LoopObject *L, CaptureObject *c, bool *ok)
{
    for (size_t i = 0; i < L->ncaps; i++) {
        if (L->caps[i].capture == c) {
            L->caps[i].users++;
            *ok = true;
            return;
        }
    }
    if (L->ncaps == L->capcaps) {
        size_t cap = L->capcaps ? L->capcaps * 2 : 4;
        capref_t *caps = realloc(L->caps, cap * sizeof *caps);
        if (!caps) {
            *ok = false;
            return;
        }
        L->caps = caps;
        L->capcaps = cap;
    }
    Py_INCREF(c); /* the caller holds the GIL */
    L->caps[L->ncaps].capture = c;
    L->caps[L->ncaps].users = 1;
    L->ncaps++;
    *ok = true;
}

/* One bridge stops using `c`; returns the reference to drop (after unlocking) or NULL. */
static CaptureObject *capref_remove(LoopObject *L, CaptureObject *c)
{
    for (size_t i = 0; i < L->ncaps; i++) {
        if (L->caps[i].capture == c) {
            if (--L->caps[i].users)
                return NULL;
            L->caps[i] = L->caps[--L->ncaps];
            return c;
        }
    }
    return NULL;
}

static void bridge_free(bridge_t *b)
{
    for (int side = 0; side < 2; side++) {
        dir_t *d = &b->dirs[side];
        for (size_t i = 0; i < d->nheap; i++)
            frame_release(d->heap[i]);
        for (frame_t *f = d->park_head, *next; f; f = next) {
            next = f->next;
            frame_release(f);
        }
        free(d->heap);
        stages_free(d->stages, d->nstages);
        for (int i = 0; i < d->ncauses; i++)
            free(d->causes[i].name);
        free(d->causes);
    }
    for (shared_counter_t *s = b->shared, *next; s; s = next) {
        next = s->next;
        free(s);
    }
    for (size_t t = 0; t < b->ntaps; t++)
        free(b->taps[t].filter);
    free(b->taps);
    free(b);
}

static PyObject *Loop_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"gso", NULL};
    int gso = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$p:Loop", kwlist, &gso))
        return NULL;
    LoopObject *L = (LoopObject *)type->tp_alloc(type, 0);
    if (!L)
        return NULL;
    L->gso = gso;
    L->epfd = L->wakefd = -1;
    if (pthread_mutex_init(&L->lock, NULL) != 0) {
        Py_TYPE(L)->tp_free((PyObject *)L);
        return PyErr_NoMemory();
    }
    L->use_pwait2 = true;
    L->rxbuf = malloc((size_t)BATCH * SLOT_SIZE);
    L->tx.iov = calloc((size_t)BATCH * (gso ? GSO_SEGMENTS : 1), sizeof *L->tx.iov);
    if (!L->rxbuf || !L->tx.iov) {
        Py_DECREF(L);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < BATCH; i++) {
        L->rx_iov[i].iov_base = L->rxbuf + (size_t)i * SLOT_SIZE;
        L->rx_iov[i].iov_len = SLOT_SIZE;
        L->rx_msgs[i].msg_hdr.msg_iov = &L->rx_iov[i];
        L->rx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    L->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_ID};
    if (L->epfd < 0 || L->wakefd < 0 || epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(L);
        return NULL;
    }
    return (PyObject *)L;
}

static void Loop_dealloc(LoopObject *L)
{
    for (size_t i = 0; i < L->nbridges; i++)
        if (L->bridges[i])
            bridge_free(L->bridges[i]);
    free(L->bridges);
    for (size_t i = 0; i < L->ncaps; i++)
        Py_DECREF(L->caps[i].capture);
    free(L->caps);
    free(L->active);
    pool_trim(&L->pool, 0);
    free(L->rxbuf);
    free(L->tx.iov);
    free(L->survivors.a);
    free(L->borrowed.a);
    free(L->out.a);
    free(L->stack.a);
    free(L->causes);
    if (L->epfd >= 0)
        close(L->epfd);
    if (L->wakefd >= 0)
        close(L->wakefd);
    pthread_mutex_destroy(&L->lock);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static bool check_direction(int direction)
{
    if (direction == 0 || direction == 1)
        return true;
    PyErr_SetString(PyExc_ValueError, "direction must be 0 (a2b) or 1 (b2a)");
    return false;
}

static PyObject *unknown_bridge(unsigned long long id)
{
    PyObject *key = PyLong_FromUnsignedLongLong(id);
    if (key) {
        PyErr_SetObject(PyExc_KeyError, key);
        Py_DECREF(key);
    }
    return NULL;
}

static PyObject *Loop_add_bridge(LoopObject *L, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"a_fd", "a_kind", "b_fd", "b_kind", "a_peer", "b_peer", NULL};
    int fds[2], kinds[2];
    PyObject *peers[2] = {NULL, NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiii|OO:add_bridge", kwlist, &fds[0],
                                     &kinds[0], &fds[1], &kinds[1], &peers[0], &peers[1]))
        return NULL;
    bridge_t *b = calloc(1, sizeof *b);
    if (!b)
        return PyErr_NoMemory();
    for (int side = 0; side < 2; side++) {
        if (!endpoint_init(&b->ends[side], fds[side], kinds[side], peers[side])) {
            free(b);
            return NULL;
        }
        b->dirs[side].bridge = b;
        b->dirs[side].index = side;
        b->dirs[side].active = -1;
    }
    lock_with_gil(&L->lock);
    int err = 0;
    if (L->nbridges == L->capbridges) {
        size_t cap = L->capbridges ? L->capbridges * 2 : 16;
        bridge_t **bridges = realloc(L->bridges, cap * sizeof *bridges);
        if (!bridges) {
            err = ENOMEM;
        } else {
            L->bridges = bridges;
            L->capbridges = cap;
        }
    }
    b->id = L->nbridges;
    for (int side = 0; side < 2 && !err; side++) {
        struct epoll_event ev = {.events = EPOLLIN | (kinds[side] == KIND_FD ? EPOLLRDHUP : 0),
                                 .data.u64 = (b->id << 1) | (uint64_t)side};
        if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, fds[side], &ev) < 0)
            err = errno;
        else
            b->ends[side].registered = true;
    }
    if (err) {
        for (int side = 0; side < 2; side++)
            deregister(L, &b->ends[side]);
        pthread_mutex_unlock(&L->lock);
        free(b);
        errno = err;
        return PyErr_SetFromErrno(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError);
    }
    L->bridges[L->nbridges++] = b;
    pthread_mutex_unlock(&L->lock);
    return PyLong_FromUnsignedLongLong(b->id);
}

static PyObject *Loop_remove_bridge(LoopObject *L, PyObject *arg)
{
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        return unknown_bridge(id);
    }
    lock_with_gil(&L->lock);
    bridge_t *b = find_bridge(L, id);
    if (b) {
        for (int side = 0; side < 2; side++) {
            deregister(L, &b->ends[side]);
            deactivate(L, &b->dirs[side]);
        }
        for (size_t t = 0; t < b->ntaps; t++) /* keep the references to drop */
            b->taps[t].capture = capref_remove(L, b->taps[t].capture);
        L->bridges[id] = NULL;
    }
    pthread_mutex_unlock(&L->lock);
    if (!b)
        return unknown_bridge(id);
    for (size_t t = 0; t < b->ntaps; t++)
        Py_XDECREF(b->taps[t].capture);
    bridge_free(b); /* its queued frames are discarded: the bridge is gone */
    Py_RETURN_NONE;
}

/* A chain parsed from Python, before it replaces a direction's chain under the lock. */
typedef struct {
    stage_t *stages;
    char **names;
    int64_t *shared;
    int n;
} chain_t;

static void chain_clear(chain_t *ch)
{
    if (ch->stages)
        stages_free(ch->stages, ch->n);
    if (ch->names)
        for (int i = 0; i < ch->n; i++)
            free(ch->names[i]);
    free(ch->names);
    free(ch->shared);
    memset(ch, 0, sizeof *ch);
}

static PyObject *Loop_set_chain(LoopObject *L, PyObject *args)
{
    unsigned long long id;
    int direction;
    PyObject *stages;
    if (!PyArg_ParseTuple(args, "KiO:set_chain", &id, &direction, &stages) ||
        !check_direction(direction))
        return NULL;
    PyObject *seq = PySequence_Fast(stages, "stages must be a list of stage tuples");
    if (!seq)
        return NULL;
    chain_t ch = {0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT32_MAX / 2) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    ch.n = (int)n;
    ch.stages = calloc((size_t)n + 1, sizeof *ch.stages);
    ch.names = calloc((size_t)n + 1, sizeof *ch.names);
    ch.shared = calloc((size_t)n + 1, sizeof *ch.shared);
    if (!ch.stages || !ch.names || !ch.shared) {
        Py_DECREF(seq);
        chain_clear(&ch);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!parse_stage(PySequence_Fast_GET_ITEM(seq, i), &ch.stages[i], &ch.names[i],
                         &ch.shared[i])) {
            Py_DECREF(seq);
            chain_clear(&ch);
            return NULL;
        }
    }
    Py_DECREF(seq);

    stage_t *swapped = NULL;
    int nswapped = 0;
    lock_with_gil(&L->lock);
    bridge_t *b = find_bridge(L, id);
    bool no_memory = false;
    if (b) {
        dir_t *d = &b->dirs[direction];
        for (int i = 0; i < ch.n && !no_memory; i++) {
            stage_t *s = &ch.stages[i];
            s->cause = cause_index(d, ch.names[i]);
            s->count = &s->own_count;
            if (s->cause < 0)
                no_memory = true;
            if (ch.shared[i] < 0 || no_memory)
                continue;
            shared_counter_t *sc = b->shared;
            while (sc && sc->id != ch.shared[i])
                sc = sc->next;
            if (!sc && (sc = calloc(1, sizeof *sc))) {
                sc->id = ch.shared[i];
                sc->next = b->shared;
                b->shared = sc;
            }
            if (!sc) {
                no_memory = true;
                continue;
            }
            sc->count = 0; /* a new configuration restarts the counter, in both directions */
            s->count = &sc->count;
        }
        if (!no_memory) { /* swap; frames already queued stay queued */
            stage_t *old = d->stages;
            int nold = d->nstages;
            d->stages = ch.stages;
            d->nstages = ch.n;
            d->rewrites = chain_rewrites(ch.stages, ch.n);
            swapped = old;
            nswapped = nold;
        }
    }
    pthread_mutex_unlock(&L->lock);
    if (b && !no_memory) { /* ch's names are copies (the cause table has its own) */
        ch.stages = swapped; /* free the old chain instead of the new one */
        stages_free(ch.stages, nswapped);
        ch.stages = NULL;
    }
    chain_clear(&ch);
    if (!b)
        return unknown_bridge(id);
    if (no_memory)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Loop_add_capture(LoopObject *L, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bridge", "capture", "pre_interface", "post_interface", "filter",
                             NULL};
    unsigned long long id;
    PyObject *obj, *filter_obj = Py_None;
    int pre, post;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KO!ii|O:add_capture", kwlist, &id,
                                     &CaptureType, &obj, &pre, &post, &filter_obj))
        return NULL;
    tap_t tap = {.capture = (CaptureObject *)obj, .pre = pre < 0 ? -1 : pre,
                 .post = post < 0 ? -1 : post};
    if (filter_obj != Py_None && !(tap.filter = parse_filter(filter_obj, &tap.nfilter)))
        return NULL;
    lock_with_gil(&L->lock);
    bridge_t *b = find_bridge(L, id);
    const char *refused = NULL;
    bool ok = b != NULL;
    for (size_t t = 0; b && t < b->ntaps; t++)
        if (b->taps[t].capture == tap.capture)
            refused = "this capture is on the bridge already";
    if (b && !refused) {
        tap_t *taps = realloc(b->taps, (b->ntaps + 1) * sizeof *taps);
        if (taps)
            b->taps = taps;
        ok = taps != NULL;
        if (ok)
            capref_add(L, tap.capture, &ok);
        if (ok) {
            tap.id = b->next_tap++;
            b->taps[b->ntaps++] = tap;
        }
    }
    pthread_mutex_unlock(&L->lock);
    if (!b || refused || !ok)
        free(tap.filter);
    if (!b)
        return unknown_bridge(id);
    if (refused) {
        PyErr_SetString(PyExc_ValueError, refused);
        return NULL;
    }
    if (!ok)
        return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong(tap.id);
}

static PyObject *Loop_remove_capture(LoopObject *L, PyObject *args)
{
    unsigned long long id, tap_id;
    if (!PyArg_ParseTuple(args, "KK:remove_capture", &id, &tap_id))
        return NULL;
    lock_with_gil(&L->lock);
    bridge_t *b = find_bridge(L, id);
    tap_t gone = {.capture = NULL};
    bool found = false;
    for (size_t t = 0; b && t < b->ntaps; t++) {
        if (b->taps[t].id == tap_id) {
            gone = b->taps[t];
            memmove(&b->taps[t], &b->taps[t + 1], (b->ntaps - t - 1) * sizeof gone);
            b->ntaps--;
            gone.capture = capref_remove(L, gone.capture);
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&L->lock);
    if (!b)
        return unknown_bridge(id);
    if (!found) {
        PyErr_Format(PyExc_KeyError, "no capture %llu on bridge %llu", tap_id, id);
        return NULL;
    }
    free(gone.filter);
    Py_XDECREF(gone.capture);
    Py_RETURN_NONE;
}

static PyObject *Loop_wake(LoopObject *L, PyObject *Py_UNUSED(unused))
{
    uint64_t one = 1;
    /* EAGAIN: the counter is full, so run() is awake already */
    (void)!write(L->wakefd, &one, sizeof one);
    Py_RETURN_NONE;
}

static PyObject *Loop_stats(LoopObject *L, PyObject *args)
{
    unsigned long long id;
    int direction;
    if (!PyArg_ParseTuple(args, "Ki:stats", &id, &direction) || !check_direction(direction))
        return NULL;
    enum { N = 13 };
    static const char *keys[N] = {"received", "forwarded", "send_errors", "corrupted",
                                  "duplicated", "delayed", "reordered", "queued",
                                  "refused", "oversize", "send_busy", "send_failed", NULL};
    uint64_t values[N] = {0};
    cause_t *causes = NULL;
    int ncauses = 0;
    bool no_memory = false;
    lock_with_gil(&L->lock);
    bridge_t *b = find_bridge(L, id);
    if (b) { /* a snapshot: no Python objects are made under the lock */
        dir_t *d = &b->dirs[direction];
        endpoint_t *in = &b->ends[direction];      /* receives this direction's frames */
        endpoint_t *out = &b->ends[1 - direction]; /* sends them: refusals, busy, failures */
        uint64_t v[N] = {d->received,   d->forwarded,  d->send_errors, d->corrupted,
                         d->duplicated, d->delayed,    d->reordered,   queued(d),
                         out->refused,  in->oversize,  out->send_busy, out->send_failed, 0};
        memcpy(values, v, sizeof values);
        if (d->ncauses && !(causes = calloc((size_t)d->ncauses, sizeof *causes)))
            no_memory = true;
        for (int i = 0; causes && i < d->ncauses; i++) {
            if (!d->causes[i].count)
                continue;
            if (!(causes[ncauses].name = strdup(d->causes[i].name))) {
                no_memory = true;
                break;
            }
            causes[ncauses++].count = d->causes[i].count;
        }
    }
    pthread_mutex_unlock(&L->lock);
    PyObject *result = NULL, *dropped = NULL;
    if (!b) {
        unknown_bridge(id);
        goto done;
    }
    if (no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(result = PyDict_New()) || !(dropped = PyDict_New()))
        goto fail;
    for (int i = 0; i < ncauses; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(causes[i].count);
        if (!v || PyDict_SetItemString(dropped, causes[i].name, v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    for (int i = 0; keys[i]; i++) {
        if (i == 8 && PyDict_SetItemString(result, "dropped", dropped) < 0)
            goto fail; /* same key order as pipeline.Link.stats */
        PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
        if (!v || PyDict_SetItemString(result, keys[i], v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    Py_DECREF(dropped);
    goto done;
fail:
    Py_CLEAR(result);
    Py_XDECREF(dropped);
done:
    for (int i = 0; i < ncauses; i++)
        free(causes[i].name);
    free(causes);
    return result;
}

static PyMethodDef Loop_methods[] = {
    {"add_bridge", (PyCFunction)(void (*)(void))Loop_add_bridge, METH_VARARGS | METH_KEYWORDS,
     "add_bridge(a_fd, a_kind, b_fd, b_kind, a_peer=None, b_peer=None) -> bridge id\n\n"
     "a_peer/b_peer: the peer path of a Unix datagram endpoint, reconnected when it restarts."},
    {"remove_bridge", (PyCFunction)Loop_remove_bridge, METH_O,
     "remove_bridge(bridge): stop serving it; its queued frames are discarded"},
    {"set_chain", (PyCFunction)Loop_set_chain, METH_VARARGS,
     "set_chain(bridge, direction, stages): replace that direction's impairment chain"},
    {"add_capture", (PyCFunction)(void (*)(void))Loop_add_capture, METH_VARARGS | METH_KEYWORDS,
     "add_capture(bridge, capture, pre_interface, post_interface, filter=None) -> capture id"},
    {"remove_capture", (PyCFunction)Loop_remove_capture, METH_VARARGS,
     "remove_capture(bridge, capture_id): the capture stops getting this bridge's frames"},
    {"run", (PyCFunction)Loop_run, METH_O,
     "run(timeout_ms): pump until the timeout (-1: none), wake(), or a signal"},
    {"wake", (PyCFunction)Loop_wake, METH_NOARGS,
     "make run() return promptly (safe from any thread or a signal handler)"},
    {"stats", (PyCFunction)Loop_stats, METH_VARARGS,
     "stats(bridge, direction) -> dict of counters"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunnelscope.nio._fastpath.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Loop(*, gso=False)\n\nOne epoll loop serving many bridges; run() releases the GIL "
              "while it pumps. The C twin of tunnelscope.datapath.pipeline.Loop.\n\n"
              "gso=True sends runs of equal-size frames to a UDP peer as one UDP_SEGMENT send "
              "(about 45 % less relay CPU per frame on loopback; receivers still get one "
              "datagram per frame, but a sniffer on lo sees the merged super-packets).",
    .tp_methods = Loop_methods,
    .tp_new = Loop_new,
};
