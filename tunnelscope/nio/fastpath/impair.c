/*
 * tunnelscope/nio/fastpath/impair.c - the impairment chain: what happens to each frame.
 *
 * A direction's chain is a list of stages (freq_drop, packet_loss, burst_loss, delay, rate,
 * corrupt, duplicate, reorder) whose integer parameters tunnelscope/datapath/impairments.py
 * compiles. run_chain takes every decision for a frame when it arrives, as
 * pipeline.Pipeline.run_chain does; the random draws are splitmix64 (docs/pipeline.md), so
 * both backends drop the same frames for the same seed. Drops are counted by cause name.
 */
#include "fastpath.h"

#include <stdlib.h>

#define NO_MEMORY "no_memory"         /* drop cause when a frame could not be kept */

/* Stage kinds (tunnelscope.datapath.impairments.Kind) and the integer params each takes. */
enum {
    S_FREQ_DROP = 1,
    S_PACKET_LOSS = 2,
    S_BURST_LOSS = 3,
    S_DELAY = 4,
    S_RATE = 5,
    S_CORRUPT = 6,
    S_DUPLICATE = 7,
    S_REORDER = 8,
};
static const int PARAM_COUNT[] = {0, 1, 1, 4, 2, 3, 1, 1, 2};

/* ---- random numbers: splitmix64 (docs/pipeline.md) ---- */

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t u53(uint64_t *state) { return splitmix64(state) >> 11; }
static inline bool hit(uint64_t *state, uint64_t threshold) { return u53(state) < threshold; }

/* (u53 * n) >> 53 without overflow (the product needs up to 117 bits): a uniform integer in
 * [0, n), as Python computes it with big integers. */
static inline uint64_t scaled(uint64_t u, uint64_t n)
{
#ifdef __SIZEOF_INT128__
    __extension__ typedef unsigned __int128 u128;
    return (uint64_t)(((u128)u * n) >> 53);
#else /* 32-bit targets: the 128-bit product from 32-bit halves */
    uint64_t ul = u & 0xFFFFFFFFu, uh = u >> 32, nl = n & 0xFFFFFFFFu, nh = n >> 32;
    uint64_t ll = ul * nl, lh = ul * nh, hl = uh * nl, hh = uh * nh;
    uint64_t mid = (ll >> 32) + (lh & 0xFFFFFFFFu) + (hl & 0xFFFFFFFFu);
    uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
    uint64_t lo = (mid << 32) | (ll & 0xFFFFFFFFu);
    return (hi << 11) | (lo >> 53);
#endif
}

/* ---- a chain from Python, a direction's drop causes ---- */

bool parse_stage(PyObject *item, stage_t *s, char **name, int64_t *shared)
{
    PyObject *kind_o, *name_o, *params_o, *seed_o, *shared_o;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 5 || PyTuple_GET_SIZE(item) > 6) {
        PyErr_SetString(PyExc_TypeError,
                        "a stage is a tuple (kind, name, params, seed, shared[, filter])");
        return false;
    }
    kind_o = PyTuple_GET_ITEM(item, 0);
    name_o = PyTuple_GET_ITEM(item, 1);
    params_o = PyTuple_GET_ITEM(item, 2);
    seed_o = PyTuple_GET_ITEM(item, 3);
    shared_o = PyTuple_GET_ITEM(item, 4);
    long kind = PyLong_AsLong(kind_o);
    if (kind == -1 && PyErr_Occurred())
        return false;
    if (kind < S_FREQ_DROP || kind > S_REORDER) {
        PyErr_Format(PyExc_ValueError, "unknown stage kind %ld", kind);
        return false;
    }
    const char *text = PyUnicode_AsUTF8(name_o);
    if (!text)
        return false;
    PyObject *params = PySequence_Fast(params_o, "stage params must be a sequence of ints");
    if (!params)
        return false;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
    if (count != PARAM_COUNT[kind]) {
        PyErr_Format(PyExc_ValueError, "stage %s takes %d params, got %zd", text,
                     PARAM_COUNT[kind], count);
        Py_DECREF(params);
        return false;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        s->p[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(params, i));
        if (s->p[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(params);
            return false;
        }
    }
    Py_DECREF(params);
    s->rng = PyLong_AsUnsignedLongLongMask(seed_o);
    if (s->rng == (uint64_t)-1 && PyErr_Occurred())
        return false;
    *shared = PyLong_AsLongLong(shared_o);
    if (*shared == -1 && PyErr_Occurred())
        return false;
    const int64_t max_ns = 1000000000LL * 86400 * 365; /* durations: a year is plenty */
    bool ok;
    switch (kind) {
    case S_FREQ_DROP:
        ok = s->p[0] >= -1;
        break;
    case S_BURST_LOSS:
        ok = s->p[0] >= 0 && s->p[1] >= 0 && s->p[2] >= 0 && s->p[3] >= 0;
        break;
    case S_DELAY:
        ok = s->p[0] >= 0 && s->p[0] <= max_ns && s->p[1] >= 0 && s->p[1] <= max_ns;
        break;
    case S_RATE:
        ok = s->p[0] >= 1 && s->p[1] >= 0 && s->p[1] <= max_ns && s->p[2] >= 0;
        break;
    case S_REORDER:
        ok = s->p[0] >= 0 && s->p[1] >= 0 && s->p[1] <= INT32_MAX;
        break;
    default: /* a threshold */
        ok = s->p[0] >= 0;
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "stage %s: parameter out of range", text);
        return false;
    }
    s->kind = (int)kind;
    PyObject *filter_o = PyTuple_GET_SIZE(item) == 6 ? PyTuple_GET_ITEM(item, 5) : Py_None;
    size_t nfilter = 0;
    if (filter_o != Py_None && !(s->filter = parse_filter(filter_o, &nfilter)))
        return false;
    if (!(*name = strdup(text))) {
        PyErr_NoMemory();
        return false;
    }
    return true;
}

