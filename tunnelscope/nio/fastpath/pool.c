/*
 * tunnelscope/nio/fastpath/pool.c - frame descriptors, and the scratch lists that hold them.
 *
 * Every frame the loop handles has a descriptor (frame_t, fastpath.h). They come from a free
 * list, so a frame costs no malloc; Loop.run() trims the list to FREE_FRAMES_KEPT after every
 * pass. A frame's bytes stay borrowed from the receive buffer until it must outlive its batch:
 * frame_own then gives it a copy. ptrvec_t is the growable list of pointers the loop reuses
 * for every frame or batch (survivors of the chain, frames to send).
 */
#include "fastpath.h"

#include <stdlib.h>

bool ptrvec_push(ptrvec_t *v, void *p)
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

bool ptrvec_reserve(ptrvec_t *v, size_t extra)
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

frame_t *frame_new(pool_t *pool)
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

void frame_free(pool_t *pool, frame_t *f)
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
void frame_release(frame_t *f)
{
    if (f->owned)
        free(f->data);
    free(f);
}

void pool_trim(pool_t *pool, size_t keep)
{
    while (pool->n > keep) {
        frame_t *f = pool->head;
        pool->head = f->next;
        pool->n--;
        free(f);
    }
}

/* Give a frame its own copy of its bytes; on failure it is marked lost. */
bool frame_own(frame_t *f)
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
