/*
 * tunnelscope/nio/_fastpath.c - the C hot loop.
 *
 * The same data path as tunnelscope/pipeline.py (the readable reference), without Python per
 * frame: recvmmsg batches in, the impairment chain, the output queue with its timers, pcap or
 * pcapng records, sendmmsg batches out. The semantics are docs/pipeline.md, to the bit; the
 * Python API is tunnelscope/nio/_fastpath.pyi.
 *
 * Sections, one per concern:
 *   1. constants and small helpers     6. capture encoding and the Capture type's core
 *   2. clock                           7. endpoint I/O (recvmmsg/read, sendmmsg/write, GSO)
 *   3. random numbers (splitmix64)     8. the loop: bridges, receive, transmit, timers, epoll
 *   4. frame pool                      9. Python types: Capture, Loop
 *   5. impairments and output queue   10. module helpers send_frames/recv_frames, module init
 *
 * Threads and locks. run() pumps with the GIL released, holding the loop's mutex while it
 * touches bridges (never while it waits in epoll). Every Loop method takes the same mutex, so
 * a control thread may call them while another thread is inside run(). A Capture has its own
 * mutex (the loop writes records into it; Python may call append/flush/close at any time).
 * Lock order: loop mutex, then capture mutex. Neither is ever held while waiting for the GIL.
 *
 * Memory. One receive buffer set per loop (BATCH slots of SLOT_SIZE bytes), whatever the
 * number of bridges. A frame's bytes stay in its slot while its batch is processed; only a
 * frame that must wait (delay, rate, reorder, a duplicate) gets a malloc'd copy, freed when
 * sent. Frame descriptors come from a pool trimmed to FREE_FRAMES_KEPT after every pass.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ==== 1. constants and small helpers ====================================================== */

#define BATCH 64                      /* frames per recvmmsg/sendmmsg */
#define SLOT_SIZE 65536               /* bytes per receive slot; a longer datagram is oversize */
#define PARK_NS 100000000LL           /* a reordered frame waits at most this long */
#define SIGNAL_CHECK_NS 200000000LL   /* longest wait between two looks at Python signals */
#define FLUSH_BYTES (1u << 20)        /* a capture buffer this large is written at once */
#define CAPTURE_KEEP_BYTES (1u << 18) /* capacity a capture buffer keeps after a flush */
#define STALL_BYTES (4u << 20)        /* a non-blocking reader this far behind has stalled */
#define RETRY_NS 10000000LL           /* a blocked (EAGAIN) capture is retried this often */
#define MAX_CUTS 4096                 /* finished ring-buffer files waiting for rotate() */
#define BPF_MAX_INSNS 4096            /* a classic BPF program's longest length */
#define FREE_FRAMES_KEPT 4096         /* frame descriptors the pool keeps between passes */
#define MAX_EVENTS 64
#define RECV_FRAMES_MAX 1024          /* recv_frames() reads at most this many at once */
#define SEND_POLL_MS 100              /* send_frames(): wait this long for room, then skip */
#define WAKE_ID UINT64_MAX            /* epoll tag of the wake eventfd */
#define NO_MEMORY "no_memory"         /* drop cause when a frame could not be kept */
#define GSO_SEGMENTS 64               /* UDP_SEGMENT: frames per send (UDP_MAX_SEGMENTS) */
#define GSO_BYTES 65507               /* UDP_SEGMENT: bytes per send (the largest datagram) */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

enum { KIND_DGRAM = 0, KIND_FD = 1 };
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

static inline void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline size_t pad4(size_t n) { return (4 - (n & 3)) & 3; }

/* A growable array of pointers (scratch lists of frames). */
typedef struct {
    void **a;
    size_t n, cap;
} ptrvec_t;

static bool ptrvec_push(ptrvec_t *v, void *p)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        void **a = realloc(v->a, cap * sizeof *a);
        if (!a)
            return false;
        v->a = a;
        v->cap = cap;
    }
    v->a[v->n++] = p;
    return true;
}

/* Lock a mutex from a thread holding the GIL, without holding the GIL while blocked. */
static void lock_with_gil(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(m);
    Py_END_ALLOW_THREADS
}

/* ==== 2. clock ============================================================================ */

static inline int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static inline int64_t real_ns(void) { return clock_ns(CLOCK_REALTIME); }

/* ==== 3. random numbers: splitmix64 (docs/pipeline.md) ==================================== */

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

/* ==== 4. frame pool ======================================================================= */

/* A frame that survived the chain. Its bytes are borrowed from the loop's receive buffer
 * until the end of its batch; a frame that must wait longer gets its own malloc'd copy. */
typedef struct frame {
    uint8_t *data;
    uint32_t len;
    bool owned;          /* data was malloc'd for this frame */
    bool live;           /* false once back in the pool */
    bool lost;           /* its bytes could not be kept (out of memory): dropped when due */
    int32_t hold;        /* reorder: frames to let pass first */
    int64_t ready;       /* monotonic ns when it may leave */
    uint64_t seq;        /* arrival sequence in its direction */
    int64_t deadline;    /* parked: sent anyway at this time */
    uint64_t release_at; /* parked: sent when the direction's send count reaches this */
    struct frame *prev, *next; /* parked FIFO; `next` also links the free list */
} frame_t;

typedef struct {
    frame_t *head;
    size_t n;
} pool_t;

static frame_t *frame_new(pool_t *pool)
{
    frame_t *f = pool->head;
    if (f) {
        pool->head = f->next;
        pool->n--;
    } else if (!(f = malloc(sizeof *f))) {
        return NULL;
    }
    memset(f, 0, sizeof *f);
    f->live = true;
    return f;
}

static void frame_free(pool_t *pool, frame_t *f)
{
    if (f->owned)
        free(f->data);
    f->data = NULL;
    f->owned = false;
    f->live = false;
    f->next = pool->head;
    pool->head = f;
    pool->n++;
}

/* Free a frame outside the pool (a bridge being removed). */
static void frame_release(frame_t *f)
{
    if (f->owned)
        free(f->data);
    free(f);
}

static void pool_trim(pool_t *pool, size_t keep)
{
    while (pool->n > keep) {
        frame_t *f = pool->head;
        pool->head = f->next;
        pool->n--;
        free(f);
    }
}

/* Give a frame its own copy of its bytes; on failure it is marked lost. */
static bool frame_own(frame_t *f)
{
    if (f->owned || f->lost)
        return true;
    uint8_t *copy = malloc(f->len ? f->len : 1);
    if (!copy) {
        f->lost = true;
        f->data = NULL;
        f->len = 0;
        return false;
    }
    memcpy(copy, f->data, f->len);
    f->data = copy;
    f->owned = true;
    return true;
}

/* Classic BPF (tunnelscope/bpf.py is the reference): a program checked by bpf_check runs
 * forward only, every load bounds-checked; a load past the frame's end rejects the frame. */
typedef struct {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
} bpf_insn_t;

enum {
    BPF_LD = 0x00, BPF_LDX = 0x01, BPF_ST = 0x02, BPF_STX = 0x03,
    BPF_ALU = 0x04, BPF_JMP = 0x05, BPF_RET = 0x06, BPF_MISC = 0x07,
    BPF_W = 0x00, BPF_H = 0x08, BPF_B = 0x10,
    BPF_IMM = 0x00, BPF_ABS = 0x20, BPF_IND = 0x40, BPF_MEM = 0x60, BPF_LEN = 0x80, BPF_MSH = 0xa0,
    BPF_ADD = 0x00, BPF_SUB = 0x10, BPF_MUL = 0x20, BPF_DIV = 0x30, BPF_OR = 0x40,
    BPF_AND = 0x50, BPF_LSH = 0x60, BPF_RSH = 0x70, BPF_NEG = 0x80, BPF_MOD = 0x90,
    BPF_XOR = 0xa0,
    BPF_JA = 0x00, BPF_JEQ = 0x10, BPF_JGT = 0x20, BPF_JGE = 0x30, BPF_JSET = 0x40,
    BPF_K = 0x00, BPF_X = 0x08, BPF_A = 0x10,
    BPF_TAX = 0x00, BPF_TXA = 0x80,
    BPF_MEMWORDS = 16,
};