void stages_free(stage_t *stages, int n)
{
    for (int i = 0; i < n; i++) {
        free(stages[i].dep);
        free(stages[i].filter);
    }
    free(stages);
}

/* The index of a drop cause in a direction's table, added when new; -1 when out of memory. */
int cause_index(dir_t *d, const char *name)
{
    for (int i = 0; i < d->ncauses; i++)
        if (strcmp(d->causes[i].name, name) == 0)
            return i;
    cause_t *causes = realloc(d->causes, (size_t)(d->ncauses + 1) * sizeof *causes);
    if (!causes)
        return -1;
    d->causes = causes;
    char *copy = strdup(name);
    if (!copy)
        return -1;
    causes[d->ncauses].name = copy;
    causes[d->ncauses].count = 0;
    return d->ncauses++;
}

/* ---- running the chain ---- */

/* rate: the ring of remembered departures */
static bool dep_push(stage_t *s, int64_t value)
{
    if (s->dep_len == s->dep_cap) {
        size_t cap = s->dep_cap ? s->dep_cap * 2 : 64;
        int64_t *dep = malloc(cap * sizeof *dep);
        if (!dep)
            return false;
        for (size_t i = 0; i < s->dep_len; i++)
            dep[i] = s->dep[(s->dep_head + i) & (s->dep_cap - 1)];
        free(s->dep);
        s->dep = dep;
        s->dep_cap = cap;
        s->dep_head = 0;
    }
    s->dep[(s->dep_head + s->dep_len) & (s->dep_cap - 1)] = value;
    s->dep_len++;
    return true;
}

/* GCRA in integer nanoseconds; false = tail drop (the stage's queue is full). */
static bool rate_admit(stage_t *s, frame_t *f, bool *no_memory)
{
    int64_t kbit = s->p[0], tau = s->p[1], limit = s->p[2];
    while (s->dep_len && s->dep[s->dep_head] <= f->ready) {
        s->dep_head = (s->dep_head + 1) & (s->dep_cap - 1);
        s->dep_len--;
    }
    if ((int64_t)s->dep_len >= limit)
        return false;
    int64_t cost = ((int64_t)f->len * 8000000 + kbit - 1) / kbit;
    int64_t departure = f->ready > s->tat - tau ? f->ready : s->tat - tau;
    if (!dep_push(s, departure)) {
        *no_memory = true;
        return false;
    }
    s->tat = (departure > s->tat ? departure : s->tat) + cost;
    f->ready = departure;
    return true;
}

static void count_drop(dir_t *d, int cause)
{
    if (cause >= 0)
        d->causes[cause].count++;
}

/* A frame lost for want of memory: counted as dropped by "no_memory". */
void drop_no_memory(LoopObject *L, dir_t *d, frame_t *f)
{
    count_drop(d, cause_index(d, NO_MEMORY));
    if (f)
        frame_free(&L->pool, f);
}

