/*
 * tunnelscope/nio/fastpath/fastpath.h - what the files of the C fast path share.
 *
 * The C fast path (the extension module tunnelscope.nio._fastpath) is the data path of
 * tunnelscope/datapath/pipeline.py (the readable reference) without Python per frame:
 * recvmmsg batches in, the impairment chain, the output queue with its timers, pcap or pcapng
 * records, sendmmsg batches out. The semantics are docs/pipeline.md, to the bit; the Python API
 * is tunnelscope/nio/_fastpath.pyi.
 *
 * One file per concern. This header holds the types they share and the functions one file
 * offers the others; everything else is static to its file.
 *   pool.c          frame descriptors (a free list) and the scratch lists of frames
 *   bpf.c           classic BPF: programs from Python, checked, run on a frame
 *   impair.c        the impairment chain: stages from Python, splitmix64 draws, drop causes
 *   queue.c         the output queue: frames in a heap until due, reordered frames parked
 *   capture.c       pcap/pcapng records encoded into a Capture's buffer, and its write policy
 *   endpoint.c      endpoint I/O: recvmmsg/read in, sendmmsg/write out, UDP GSO
 *   loop.c          the loop: receive, transmit, timers, epoll, Loop.run()
 *   capture_type.c  the Python type Capture
 *   loop_type.c     the Python type Loop: bridges, chains and captures added and removed
 *   module.c        send_frames/recv_frames and the module's init
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
 * sent. Frame descriptors come from a pool trimmed to FREE_FRAMES_KEPT after every pass; a
 * batch of a direction with no chain and nothing queued uses the loop's `direct` ones.
 */
#ifndef TUNNELSCOPE_FASTPATH_H
#define TUNNELSCOPE_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/if_packet.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

/* Nothing here is exported from the shared object but PyInit__fastpath (module.c). */
#pragma GCC visibility push(hidden)

/* ---- constants ---- */

#define BATCH 64                      /* frames per recvmmsg/sendmmsg */
#define SLOT_SIZE 65536               /* bytes per receive slot; a longer datagram is oversize */
#define PARK_NS 100000000LL           /* a reordered frame waits at most this long */
#define MAX_CUTS 4096                 /* finished ring-buffer files waiting for rotate() */
#define MAX_EVENTS 64
#define WAKE_ID UINT64_MAX            /* epoll tag of the wake eventfd */
#define GSO_SEGMENTS 64               /* UDP_SEGMENT: frames per send (UDP_MAX_SEGMENTS) */
#define MAX_SLOT_REFS (2 * BATCH)     /* captured frames one write takes from their slots */

enum { KIND_DGRAM = 0, KIND_FD = 1 };

/* ---- small helpers ---- */

/* Lock a mutex from a thread holding the GIL, without holding the GIL while blocked. */
static inline void lock_with_gil(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(m);
    Py_END_ALLOW_THREADS
}

static inline int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static inline int64_t real_ns(void) { return clock_ns(CLOCK_REALTIME); }

/* ---- types ---- */

/* A growable array of pointers (scratch lists of frames). */
typedef struct {
    void **a;
    size_t n, cap;
} ptrvec_t;

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

/* One classic BPF instruction, as struct sock_filter (bpf.c runs them). */
typedef struct {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
} bpf_insn_t;

/* freq_drop: a counter both directions of a bridge count on (freq_drop on the link). */
typedef struct shared_counter {
    int64_t id;
    int64_t count;
    struct shared_counter *next;
} shared_counter_t;

/* One stage of an impairment chain (impair.c), with its own generator and state. */
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

/* Frames dropped for one reason, named as the stage (or "no_memory"). */
typedef struct {
    char *name;
    uint64_t count;
} cause_t;

struct bridge;

/* One direction of a bridge: its chain, its counters, its output queue (queue.c). */
typedef struct direction {
    struct bridge *bridge;
    int index; /* 0 a2b, 1 b2a */
    stage_t *stages;
    int nstages;
    cause_t *causes; /* drop counters by cause name, in order of first use */
    int ncauses;
    bool rewrites; /* the chain may flip bits of a frame in its slot (corrupt) */
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

static inline size_t queued(const dir_t *d) { return d->nheap + d->nparked; }

/* A captured frame written straight from where it lies (a receive slot, a queued frame's
 * copy), not copied into the capture's buffer: the next write inserts it at buf offset `at`. */
typedef struct {
    size_t at;
    const uint8_t *data;
    size_t len;
} slot_ref_t;

/* The Python type Capture (capture.c, capture_type.c), the C twin of
 * tunnelscope.formats.capture.RecordSink: records buffered, written with one write() per batch
 * or timer; a failed write cuts a regular file back to its last whole record and stops.
 * Large frames going to a regular file are not copied: their records' headers are buffered
 * and one writev per batch takes the frames from their slots (refs), before the batch ends. */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    int fd;
    bool pcapng, nanosecond, close_fd, seekable;
    bool file; /* a regular file in blocking mode: large frames are written from their slots */
    bool closed, has_header;
    uint32_t snaplen;
    int64_t flush_ns; /* -1: flush_ms None (write after every batch) */
    PyObject *flush_ms; /* as given, for the attribute */
    uint64_t frames;
    uint8_t *buf;
    size_t len, cap;
    size_t peak;         /* most bytes one flush wrote since peak_since (cap_trim) */
    int64_t peak_since;  /* monotonic ns */
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
    uint64_t cut_frames[MAX_CUTS]; /* `frames` when each of those files ended */
    size_t ncuts;
    uint64_t frames_out; /* frames whose records are all written: what a write error leaves */
    slot_ref_t refs[MAX_SLOT_REFS]; /* frames the next write takes from their slots */
    size_t nrefs;
    size_t ref_bytes;  /* their bytes */
    size_t record_ref; /* bytes of the record being encoded that stay in their slot */
} CaptureObject;

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