/* NULL when the program may run, else why not. */
static const char *bpf_check(const bpf_insn_t *prog, size_t n)
{
    if (n == 0 || n > BPF_MAX_INSNS)
        return "empty or too long";
    for (size_t pc = 0; pc < n; pc++) {
        const bpf_insn_t *i = &prog[pc];
        unsigned cls = i->code & 0x07, mode = i->code & 0xe0, op = i->code & 0xf0;
        size_t left = n - pc - 1;
        switch (cls) {
        case BPF_LD:
        case BPF_LDX:
            if ((mode == BPF_MEM && i->k >= BPF_MEMWORDS) ||
                (cls == BPF_LDX && mode != BPF_IMM && mode != BPF_MEM && mode != BPF_LEN &&
                 !(mode == BPF_MSH && (i->code & 0x18) == BPF_B)) ||
                (cls == BPF_LD && mode == BPF_MSH))
                return "bad load";
            break;
        case BPF_ST:
        case BPF_STX:
            if (i->k >= BPF_MEMWORDS)
                return "bad store";
            break;
        case BPF_ALU:
            if (op > BPF_XOR)
                return "bad ALU op";
            if ((op == BPF_DIV || op == BPF_MOD) && (i->code & BPF_X) == 0 && i->k == 0)
                return "division by zero";
            break;
        case BPF_JMP:
            if (op == BPF_JA ? i->k >= left : (op > BPF_JSET || i->jt >= left || i->jf >= left))
                return "jump out of the program";
            break;
        case BPF_RET:
            break;
        case BPF_MISC:
            if (i->code != (BPF_MISC | BPF_TAX) && i->code != (BPF_MISC | BPF_TXA))
                return "bad misc op";
            break;
        }
    }
    return (prog[n - 1].code & 0x07) == BPF_RET ? NULL : "does not end with a return";
}

static inline bool bpf_load(const uint8_t *p, uint32_t len, uint32_t at, unsigned size,
                            uint32_t *out)
{
    if (at >= len || len - at < size)
        return false;
    *out = size == 4 ? (uint32_t)p[at] << 24 | (uint32_t)p[at + 1] << 16 |
                           (uint32_t)p[at + 2] << 8 | p[at + 3]
           : size == 2 ? (uint32_t)p[at] << 8 | p[at + 1]
                       : p[at];
    return true;
}

/* Run a checked program on one frame: the number of bytes to keep, 0 = rejected. */
static uint32_t bpf_run(const bpf_insn_t *prog, const uint8_t *p, uint32_t len)
{
    uint32_t A = 0, X = 0, mem[BPF_MEMWORDS] = {0};
    for (size_t pc = 0;; pc++) {
        const bpf_insn_t *i = &prog[pc];
        unsigned cls = i->code & 0x07, mode = i->code & 0xe0, op = i->code & 0xf0;
        unsigned size = (i->code & 0x18) == BPF_B ? 1 : (i->code & 0x18) == BPF_H ? 2 : 4;
        uint32_t v = (i->code & BPF_X) ? X : i->k;
        switch (cls) {
        case BPF_LD:
        case BPF_LDX: {
            uint32_t value;
            if (mode == BPF_IMM)
                value = i->k;
            else if (mode == BPF_LEN)
                value = len;
            else if (mode == BPF_MEM)
                value = mem[i->k];
            else if (cls == BPF_LDX) { /* MSH: 4 * the low nibble of a byte (an IP header) */
                if (!bpf_load(p, len, i->k, 1, &value))
                    return 0;
                value = (value & 0x0f) * 4;
            } else if ((mode == BPF_IND && X + i->k < X) ||
                       !bpf_load(p, len, mode == BPF_IND ? X + i->k : i->k, size, &value))
                return 0;
            if (cls == BPF_LD)
                A = value;
            else
                X = value;
            break;
        }
        case BPF_ST:
            mem[i->k] = A;
            break;
        case BPF_STX:
            mem[i->k] = X;
            break;
        case BPF_ALU:
            switch (op) {
            case BPF_ADD: A += v; break;
            case BPF_SUB: A -= v; break;
            case BPF_MUL: A *= v; break;
            case BPF_DIV: if (v == 0) return 0; A /= v; break;
            case BPF_MOD: if (v == 0) return 0; A %= v; break;
            case BPF_OR: A |= v; break;
            case BPF_AND: A &= v; break;
            case BPF_LSH: A = v < 32 ? A << v : 0; break;
            case BPF_RSH: A = v < 32 ? A >> v : 0; break;
            case BPF_NEG: A = 0u - A; break;
            default: A ^= v; break;
            }
            break;
        case BPF_JMP:
            if (op == BPF_JA) {
                pc += i->k;
                break;
            }
            bool taken = op == BPF_JEQ ? A == v : op == BPF_JGT ? A > v
                       : op == BPF_JGE ? A >= v : (A & v) != 0;
            pc += taken ? i->jt : i->jf;
            break;
        case BPF_RET:
            return (i->code & 0x18) == BPF_A ? A : (i->code & 0x18) == BPF_X ? X : i->k;
        default: /* BPF_MISC */
            if (i->code == (BPF_MISC | BPF_TAX))
                X = A;
            else
                A = X;
            break;
        }
    }
}

/* ==== 5. impairments and the output queue ================================================= */

typedef struct shared_counter {
    int64_t id;
    int64_t count;
    struct shared_counter *next;
} shared_counter_t;

typedef struct {
    int kind;
    int cause;       /* index into the direction's cause table */
    int64_t p[4];    /* the stage's integer parameters */
    uint64_t rng;    /* generator state, starts at the stage's seed */
    int64_t own_count;
    int64_t *count;  /* freq_drop: &own_count or a bridge's shared counter */
    bool bad;        /* burst_loss: Gilbert-Elliott state */
    int64_t tat;     /* rate: theoretical arrival time */
    int64_t *dep;    /* rate: ring of departures of frames still queued */
    size_t dep_head, dep_len, dep_cap;
    bpf_insn_t *filter; /* NULL: every frame; else a frame it rejects skips this stage */
} stage_t;

typedef struct {
    char *name;
    uint64_t count;
} cause_t;

struct bridge;

typedef struct direction {
    struct bridge *bridge;
    int index; /* 0 a2b, 1 b2a */
    stage_t *stages;
    int nstages;
    cause_t *causes; /* drop counters by cause name, in order of first use */
    int ncauses;
    uint64_t received, forwarded, send_errors, corrupted, duplicated, delayed, reordered;
    frame_t **heap; /* output queue: binary heap on (ready, seq) */
    size_t nheap, capheap;
    frame_t *park_head, *park_tail; /* parked (reordered) frames, FIFO */
    size_t nparked;
    uint64_t park_min; /* lower bound of the parked frames' release_at */
    uint64_t sends;    /* frames handed to the sender so far */
    uint64_t seq;
    ssize_t active; /* index in the loop's active list, or -1 */
} dir_t;

static void stages_free(stage_t *stages, int n)
{
    for (int i = 0; i < n; i++) {
        free(stages[i].dep);
        free(stages[i].filter);
    }
    free(stages);
}

/* The index of a drop cause in a direction's table, added when new; -1 when out of memory. */
static int cause_index(dir_t *d, const char *name)
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

static size_t queued(const dir_t *d) { return d->nheap + d->nparked; }

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

/* output queue: heap on (ready, seq) */
static inline bool before(const frame_t *a, const frame_t *b)
{
    return a->ready < b->ready || (a->ready == b->ready && a->seq < b->seq);
}

static bool heap_push(dir_t *d, frame_t *f)
{
    if (d->nheap == d->capheap) {
        size_t cap = d->capheap ? d->capheap * 2 : 64;
        frame_t **heap = realloc(d->heap, cap * sizeof *heap);
        if (!heap)
            return false;
        d->heap = heap;
        d->capheap = cap;
    }
    size_t i = d->nheap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(f, d->heap[parent]))
            break;
        d->heap[i] = d->heap[parent];
        i = parent;
    }
    d->heap[i] = f;
    return true;
}