static void note_cause(LoopObject *L, int cause)
{
    if (L->ncauses == L->capcauses) {
        size_t cap = L->capcauses ? L->capcauses * 2 : 16;
        int *causes = realloc(L->causes, cap * sizeof *causes);
        if (!causes)
            return; /* the capture comment misses a name; the counters are right */
        L->causes = causes;
        L->capcauses = cap;
    }
    L->causes[L->ncauses++] = cause;
}

/* Does the chain change frames' bytes where they lie (corrupt flips a bit in the slot)? */
bool chain_rewrites(const stage_t *stages, int n)
{
    for (int i = 0; i < n; i++)
        if (stages[i].kind == S_CORRUPT)
            return true;
    return false;
}

/* Take every decision for one frame now (pipeline.Pipeline.run_chain): survivors are pushed
 * to L->survivors, drop causes noted in L->causes, depth first (a duplicate's copy runs the
 * rest of the chain after the original). */
void run_chain(LoopObject *L, dir_t *d, frame_t *f, int start)
{
    for (int index = start; index < d->nstages; index++) {
        stage_t *s = &d->stages[index];
        bool dropped = false, no_memory = false;
        if (s->filter && !bpf_run(s->filter, f->data, f->len))
            continue; /* not for this stage: no draw, no count */
        switch (s->kind) {
        case S_FREQ_DROP: {
            int64_t n = s->p[0];
            *s->count += 1;
            if (n == -1) {
                dropped = true;
            } else if (n >= 1 && *s->count == n) {
                *s->count = 0;
                dropped = true;
            }
            break;
        }
        case S_PACKET_LOSS:
            dropped = hit(&s->rng, (uint64_t)s->p[0]);
            break;
        case S_BURST_LOSS: {
            uint64_t u = u53(&s->rng);
            if (s->bad)
                s->bad = !(u < (uint64_t)s->p[1]);
            else
                s->bad = u < (uint64_t)s->p[0];
            dropped = hit(&s->rng, (uint64_t)(s->bad ? s->p[2] : s->p[3]));
            break;
        }
        case S_DELAY: {
            int64_t delay = s->p[0], jitter = s->p[1], before_ = f->ready;
            if (jitter)
                delay += (int64_t)scaled(u53(&s->rng), (uint64_t)(2 * jitter + 1)) - jitter;
            if (delay > 0)
                f->ready = before_ + delay;
            d->delayed++;
            break;
        }
        case S_RATE:
            dropped = !rate_admit(s, f, &no_memory);
            break;
        case S_CORRUPT:
            if (hit(&s->rng, (uint64_t)s->p[0]) && f->len) {
                uint64_t bit = scaled(u53(&s->rng), (uint64_t)f->len * 8);
                f->data[bit >> 3] ^= (uint8_t)(1u << (bit & 7));
                d->corrupted++;
            }
            break;
        case S_DUPLICATE:
            if (hit(&s->rng, (uint64_t)s->p[0])) {
                /* the copy is taken now, as the frame is; the original runs the rest of the
                 * chain first, then the copy */
                d->duplicated++;
                frame_t *copy = frame_new(&L->pool);
                uint8_t *bytes = copy ? malloc(f->len ? f->len : 1) : NULL;
                if (bytes) {
                    memcpy(bytes, f->data, f->len);
                    copy->data = bytes;
                    copy->len = f->len;
                    copy->owned = true;
                    copy->ready = f->ready;
                    copy->hold = f->hold;
                } else if (copy) {
                    frame_free(&L->pool, copy);
                    copy = NULL;
                }
                run_chain(L, d, f, index + 1);
                if (copy)
                    run_chain(L, d, copy, index + 1);
                else
                    drop_no_memory(L, d, NULL);
                return;
            }
            break;
        case S_REORDER:
            if (hit(&s->rng, (uint64_t)s->p[0])) {
                f->hold = (int32_t)s->p[1];
                d->reordered++;
            }
            break;
        }
        if (no_memory) {
            drop_no_memory(L, d, f);
            return;
        }
        if (dropped) {
            count_drop(d, s->cause);
            note_cause(L, s->cause);
            frame_free(&L->pool, f);
            return;
        }
    }
    if (!ptrvec_push(&L->survivors, f))
        drop_no_memory(L, d, f);
}