/* One received frame, in its slot of the loop's receive buffer. */
typedef struct {
    uint8_t *data;
    uint32_t len;
} rxframe_t;

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

/* Two endpoints and the two directions between them. */
typedef struct bridge {
    uint64_t id;
    endpoint_t ends[2];
    dir_t dirs[2];
    shared_counter_t *shared; /* freq_drop counters shared by both directions */
    tap_t *taps;
    size_t ntaps;
    uint64_t next_tap; /* ids count from 0 and are never reused */
} bridge_t;

/* A capture the loop flushes on its timers, and how many bridges use it. */
typedef struct {
    CaptureObject *capture; /* strong reference */
    size_t users;           /* bridges using it */
} capref_t;

/* The Python type Loop (loop.c, loop_type.c): the bridges one epoll set serves. */
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
    frame_t direct[BATCH]; /* the frames of a batch that skips the chain and the queue */
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

static inline bridge_t *find_bridge(LoopObject *L, uint64_t id)
{
    return id < L->nbridges ? L->bridges[id] : NULL;
}

/* ---- what each file offers the others ---- */

/* pool.c */
bool ptrvec_push(ptrvec_t *v, void *p);
bool ptrvec_reserve(ptrvec_t *v, size_t extra);
frame_t *frame_new(pool_t *pool);
void frame_free(pool_t *pool, frame_t *f);
void frame_release(frame_t *f);
void pool_trim(pool_t *pool, size_t keep);
bool frame_own(frame_t *f);

/* bpf.c */
uint32_t bpf_run(const bpf_insn_t *prog, const uint8_t *p, uint32_t len);
bpf_insn_t *parse_filter(PyObject *obj, size_t *n);

/* impair.c */
bool parse_stage(PyObject *item, stage_t *s, char **name, int64_t *shared);
void stages_free(stage_t *stages, int n);
int cause_index(dir_t *d, const char *name);
void run_chain(LoopObject *L, dir_t *d, frame_t *f, int start);
bool chain_rewrites(const stage_t *stages, int n);
void drop_no_memory(LoopObject *L, dir_t *d, frame_t *f);

/* queue.c */
bool heap_push(dir_t *d, frame_t *f);
void release(LoopObject *L, dir_t *d, int64_t now);

/* capture.c (the caller holds c->lock) */
void cap_set_fd(CaptureObject *c, int fd);
void cap_release(CaptureObject *c);
void cap_flush(CaptureObject *c);
bool cap_put(CaptureObject *c, const void *data, size_t len);
bool cap_prepend(CaptureObject *c, const void *header, size_t n);
void cap_appended(CaptureObject *c, uint64_t count, int64_t now);
void cap_cut(CaptureObject *c);
int64_t cap_deadline(const CaptureObject *c);
size_t cap_begin(CaptureObject *c, uint32_t iface, int64_t ts, const uint8_t *data,
                 uint32_t len, bool stays);
void cap_end(CaptureObject *c, size_t off, uint32_t flags, const dir_t *d, const int *causes,
             size_t ncauses);

/* endpoint.c */
bool endpoint_init(endpoint_t *ep, int fd, int kind, PyObject *peer);
int recv_dgram(LoopObject *L, endpoint_t *ep);
int recv_fd(LoopObject *L, endpoint_t *ep, uint32_t events);
void send_batch(endpoint_t *ep, frame_t **frames, size_t n, txbuf_t *tx, bool gso,
                uint64_t *forwarded, uint64_t *errors);

/* loop.c */
void deactivate(LoopObject *L, dir_t *d);
void deregister(LoopObject *L, endpoint_t *ep);
PyObject *Loop_run(LoopObject *L, PyObject *arg);

/* capture_type.c, loop_type.c */
extern PyTypeObject CaptureType;
extern PyTypeObject LoopType;

#pragma GCC visibility pop

#endif /* TUNNELSCOPE_FASTPATH_H */