static frame_t *heap_pop(dir_t *d)
{
    frame_t *top = d->heap[0];
    frame_t *last = d->heap[--d->nheap];
    size_t n = d->nheap, i = 0;
    if (n == 0)
        return top;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && before(d->heap[child + 1], d->heap[child]))
            child++;
        if (!before(d->heap[child], last))
            break;
        d->heap[i] = d->heap[child];
        i = child;
    }
    d->heap[i] = last;
    return top;
}

static void park_append(dir_t *d, frame_t *f)
{
    f->next = NULL;
    f->prev = d->park_tail;
    if (d->park_tail)
        d->park_tail->next = f;
    else
        d->park_head = f;
    d->park_tail = f;
    if (d->nparked++ == 0 || f->release_at < d->park_min)
        d->park_min = f->release_at;
}

static void park_remove(dir_t *d, frame_t *f)
{
    if (f->prev)
        f->prev->next = f->next;
    else
        d->park_head = f->next;
    if (f->next)
        f->next->prev = f->prev;
    else
        d->park_tail = f->prev;
    f->prev = f->next = NULL;
    d->nparked--;
}

/* ==== 6. capture encoding and the Capture type's core ===================================== */

/* The C twin of capture.RecordSink: records buffered, written with one write() per batch or
 * timer; a failed write cuts a regular file back to its last whole record and stops. */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    int fd;
    bool pcapng, nanosecond, close_fd, seekable;
    bool closed, has_header;
    uint32_t snaplen;
    int64_t flush_ns; /* -1: flush_ms None (write after every batch) */
    PyObject *flush_ms; /* as given, for the attribute */
    uint64_t frames;
    uint8_t *buf;
    size_t len, cap;
    int64_t oldest; /* monotonic ns of the oldest unwritten record, -1: none */
    off_t offset;   /* file offset after the last successful write */
    bool failed;
    bool blocked;   /* the last write met EAGAIN: retried on the timer */
    char error[200];
    /* ring buffer: a file is full once it holds limit_frames records or limit_bytes bytes;
     * the next record then starts a new segment of buf, written by rotate() to the next file */
    uint64_t limit_frames, limit_bytes, max_frames; /* 0: no limit */
    uint64_t file_frames; /* records in the open (last) segment */
    uint64_t written;     /* bytes of the current file already written */
    size_t header_len;    /* bytes of the first header, repeated by each new file */
    size_t cuts[MAX_CUTS]; /* offsets in buf where a finished file ends */
    size_t ncuts;
} CaptureObject;

