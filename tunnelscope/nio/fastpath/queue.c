/*
 * tunnelscope/nio/fastpath/queue.c - the output queue: when a frame leaves.
 *
 * A frame out of the chain waits in its direction's heap, ordered on (ready time, arrival
 * sequence), until it is due. A reordered frame (hold > 0) is then parked until `hold` later
 * frames of its direction have been sent, or for PARK_NS at most. release() hands the due
 * frames to L->out in send order, as pipeline.Pipeline.release does.
 */
#include "fastpath.h"

#include <stdlib.h>

/* output queue: heap on (ready, seq) */
static inline bool before(const frame_t *a, const frame_t *b)
{
    return a->ready < b->ready || (a->ready == b->ready && a->seq < b->seq);
}

bool heap_push(dir_t *d, frame_t *f)
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
void release(LoopObject *L, dir_t *d, int64_t now)
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