static void cap_release(CaptureObject *c)
{
    c->closed = true;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    c->oldest = -1;
    if (c->close_fd && c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

static void cap_fail(CaptureObject *c, int err)
{
    char text[128];
    const char *reason = strerror_r(err, text, sizeof text);
    snprintf(c->error, sizeof c->error, "capture stopped: %s", reason);
    c->failed = true;
    cap_release(c);
}

/* Bytes of the current file still in buf: up to the first cut. */
static size_t cap_head(const CaptureObject *c) { return c->ncuts ? c->cuts[0] : c->len; }

/* Drop the first n bytes of buf (written), moving the cuts along. */
static void cap_consume(CaptureObject *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    for (size_t i = 0; i < c->ncuts; i++)
        c->cuts[i] -= n;
}

/* Write the current file's buffered bytes. A non-blocking reader that is not keeping up
 * (EAGAIN) keeps the rest buffered, up to STALL_BYTES. The caller holds c->lock. */
static void cap_flush(CaptureObject *c)
{
    size_t head = cap_head(c);
    if (c->closed || !c->has_header || head == 0)
        return;
    size_t done = 0;
    c->blocked = false;
    while (done < head) {
        ssize_t n = write(c->fd, c->buf + done, head - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->blocked = true;
            break;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            if (c->seekable) /* cut the half-written batch so the file ends on a record */
                (void)!ftruncate(c->fd, c->offset);
            cap_fail(c, err);
            return;
        }
        done += (size_t)n;
    }
    c->offset += (off_t)done;
    c->written += done;
    cap_consume(c, done);
    if (c->blocked) {
        if (c->len > STALL_BYTES) {
            snprintf(c->error, sizeof c->error, "reader stalled");
            c->failed = true;
            cap_release(c);
        } else {
            c->oldest = mono_ns();
        }
        return;
    }
    c->oldest = c->len ? mono_ns() : -1;
    if (c->cap > 2 * CAPTURE_KEEP_BYTES) { /* a burst grew it: give the memory back */
        uint8_t *buf = realloc(c->buf, CAPTURE_KEEP_BYTES);
        if (buf) {
            c->buf = buf;
            c->cap = CAPTURE_KEEP_BYTES;
        }
    }
}

static bool cap_reserve(CaptureObject *c, size_t extra)
{
    if (c->len + extra <= c->cap)
        return true;
    size_t cap = c->cap ? c->cap : 65536;
    while (cap < c->len + extra)
        cap *= 2;
    uint8_t *buf = realloc(c->buf, cap);
    if (!buf) {
        cap_fail(c, ENOMEM);
        return false;
    }
    c->buf = buf;
    c->cap = cap;
    return true;
}

/* Append raw bytes (header blocks, records from Python). */
static bool cap_put(CaptureObject *c, const void *data, size_t len)
{
    if (!cap_reserve(c, len))
        return false;
    if (len)
        memcpy(c->buf + c->len, data, len);
    c->len += len;
    return true;
}

/* Put a header before everything buffered (the cuts move along). */
static bool cap_prepend(CaptureObject *c, const void *header, size_t n)
{
    if (!cap_reserve(c, n))
        return false;
    memmove(c->buf + n, c->buf, c->len);
    memcpy(c->buf, header, n);
    c->len += n;
    for (size_t i = 0; i < c->ncuts; i++)
        c->cuts[i] += n;
    return true;
}

/* Records counted and buffered: the flush policy of RecordSink.append. */
static void cap_appended(CaptureObject *c, uint64_t count, int64_t now)
{
    if (c->closed)
        return;
    c->frames += count;
    if (c->oldest < 0)
        c->oldest = now;
    if ((c->flush_ns < 0 && !c->blocked) || cap_head(c) >= FLUSH_BYTES)
        cap_flush(c);
}

/* Bytes the open segment's file will hold (its header included). */
static uint64_t cap_file_bytes(const CaptureObject *c)
{
    if (c->ncuts)
        return c->header_len + (c->len - c->cuts[c->ncuts - 1]);
    return c->written + c->len;
}

/* End the open file here: the next record starts a new one. */
static void cap_cut(CaptureObject *c)
{
    if (c->ncuts == MAX_CUTS) { /* nobody rotates: keep writing into the last file */
        return;
    }
    c->cuts[c->ncuts++] = c->len;
    c->file_frames = 0;
}

/* May one more record be taken? Ends a full file first (ring buffer). */
static bool cap_admit(CaptureObject *c)
{
    if (c->closed || (c->max_frames && c->frames >= c->max_frames))
        return false;
    if ((c->limit_frames && c->file_frames >= c->limit_frames) ||
        (c->limit_bytes && c->file_frames && cap_file_bytes(c) >= c->limit_bytes))
        cap_cut(c);
    c->file_frames++;
    c->frames++;
    return true;
}

/* When the timer must flush this capture next; INT64_MAX: never. Caller holds c->lock. */
static int64_t cap_deadline(const CaptureObject *c)
{
    if (c->closed || !c->has_header || c->oldest < 0 || cap_head(c) == 0)
        return INT64_MAX;
    int64_t delay = c->flush_ns > 0 ? c->flush_ns : 0;
    return c->oldest + (c->blocked && delay < RETRY_NS ? RETRY_NS : delay);
}

/* Start a record (pcap: the whole record; pcapng: the EPB up to its options). Returns its
 * offset in the buffer, or SIZE_MAX when the capture stopped. */
static size_t cap_begin(CaptureObject *c, uint32_t iface, int64_t ts, const uint8_t *data,
                        uint32_t len)
{
    uint32_t caplen = len < c->snaplen ? len : c->snaplen;
    if (!cap_admit(c))
        return SIZE_MAX;
    size_t off = c->len;
    if (c->pcapng) {
        size_t body = caplen + pad4(caplen);
        if (!cap_reserve(c, 28 + body))
            return SIZE_MAX;
        uint8_t *p = c->buf + off;
        put32(p, 6);
        put32(p + 4, 0); /* total length, set by cap_end */
        put32(p + 8, iface);
        put32(p + 12, (uint32_t)((uint64_t)ts >> 32));
        put32(p + 16, (uint32_t)ts);
        put32(p + 20, caplen);
        put32(p + 24, len);
        memcpy(p + 28, data, caplen);
        memset(p + 28 + caplen, 0, body - caplen);
        c->len += 28 + body;
    } else {
        if (!cap_reserve(c, 16 + (size_t)caplen))
            return SIZE_MAX;
        uint8_t *p = c->buf + off;
        uint64_t sec = (uint64_t)ts / 1000000000u, frac = (uint64_t)ts % 1000000000u;
        put32(p, (uint32_t)sec);
        put32(p + 4, (uint32_t)(c->nanosecond ? frac : frac / 1000));
        put32(p + 8, caplen);
        put32(p + 12, len);
        memcpy(p + 16, data, caplen);
        c->len += 16 + (size_t)caplen;
    }
    return off;
}

/* Finish a pcapng EPB: epb_flags, the "dropped by a, b" comment, end of options, length. */
static void cap_end(CaptureObject *c, size_t off, uint32_t flags, const dir_t *d,
                    const int *causes, size_t ncauses)
{
    static const char prefix[] = "dropped by ";
    if (off == SIZE_MAX || c->closed || !c->pcapng)
        return;
    size_t clen = 0;
    if (ncauses) {
        clen = sizeof prefix - 1;
        for (size_t i = 0; i < ncauses; i++)
            clen += strlen(d->causes[causes[i]].name) + (i ? 2 : 0);
    }
    size_t need = (flags ? 8 : 0) + (clen ? 4 + clen + pad4(clen) : 0) + 4 + 4;
    if (!cap_reserve(c, need))
        return;
    uint8_t *p = c->buf + c->len;
    if (flags) {
        put16(p, 2);
        put16(p + 2, 4);
        put32(p + 4, flags);
        p += 8;
    }
    if (clen) {
        put16(p, 1);
        put16(p + 2, (uint16_t)clen);
        p += 4;
        memcpy(p, prefix, sizeof prefix - 1);
        p += sizeof prefix - 1;
        for (size_t i = 0; i < ncauses; i++) {
            if (i) {
                memcpy(p, ", ", 2);
                p += 2;
            }
            size_t n = strlen(d->causes[causes[i]].name);
            memcpy(p, d->causes[causes[i]].name, n);
            p += n;
        }
        memset(p, 0, pad4(clen));
        p += pad4(clen);
    }
    if (flags || clen) {
        put32(p, 0); /* opt_endofopt */
        p += 4;
    }
    size_t total = (size_t)(p - (c->buf + off)) + 4;
    put32(p, (uint32_t)total);
    put32(c->buf + off + 4, (uint32_t)total);
    c->len = off + total;
}

/* ==== 7. endpoint I/O ===================================================================== */

/* A link end. Its counters are the endpoint's own, as in tunnelscope.nio.spec.Endpoint:
 * stats(bridge, direction) reports those of the endpoint that direction receives from. */
typedef struct {
    int fd;
    int kind;
    bool registered; /* in the epoll set (false once it failed for good) */
    bool packet;     /* AF_PACKET: frames the host sent (PACKET_OUTGOING) are not read */
    bool has_peer;   /* a Unix datagram socket with a peer path to (re)connect to */
    bool udp;        /* a UDP socket: runs of equal-size frames may go out as one GSO send */
    uint32_t gso_max; /* longest frame sent with UDP_SEGMENT (lowered when the kernel says no) */
    bool connected;
    struct sockaddr_un peer;
    socklen_t peerlen;
    uint64_t refused, oversize, send_busy, send_failed;
} endpoint_t;

typedef struct {
    uint8_t *data;
    uint32_t len;
} rxframe_t;

/* Errors after which an endpoint is not read again (the fd is gone or broken). */
static bool fatal_recv_error(int err)
{
    switch (err) {
    case EBADF:
    case EBADFD:
    case ENOTSOCK:
    case EINVAL:
    case EFAULT:
    case EIO:
    case ENXIO:
    case ENODEV:
    case ENOTCONN:
        return true;
    default:
        return false;
    }
}

static bool endpoint_connect(endpoint_t *ep)
{
    int r;
    do
        r = connect(ep->fd, (struct sockaddr *)&ep->peer, ep->peerlen);
    while (r < 0 && errno == EINTR);
    ep->connected = r == 0;
    return ep->connected;
}

/* Buffers for one sendmmsg: BATCH messages; with GSO one message carries a run of up to
 * GSO_SEGMENTS frames of one size (one iovec each) and a UDP_SEGMENT control message. */
typedef union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    size_t align; /* a cmsghdr starts with a size_t */
} gso_control_t;

typedef struct {
    struct mmsghdr msgs[BATCH];
    size_t frames[BATCH]; /* frames carried by each message */
    gso_control_t control[BATCH];
    struct iovec *iov; /* BATCH * GSO_SEGMENTS entries */
} txbuf_t;

/* Fill tx with messages for frames[i..n); returns the number of messages. */
static unsigned build_messages(txbuf_t *tx, endpoint_t *ep, bool gso, frame_t **frames,
                               size_t i, size_t n)
{
    unsigned k = 0;
    size_t used = 0; /* iovecs */
    while (k < BATCH && i < n) {
        uint32_t len = frames[i]->len;
        size_t run = 1;
        if (gso && ep->udp && len > 0 && len <= ep->gso_max)
            while (i + run < n && run < GSO_SEGMENTS && frames[i + run]->len == len &&
                   (run + 1) * len <= GSO_BYTES)
                run++;
        struct msghdr *h = &tx->msgs[k].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_iov = &tx->iov[used];
        h->msg_iovlen = run;
        for (size_t j = 0; j < run; j++) {
            tx->iov[used + j].iov_base = frames[i + j]->data;
            tx->iov[used + j].iov_len = len;
        }
        if (run > 1) { /* the kernel cuts it back into `run` datagrams of `len` bytes */
            h->msg_control = tx->control[k].buf;
            h->msg_controllen = sizeof tx->control[k].buf;
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)len;
            memcpy(CMSG_DATA(c), &segment, sizeof segment);
        }
        tx->frames[k++] = run;
        used += run;
        i += run;
    }
    return k;
}

/* Send `n` frames, in order; each counts once in `forwarded` or `errors`. The endpoint's
 * counters follow tunnelscope.nio.spec.Endpoint.send_batch: a full buffer (EAGAIN, ENOBUFS)
 * gives up the rest of the batch (send_busy); ECONNREFUSED counts as refused (a Unix socket
 * then reconnects at the next batch, giving up this one); anything else is send_failed.
 * With `gso`, a failed run is accounted as sendmmsg would account its first frame. */
static void send_batch(endpoint_t *ep, frame_t **frames, size_t n, txbuf_t *tx, bool gso,
                       uint64_t *forwarded, uint64_t *errors)
{
    if (ep->has_peer && !ep->connected && !endpoint_connect(ep)) {
        ep->refused += n;
        *errors += n;
        return;
    }
    size_t i = 0;
    int interrupted = 0;
    while (i < n) {
        int err;
        if (ep->kind == KIND_DGRAM) {
            unsigned k = build_messages(tx, ep, gso, frames, i, n);
            int r = sendmmsg(ep->fd, tx->msgs, k, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (r > 0) {
                for (int m = 0; m < r; m++) {
                    *forwarded += tx->frames[m];
                    i += tx->frames[m];
                }
                continue;
            }
            err = r < 0 ? errno : EAGAIN;
            if (tx->frames[0] > 1 && (err == EINVAL || err == EIO || err == EOPNOTSUPP ||
                                      err == ENOPROTOOPT || err == EMSGSIZE)) {
                /* no GSO for frames this long here (MTU, no checksum offload, old kernel) */
                ep->gso_max = frames[i]->len - 1;
                continue;
            }
        } else {
            ssize_t r = write(ep->fd, frames[i]->data, frames[i]->len);
            if (r >= 0) {
                ++*forwarded;
                i++;
                continue;
            }
            err = errno;
        }
        if (err == EINTR && interrupted++ < 8)
            continue;
        size_t remaining = n - i;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) { /* the rest would fail too */
            ep->send_busy += remaining;
            *errors += remaining;
            return;
        }
        if (err == ECONNREFUSED && ep->has_peer) { /* the peer went away: reconnect later */
            ep->connected = false;
            ep->refused += remaining;
            *errors += remaining;
            return;
        }
        if (err == ECONNREFUSED)
            ep->refused++;
        else
            ep->send_failed++;
        ++*errors;
        i++;
    }
}

/* ==== 8. the loop ========================================================================= */

/* One capture of a bridge: where its records go, at which points, which frames. */
typedef struct {
    uint64_t id;
    CaptureObject *capture; /* strong reference (through L->caps) */
    int32_t pre, post;      /* interface ids, -1 when that point is not captured */
    bpf_insn_t *filter;     /* NULL: every frame */
    size_t nfilter;
    bool live;  /* scratch: taking records in this batch (its lock is held) */
    size_t off; /* scratch: the offset of the record being written */
} tap_t;

typedef struct bridge {
    uint64_t id;
    endpoint_t ends[2];
    dir_t dirs[2];
    shared_counter_t *shared; /* freq_drop counters shared by both directions */
    tap_t *taps;
    size_t ntaps;
    uint64_t next_tap; /* ids count from 0 and are never reused */
} bridge_t;

typedef struct {
    CaptureObject *capture; /* strong reference */
    size_t users;           /* bridges using it */
} capref_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    int epfd, wakefd;
    bool running;
    bool use_pwait2;
    bridge_t **bridges; /* by id; NULL once removed. Ids are never reused. */
    size_t nbridges, capbridges;
    dir_t **active; /* directions with frames queued or parked (they need timers) */
    size_t nactive, capactive;
    capref_t *caps; /* captures in use, for their flush timers */
    size_t ncaps, capcaps;
    pool_t pool;
    /* the one receive buffer set of the loop: BATCH slots of SLOT_SIZE bytes */
    uint8_t *rxbuf;
    struct mmsghdr rx_msgs[BATCH];
    struct iovec rx_iov[BATCH];
    struct sockaddr_ll rx_names[BATCH]; /* AF_PACKET only: the packet type of each frame */
    bool rx_named;                      /* rx_msgs currently ask for them */
    rxframe_t rx[BATCH];
    txbuf_t tx;
    bool gso; /* send runs of equal-size UDP frames with UDP_SEGMENT */
    struct epoll_event events[MAX_EVENTS];
    /* scratch, reused for every frame or batch */
    ptrvec_t survivors; /* frames out of the chain for one received frame */
    ptrvec_t borrowed;  /* queued frames still pointing into rxbuf */
    ptrvec_t out;       /* frames released for sending */
    ptrvec_t stack;     /* frames released by a send, still to be sent */
    int *causes;        /* drop causes of one received frame (indexes) */
    size_t ncauses, capcauses;
} LoopObject;

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

static void deactivate(LoopObject *L, dir_t *d)
{
    if (d->active < 0)
        return;
    dir_t *last = L->active[--L->nactive];
    L->active[d->active] = last;
    last->active = d->active;
    d->active = -1;
}

static void count_drop(dir_t *d, int cause)
{
    if (cause >= 0)
        d->causes[cause].count++;
}

/* A frame lost for want of memory: counted as dropped by "no_memory". */
static void drop_no_memory(LoopObject *L, dir_t *d, frame_t *f)
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

/* Take every decision for one frame now (pipeline.Pipeline.run_chain): survivors are pushed
 * to L->survivors, drop causes noted in L->causes, depth first (a duplicate's copy runs the
 * rest of the chain after the original). */
static void run_chain(LoopObject *L, dir_t *d, frame_t *f, int start)
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

static bool ptrvec_reserve(ptrvec_t *v, size_t extra)
{
    if (v->n + extra <= v->cap)
        return true;
    size_t cap = v->cap ? v->cap : 256;
    while (cap < v->n + extra)
        cap *= 2;
    void **a = realloc(v->a, cap * sizeof *a);
    if (!a)
        return false;
    v->a = a;
    v->cap = cap;
    return true;
}

/* After a send: every parked frame whose hold reached 0 leaves the park, in FIFO order, and
 * goes on the stack to be sent next (pipeline.Pipeline._send). A parked frame's hold is
 * release_at - sends, since every send decrements every parked frame's hold by one. */
static void release_parked(LoopObject *L, dir_t *d)
{
    if (!ptrvec_reserve(&L->stack, d->nparked))
        return; /* out of memory: they leave on their park deadline instead */
    size_t base = L->stack.n;
    uint64_t low = UINT64_MAX;
    for (frame_t *f = d->park_head, *next; f; f = next) {
        next = f->next;
        if (f->release_at <= d->sends) {
            park_remove(d, f);
            L->stack.a[L->stack.n++] = f;
        } else if (f->release_at < low) {
            low = f->release_at;
        }
    }
    d->park_min = low;
    for (size_t i = base, j = L->stack.n - 1; i < j; i++, j--) { /* first released on top */
        void *t = L->stack.a[i];
        L->stack.a[i] = L->stack.a[j];
        L->stack.a[j] = t;
    }
}

/* Hand a frame to the sender, then every parked frame its sending releases, depth first. */
static void send_one(LoopObject *L, dir_t *d, frame_t *f)
{
    size_t base = L->stack.n;
    for (;;) {
        if (f->lost || !ptrvec_push(&L->out, f)) {
            drop_no_memory(L, d, f);
        } else {
            d->sends++;
            if (d->nparked && d->sends >= d->park_min)
                release_parked(L, d);
        }
        if (L->stack.n == base)
            return;
        f = L->stack.a[--L->stack.n];
    }
}

/* Frames due at `now`, in send order, to L->out (pipeline.Pipeline.release). */
static void release(LoopObject *L, dir_t *d, int64_t now)
{
    while (d->nheap && d->heap[0]->ready <= now) {
        frame_t *f = heap_pop(d);
        if (f->hold > 0) {
            f->deadline = now + PARK_NS;
            f->release_at = d->sends + (uint64_t)f->hold;
            park_append(d, f);
        } else {
            send_one(L, d, f);
        }
    }
    while (d->park_head && d->park_head->deadline <= now) {
        frame_t *f = d->park_head;
        park_remove(d, f);
        send_one(L, d, f);
    }
}

static inline uint32_t capture_flag(const dir_t *d) { return d->index == 0 ? 2 : 1; }

static inline bool tap_match(const tap_t *tap, const uint8_t *data, uint32_t len)
{
    return !tap->filter || bpf_run(tap->filter, data, len) != 0;
}

/* Release what is due, record it at the post point, send it (pipeline.Link.transmit). */
static void transmit(LoopObject *L, bridge_t *b, dir_t *d, int64_t now)
{
    L->out.n = 0;
    release(L, d, now);
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
                size_t off = cap_begin(c, (uint32_t)tap->post, ts, out[i]->data, out[i]->len);
                cap_end(c, off, capture_flag(d), d, NULL, 0);
            }
            cap_appended(c, 0, now);
            pthread_mutex_unlock(&c->lock);
        }
        send_batch(&b->ends[1 - d->index], out, n, &L->tx, L->gso, &d->forwarded,
                   &d->send_errors);
        for (size_t i = 0; i < n; i++)
            frame_free(&L->pool, out[i]);
        L->out.n = 0;
    }
    if (queued(d))
        activate(L, d);
    else
        deactivate(L, d);
}

static void deregister(LoopObject *L, endpoint_t *ep)
{
    if (ep->registered)
        epoll_ctl(L->epfd, EPOLL_CTL_DEL, ep->fd, NULL);
    ep->registered = false;
}

/* One recvmmsg into the loop's receive slots; returns frames kept or -errno. */
static int recv_dgram(LoopObject *L, endpoint_t *ep)
{
    if (ep->packet || L->rx_named) {
        for (int i = 0; i < BATCH; i++) {
            L->rx_msgs[i].msg_hdr.msg_name = ep->packet ? &L->rx_names[i] : NULL;
            L->rx_msgs[i].msg_hdr.msg_namelen = ep->packet ? sizeof L->rx_names[i] : 0;
        }
        L->rx_named = ep->packet;
    }
    for (int attempt = 0; attempt < 8; attempt++) {
        int r = recvmmsg(ep->fd, L->rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == ECONNREFUSED) { /* ICMP port unreachable from an earlier send */
                ep->refused++;
                continue;
            }
            if (errno == EINTR || !fatal_recv_error(errno))
                continue; /* other one-shot socket errors are cleared by reporting them */
            return -errno;
        }
        int kept = 0;
        for (int i = 0; i < r; i++) {
            struct msghdr *h = &L->rx_msgs[i].msg_hdr;
            if (ep->packet && h->msg_namelen >= sizeof L->rx_names[i] &&
                L->rx_names[i].sll_pkttype == PACKET_OUTGOING)
                continue; /* sent by this host, not received from the wire */
            if (h->msg_flags & MSG_TRUNC) {
                ep->oversize++;
                continue;
            }
            L->rx[kept].data = L->rxbuf + (size_t)i * SLOT_SIZE;
            L->rx[kept].len = L->rx_msgs[i].msg_len;
            kept++;
        }
        if (ep->packet) /* the kernel shortened them; the next attempt needs them whole */
            for (int i = 0; i < r; i++)
                L->rx_msgs[i].msg_hdr.msg_namelen = sizeof L->rx_names[i];
        if (kept || r < BATCH)
            return kept;
        /* a whole batch of skipped datagrams: read on, the batch has room */
    }
    return 0;
}

/* Up to BATCH read() calls, one frame each (TAP). */
static int recv_fd(LoopObject *L, endpoint_t *ep, uint32_t events)
{
    int kept = 0, interrupted = 0;
    for (int reads = 0; reads < BATCH;) {
        uint8_t *slot = L->rxbuf + (size_t)kept * SLOT_SIZE;
        ssize_t r = read(ep->fd, slot, SLOT_SIZE);
        if (r < 0) {
            if (errno == EINTR && interrupted++ < 8)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK && fatal_recv_error(errno) && !kept)
                return -errno;
            break;
        }
        reads++;
        if (r == 0) { /* end of file: nothing more will come */
            if (!kept && (events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)))
                return -EPIPE;
            break;
        }
        if (r >= SLOT_SIZE) { /* read() cannot tell: a full slot may be a cut frame */
            ep->oversize++;
            continue;
        }
        L->rx[kept].data = slot;
        L->rx[kept].len = (uint32_t)r;
        kept++;
    }
    return kept;
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

/* One receive batch: pre tap, chain, queue, release, post tap, send (pipeline.Link.receive). */
static void link_receive(LoopObject *L, bridge_t *b, dir_t *d, size_t n, int64_t now)
{
    d->received += n;
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
    for (size_t i = 0; i < n; i++) {
        rxframe_t *rx = &L->rx[i];
        for (size_t t = 0; t < b->ntaps; t++) {
            tap_t *tap = &b->taps[t];
            tap->off = tap->live && tap_match(tap, rx->data, rx->len)
                           ? cap_begin(tap->capture, (uint32_t)tap->pre, ts, rx->data, rx->len)
                           : SIZE_MAX;
        }
        L->survivors.n = 0;
        L->ncauses = 0;
        frame_t *f = frame_new(&L->pool);
        if (f) {
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
    transmit(L, b, d, now);
    own_borrowed(L);
}

static bridge_t *find_bridge(LoopObject *L, uint64_t id)
{
    return id < L->nbridges ? L->bridges[id] : NULL;
}

static void handle_event(LoopObject *L, uint64_t tag, uint32_t events)
{
    bridge_t *b = find_bridge(L, tag >> 1);
    if (!b) /* removed while the event waited */
        return;
    int side = (int)(tag & 1);
    endpoint_t *ep = &b->ends[side];
    dir_t *d = &b->dirs[side];
    if (!ep->registered)
        return;
    int n = ep->kind == KIND_DGRAM ? recv_dgram(L, ep) : recv_fd(L, ep, events);
    if (n < 0)
        deregister(L, ep); /* the fd is broken for good: stop reading it, keep the bridge */
    else if (n > 0) /* the arrival time: read once the batch is in, so no frame leaves early */
        link_receive(L, b, d, (size_t)n, mono_ns());
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

/* ==== 9. Python types ===================================================================== */

/* ---- Capture ---- */

static PyObject *Capture_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "pcapng", "nanosecond", "snaplen", "flush_ms", "close_fd", NULL};
    int fd, pcapng, nanosecond, close_fd = 0;
    long long snaplen;
    PyObject *flush_ms;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ippLO|p:Capture", kwlist, &fd, &pcapng,
                                     &nanosecond, &snaplen, &flush_ms, &close_fd))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return NULL;
    }
    if (snaplen < 0 || snaplen > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "snaplen out of range");
        return NULL;
    }
    int64_t flush_ns = -1;
    if (flush_ms != Py_None) {
        double ms = PyFloat_AsDouble(flush_ms);
        if (ms == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(ms >= 0 && ms <= 1e12)) {
            PyErr_SetString(PyExc_ValueError, "flush_ms must be None or a number >= 0");
            return NULL;
        }
        flush_ns = (int64_t)(ms * 1e6 + 0.5);
    }
    CaptureObject *c = (CaptureObject *)type->tp_alloc(type, 0);
    if (!c)
        return NULL;
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        Py_TYPE(c)->tp_free((PyObject *)c);
        return PyErr_NoMemory();
    }
    c->fd = fd;
    c->pcapng = pcapng;
    c->nanosecond = nanosecond;
    c->close_fd = close_fd;
    c->snaplen = (uint32_t)snaplen;
    c->flush_ns = flush_ns;
    Py_INCREF(flush_ms);
    c->flush_ms = flush_ms;
    c->oldest = -1;
    struct stat st;
    c->seekable = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    if (c->seekable) { /* where this capture's first byte goes (0 after O_TRUNC) */
        off_t pos = lseek(fd, 0, SEEK_CUR);
        c->offset = pos < 0 ? 0 : pos;
    }
    return (PyObject *)c;
}

static void Capture_dealloc(CaptureObject *c)
{
    if (!c->closed) { /* nobody else can hold it now: write what is left, then close */
        cap_flush(c);
        cap_release(c);
    }
    free(c->buf);
    Py_XDECREF(c->flush_ms);
    pthread_mutex_destroy(&c->lock);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Capture_set_header(CaptureObject *c, PyObject *arg)
{
    Py_buffer header;
    if (PyObject_GetBuffer(arg, &header, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    if (c->closed) {
        c->has_header = true;
    } else if (!c->has_header) { /* the header goes before the records kept so far */
        if (cap_prepend(c, header.buf, (size_t)header.len)) {
            c->header_len = (size_t)header.len;
            c->has_header = true;
            cap_flush(c);
        }
    } else if (cap_put(c, header.buf, (size_t)header.len)) { /* a later block (a new IDB) */
        cap_appended(c, 0, mono_ns());
    }
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&header);
    Py_RETURN_NONE;
}

static PyObject *Capture_pending(CaptureObject *c, PyObject *Py_UNUSED(unused))
{
    lock_with_gil(&c->lock);
    PyObject *result = PyBytes_FromStringAndSize(
        c->has_header ? NULL : (const char *)c->buf, c->has_header ? 0 : (Py_ssize_t)c->len);
    pthread_mutex_unlock(&c->lock);
    return result;
}

static PyObject *Capture_append(CaptureObject *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"records", "count", NULL};
    Py_buffer records;
    long long count = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|L:append", kwlist, &records, &count))
        return NULL;
    if (count < 0) {
        PyBuffer_Release(&records);
        PyErr_SetString(PyExc_ValueError, "count must be >= 0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    if (!c->closed && cap_put(c, records.buf, (size_t)records.len))
        cap_appended(c, (uint64_t)count, mono_ns());
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&records);
    Py_RETURN_NONE;
}

static PyObject *Capture_flush(CaptureObject *c, PyObject *Py_UNUSED(unused))
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    cap_flush(c);
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Capture_flush_due(CaptureObject *c, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    double deadline = -1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    if (!c->closed && c->oldest >= 0) {
        int64_t due = c->oldest + (c->flush_ns > 0 ? c->flush_ns : 0);
        if (now * 1e9 >= (double)due)
            cap_flush(c);
        else
            deadline = (double)due / 1e9;
    }
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    if (deadline < 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(deadline);
}

static PyObject *Capture_close(CaptureObject *c, PyObject *Py_UNUSED(unused))
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    if (!c->closed) {
        cap_flush(c);
        cap_release(c);
    }
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Capture_set_limits(CaptureObject *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"frames", "bytes", "total", NULL};
    unsigned long long frames = 0, bytes = 0, total = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|KKK:set_limits", kwlist, &frames, &bytes,
                                     &total))
        return NULL;
    lock_with_gil(&c->lock);
    c->limit_frames = frames;
    c->limit_bytes = bytes;
    c->max_frames = total;
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

static PyObject *Capture_cut(CaptureObject *c, PyObject *Py_UNUSED(unused))
{
    lock_with_gil(&c->lock);
    if (!c->closed)
        cap_cut(c);
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

static PyObject *Capture_rotate(CaptureObject *c, PyObject *args)
{
    int fd;
    Py_buffer header;
    if (!PyArg_ParseTuple(args, "iy*:rotate", &fd, &header))
        return NULL;
    bool rotated = false;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->lock);
    if (!c->closed && c->has_header && c->ncuts) {
        cap_flush(c);
        if (!c->closed && !c->blocked) { /* the old file is complete: on to the next */
            if (c->close_fd)
                close(c->fd);
            c->fd = fd;
            struct stat st;
            c->seekable = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
            c->offset = 0;
            c->written = 0;
            memmove(c->cuts, c->cuts + 1, --c->ncuts * sizeof *c->cuts);
            if (cap_prepend(c, header.buf, (size_t)header.len))
                cap_appended(c, 0, mono_ns());
            rotated = true;
        }
    }
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&header);
    return PyBool_FromLong(rotated);
}

static PyObject *Capture_discard_pending(CaptureObject *c, PyObject *Py_UNUSED(unused))
{
    lock_with_gil(&c->lock);
    if (!c->has_header && !c->closed) {
        c->frames -= c->file_frames < c->frames ? c->file_frames : c->frames;
        c->len = c->ncuts = c->file_frames = 0;
        c->oldest = -1;
    }
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

static PyObject *Capture_get_files_done(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    size_t n = c->ncuts;
    pthread_mutex_unlock(&c->lock);
    return PyLong_FromSize_t(n);
}

static PyObject *Capture_get_error(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    bool failed = c->failed;
    char text[sizeof c->error];
    memcpy(text, c->error, sizeof text);
    pthread_mutex_unlock(&c->lock);
    if (!failed)
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
}

static PyObject *Capture_get_frames(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    uint64_t frames = c->frames;
    pthread_mutex_unlock(&c->lock);
    return PyLong_FromUnsignedLongLong(frames);
}

static PyObject *Capture_get_closed(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    bool closed = c->closed;
    pthread_mutex_unlock(&c->lock);
    return PyBool_FromLong(closed);
}

static PyObject *Capture_get_header_pending(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    bool pending = !c->has_header;
    pthread_mutex_unlock(&c->lock);
    return PyBool_FromLong(pending);
}

static PyObject *Capture_get_fd(CaptureObject *c, void *Py_UNUSED(closure))
{
    lock_with_gil(&c->lock);
    int fd = c->fd;
    pthread_mutex_unlock(&c->lock);
    return PyLong_FromLong(fd);
}

static PyObject *Capture_get_flush_ms(CaptureObject *c, void *Py_UNUSED(closure))
{
    Py_INCREF(c->flush_ms);
    return c->flush_ms;
}

static PyMethodDef Capture_methods[] = {
    {"set_header", (PyCFunction)Capture_set_header, METH_O,
     "Write the header (later: more header blocks, such as a new IDB) in stream order."},
    {"pending", (PyCFunction)Capture_pending, METH_NOARGS,
     "Records buffered while the header is pending (b'' once it is set)."},
    {"append", (PyCFunction)(void (*)(void))Capture_append, METH_VARARGS | METH_KEYWORDS,
     "append(records, count=1): buffer encoded records, flushed by the policy."},
    {"flush", (PyCFunction)Capture_flush, METH_NOARGS, "Write everything buffered now."},
    {"set_limits", (PyCFunction)(void (*)(void))Capture_set_limits, METH_VARARGS | METH_KEYWORDS,
     "set_limits(frames=0, bytes=0, total=0): ring-buffer file limits, autostop (0: none)."},
    {"cut", (PyCFunction)Capture_cut, METH_NOARGS, "End the current file at the next record."},
    {"rotate", (PyCFunction)Capture_rotate, METH_VARARGS,
     "rotate(fd, header) -> bool: finish the oldest full file, go on in fd with header."},
    {"discard_pending", (PyCFunction)Capture_discard_pending, METH_NOARGS,
     "Forget the records kept while the header is pending."},
    {"flush_due", (PyCFunction)Capture_flush_due, METH_O,
     "flush_due(now: time.monotonic()) -> next deadline or None, flushing when due."},
    {"close", (PyCFunction)Capture_close, METH_NOARGS, "Flush and stop (closes fd if close_fd)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Capture_getset[] = {
    {"error", (getter)Capture_get_error, NULL, "why the capture stopped, or None", NULL},
    {"frames", (getter)Capture_get_frames, NULL, "records appended", NULL},
    {"files_done", (getter)Capture_get_files_done, NULL, "full files waiting for rotate()",
     NULL},
    {"closed", (getter)Capture_get_closed, NULL, "stopped (closed or failed)", NULL},
    {"header_pending", (getter)Capture_get_header_pending, NULL, "no header set yet", NULL},
    {"fd", (getter)Capture_get_fd, NULL, "the file descriptor (-1 once closed by us)", NULL},
    {"flush_ms", (getter)Capture_get_flush_ms, NULL, "flush delay in ms, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunnelscope.nio._fastpath.Capture",
    .tp_basicsize = sizeof(CaptureObject),
    .tp_dealloc = (destructor)Capture_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Capture(fd, pcapng, nanosecond, snaplen, flush_ms, close_fd=False)\n\n"
              "Encodes pcap/pcapng records in C and writes them once per batch, flushed on a "
              "timer: the C twin of tunnelscope.capture.RecordSink.",
    .tp_methods = Capture_methods,
    .tp_getset = Capture_getset,
    .tp_new = Capture_new,
};

/* ---- Loop ---- */

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

/* Set up one endpoint from add_bridge's arguments; false with an exception set. */
static bool endpoint_init(endpoint_t *ep, int fd, int kind, PyObject *peer)
{
    if (fd < 0 || (kind != KIND_DGRAM && kind != KIND_FD)) {
        PyErr_SetString(PyExc_ValueError, "need an fd >= 0 and KIND_DGRAM or KIND_FD");
        return false;
    }
    ep->fd = fd;
    ep->kind = kind;
    if (kind == KIND_FD) { /* read()/write() must never block the loop */
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0 ||
            (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
            PyErr_SetFromErrno(PyExc_OSError);
            return false;
        }
    } else {
        int domain = 0;
        socklen_t size = sizeof domain;
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &size) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return false;
        }
        ep->packet = domain == AF_PACKET;
        int protocol = 0;
        size = sizeof protocol;
        ep->udp = (domain == AF_INET || domain == AF_INET6) &&
                  getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &size) == 0 &&
                  protocol == IPPROTO_UDP;
        ep->gso_max = GSO_BYTES;
    }
    if (peer && peer != Py_None) { /* a Unix datagram peer, reconnected after it restarts */
        PyObject *path = NULL;
        if (!PyUnicode_FSConverter(peer, &path))
            return false;
        Py_ssize_t n = PyBytes_GET_SIZE(path);
        if (kind != KIND_DGRAM || n < 1 || (size_t)n >= sizeof ep->peer.sun_path) {
            Py_DECREF(path);
            PyErr_SetString(PyExc_ValueError,
                            "a peer is the path of a Unix datagram socket (1-107 bytes)");
            return false;
        }
        ep->peer.sun_family = AF_UNIX;
        memcpy(ep->peer.sun_path, PyBytes_AS_STRING(path), (size_t)n);
        ep->peerlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + 1);
        ep->has_peer = true;
        Py_DECREF(path);
        struct sockaddr_un now;
        socklen_t len = sizeof now;
        ep->connected = getpeername(fd, (struct sockaddr *)&now, &len) == 0;
    }
    return true;
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

/* A filter from Python: a list of (code, jt, jf, k) tuples, checked. NULL with an exception. */
static bpf_insn_t *parse_filter(PyObject *obj, size_t *n)
{
    PyObject *seq = PySequence_Fast(obj, "filter must be a list of (code, jt, jf, k) tuples");
    if (!seq)
        return NULL;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    bpf_insn_t *prog = len > 0 && len <= BPF_MAX_INSNS ? calloc((size_t)len, sizeof *prog) : NULL;
    if (!prog) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "filter: empty or too long");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned int code, jt, jf, k;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyArg_ParseTuple(item, "IIII;filter instructions are (code, jt, jf, k)", &code,
                              &jt, &jf, &k) ||
            code > UINT16_MAX || jt > UINT8_MAX || jf > UINT8_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "filter instruction out of range");
            free(prog);
            Py_DECREF(seq);
            return NULL;
        }
        prog[i] = (bpf_insn_t){(uint16_t)code, (uint8_t)jt, (uint8_t)jf, k};
    }
    Py_DECREF(seq);
    const char *why = bpf_check(prog, (size_t)len);
    if (why) {
        PyErr_Format(PyExc_ValueError, "filter rejected: %s", why);
        free(prog);
        return NULL;
    }
    *n = (size_t)len;
    return prog;
}

static bool parse_stage(PyObject *item, stage_t *s, char **name, int64_t *shared)
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

static PyObject *Loop_run(LoopObject *L, PyObject *arg)
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

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunnelscope.nio._fastpath.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Loop(*, gso=False)\n\nOne epoll loop serving many bridges; run() releases the GIL "
              "while it pumps. The C twin of tunnelscope.pipeline.Loop.\n\n"
              "gso=True sends runs of equal-size frames to a UDP peer as one UDP_SEGMENT send "
              "(about 45 % less relay CPU per frame on loopback; receivers still get one "
              "datagram per frame, but a sniffer on lo sees the merged super-packets).",
    .tp_methods = Loop_methods,
    .tp_new = Loop_new,
};

/* ==== 10. module helpers and init ========================================================= */

/* Errors after which send_frames gives up (the socket cannot send at all). */
static bool fatal_send_error(int err)
{
    return err == EBADF || err == ENOTSOCK || err == EDESTADDRREQ || err == EFAULT ||
           err == ENOTCONN || err == EINVAL || err == EPIPE;
}

static PyObject *fp_send_frames(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    PyObject *frames;
    if (!PyArg_ParseTuple(args, "iO:send_frames", &fd, &frames))
        return NULL;
    PyObject *seq = PySequence_Fast(frames, "frames must be a sequence of bytes-like objects");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof *views);
    if (!views) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t got = 0;
    for (; got < n; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], PyBUF_SIMPLE) < 0)
            break;
    size_t sent = 0;
    int fatal = 0;
    if (got == n) {
        struct mmsghdr msgs[BATCH];
        struct iovec iov[BATCH];
        Py_BEGIN_ALLOW_THREADS
        size_t i = 0;
        int retries = 0;
        while (i < (size_t)n) {
            unsigned k = (unsigned)((size_t)n - i < BATCH ? (size_t)n - i : BATCH);
            for (unsigned j = 0; j < k; j++) {
                iov[j].iov_base = views[i + j].buf;
                iov[j].iov_len = (size_t)views[i + j].len;
                memset(&msgs[j].msg_hdr, 0, sizeof msgs[j].msg_hdr);
                msgs[j].msg_hdr.msg_iov = &iov[j];
                msgs[j].msg_hdr.msg_iovlen = 1;
            }
            int r = sendmmsg(fd, msgs, k, MSG_NOSIGNAL);
            if (r > 0) {
                sent += (size_t)r;
                i += (size_t)r;
                retries = 0;
                continue;
            }
            int e = r < 0 ? errno : EAGAIN;
            if (fatal_send_error(e)) {
                fatal = e;
                break;
            }
            if ((e == EINTR || e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS) && retries < 3) {
                retries++; /* wait for room in the socket buffer, a little */
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                if (e != EINTR)
                    poll(&pfd, 1, SEND_POLL_MS);
                continue;
            }
            i++; /* ECONNREFUSED, EMSGSIZE, or still no room: skip this frame */
            retries = 0;
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(seq);
    if (got < n)
        return NULL;
    if (fatal && !sent) {
        errno = fatal;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSize_t(sent);
}

static PyObject *fp_recv_frames(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, max_frames;
    if (!PyArg_ParseTuple(args, "ii:recv_frames", &fd, &max_frames))
        return NULL;
    if (max_frames < 1) {
        PyErr_SetString(PyExc_ValueError, "max_frames must be >= 1");
        return NULL;
    }
    if (max_frames > RECV_FRAMES_MAX)
        max_frames = RECV_FRAMES_MAX;
    uint8_t *buf = malloc((size_t)max_frames * SLOT_SIZE);
    struct mmsghdr *msgs = calloc((size_t)max_frames, sizeof *msgs);
    struct iovec *iov = calloc((size_t)max_frames, sizeof *iov);
    if (!buf || !msgs || !iov) {
        free(buf);
        free(msgs);
        free(iov);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < max_frames; i++) {
        iov[i].iov_base = buf + (size_t)i * SLOT_SIZE;
        iov[i].iov_len = SLOT_SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int r, err = 0;
    Py_BEGIN_ALLOW_THREADS
    r = recvmmsg(fd, msgs, (unsigned)max_frames, MSG_DONTWAIT, NULL);
    err = errno;
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (r < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK || err == ECONNREFUSED || err == EINTR) {
            result = PyList_New(0);
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
    } else if ((result = PyList_New(r))) {
        for (int i = 0; i < r; i++) {
            PyObject *frame = PyBytes_FromStringAndSize((const char *)iov[i].iov_base,
                                                        (Py_ssize_t)msgs[i].msg_len);
            if (!frame) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, i, frame);
        }
    }
    free(buf);
    free(msgs);
    free(iov);
    return result;
}

static PyMethodDef module_methods[] = {
    {"send_frames", fp_send_frames, METH_VARARGS,
     "send_frames(fd, frames) -> frames sent (sendmmsg batches; waits briefly for room)"},
    {"recv_frames", fp_recv_frames, METH_VARARGS,
     "recv_frames(fd, max_frames) -> list of frames (one non-blocking recvmmsg)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tunnelscope.nio._fastpath",
    .m_doc = "The C hot loop: the data path of docs/pipeline.md without Python per frame.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&CaptureType) < 0 || PyType_Ready(&LoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m)
        return NULL;
    Py_INCREF(&CaptureType);
    if (PyModule_AddObject(m, "Capture", (PyObject *)&CaptureType) < 0) {
        Py_DECREF(&CaptureType);
        goto fail;
    }
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "KIND_DGRAM", KIND_DGRAM) < 0 ||
        PyModule_AddIntConstant(m, "KIND_FD", KIND_FD) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "PARK_NS", (long)PARK_NS) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
