/*
 * tunnelscope/nio/fastpath/capture.c - capture records encoded in C, and when they are written.
 *
 * The core of the Capture type (capture_type.c). The loop encodes pcap records and pcapng
 * EPBs (with epb_flags and the "dropped by" comment) straight into the capture's buffer, under
 * its lock; the buffer is written with one write() per batch or flush timer, the policy of
 * tunnelscope.formats.capture.RecordSink. A ring buffer ends files at cuts in the buffer, which
 * rotate() writes to the next file. A failed write cuts a regular file back to its last whole
 * record and stops the capture, never the link.
 *
 * A frame of REF_MIN_BYTES or more (longer than any standard Ethernet frame) going to a regular
 * file in blocking mode is not copied: its record's header (pcapng: and padding, options) is
 * buffered, the frame is a ref, and the writev that ends the batch takes it from where it lies,
 * as the capturing minimal loop does. Smaller frames are copied: one write then carries many
 * batches (flush_ms), cheaper than a writev of small pieces per batch. Ring-buffer files
 * (cuts, limits) and a header still pending keep copying.
 */
#include "fastpath.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define FLUSH_BYTES (1u << 20)        /* a capture buffer this large is written at once */
#define CAPTURE_KEEP_BYTES (1u << 18) /* capacity a capture buffer always may keep */
#define SHRINK_NS 1000000000LL        /* a buffer is cut back to what this long of flushes used */
#define STALL_BYTES (4u << 20)        /* a non-blocking reader this far behind has stalled */
#define RETRY_NS 10000000LL           /* a blocked (EAGAIN) capture is retried this often */
#define REF_MIN_BYTES 2048            /* a frame this long is written from its slot, not copied */

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

/* Take fd as the capture's file: a regular file is cut back after a failed write, and one in
 * blocking mode may take frames from their slots (it never meets EAGAIN). */
void cap_set_fd(CaptureObject *c, int fd)
{
    struct stat st;
    c->fd = fd;
    c->seekable = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    int flags = fcntl(fd, F_GETFL);
    c->file = c->seekable && flags >= 0 && !(flags & O_NONBLOCK);
}

void cap_release(CaptureObject *c)
{
    c->closed = true;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    c->nrefs = c->ref_bytes = 0;
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

/* Give back the memory a burst took, once the flushes of a whole SHRINK_NS window needed far
 * less: shrinking after every flush would make a steady load fault fresh pages in again for
 * each flush (1 MiB is 256 page faults, every flush interval). */
static void cap_trim(CaptureObject *c, size_t flushed, int64_t now)
{
    if (flushed > c->peak)
        c->peak = flushed;
    if (now - c->peak_since < SHRINK_NS)
        return;
    size_t keep = CAPTURE_KEEP_BYTES;
    while (keep < 2 * c->peak && keep < c->cap)
        keep *= 2;
    if (c->cap > 2 * keep && c->len <= keep) { /* a burst grew it: give the memory back */
        uint8_t *buf = realloc(c->buf, keep);
        if (buf) {
            c->buf = buf;
            c->cap = keep;
        }
    }
    c->peak = 0;
    c->peak_since = now;
}

/* The current file's unwritten bytes in order: buf up to `head`, the refs inserted where they
 * belong. Returns the number of iovecs (at most 2 * MAX_SLOT_REFS + 1, below IOV_MAX). */
static int cap_iovecs(const CaptureObject *c, size_t head, struct iovec *iov)
{
    int k = 0;
    size_t pos = 0;
    for (size_t i = 0; i < c->nrefs; i++) {
        const slot_ref_t *r = &c->refs[i];
        if (r->at > pos)
            iov[k++] = (struct iovec){c->buf + pos, r->at - pos};
        iov[k++] = (struct iovec){(void *)r->data, r->len};
        pos = r->at;
    }
    if (head > pos)
        iov[k++] = (struct iovec){c->buf + pos, head - pos};
    return k;
}

/* Write the current file's unwritten bytes with one writev (more only after a short write). A
 * non-blocking reader that is not keeping up (EAGAIN) keeps the rest buffered, up to
 * STALL_BYTES. The caller holds c->lock. */
void cap_flush(CaptureObject *c)
{
    size_t head = cap_head(c);
    if (c->closed || !c->has_header || head == 0)
        return;
    struct iovec iov[2 * MAX_SLOT_REFS + 1];
    int niov = cap_iovecs(c, head, iov), first = 0;
    size_t total = head + c->ref_bytes, done = 0;
    c->blocked = false;
    while (done < total) {
        ssize_t n = writev(c->fd, iov + first, niov - first);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !c->nrefs) {
            c->blocked = true; /* (refs only go to a blocking fd, which never says EAGAIN) */
            break;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            if (c->seekable) /* cut the half-written batch so the file ends on a record */
                (void)!ftruncate(c->fd, c->offset);
            c->frames = c->frames_out; /* what the file holds, not what was offered */
            cap_fail(c, err);
            return;
        }
        done += (size_t)n;
        for (size_t left = (size_t)n; left;) { /* skip what went out */
            size_t step = left < iov[first].iov_len ? left : iov[first].iov_len;
            iov[first].iov_base = (uint8_t *)iov[first].iov_base + step;
            iov[first].iov_len -= step;
            left -= step;
            if (!iov[first].iov_len)
                first++;
        }
    }
    if (done == total)
        c->frames_out = c->ncuts ? c->cut_frames[0] : c->frames;
    c->offset += (off_t)done;
    c->written += done;
    cap_consume(c, done == total ? head : done);
    c->nrefs = c->ref_bytes = 0;
    if (c->blocked) {
        if (c->len > STALL_BYTES) {
            snprintf(c->error, sizeof c->error, "reader stalled");
            c->frames = c->frames_out;
            c->failed = true;
            cap_release(c);
        } else {
            c->oldest = mono_ns();
        }
        return;
    }
    int64_t now = mono_ns();
    c->oldest = c->len ? now : -1;
    cap_trim(c, head, now);
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
bool cap_put(CaptureObject *c, const void *data, size_t len)
{
    if (!cap_reserve(c, len))
        return false;
    if (len)
        memcpy(c->buf + c->len, data, len);
    c->len += len;
    return true;
}

/* Put a header before everything buffered (the cuts move along). */
bool cap_prepend(CaptureObject *c, const void *header, size_t n)
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
void cap_appended(CaptureObject *c, uint64_t count, int64_t now)
{
    if (c->closed)
        return;
    c->frames += count;
    if (c->oldest < 0)
        c->oldest = now;
    if ((c->flush_ns < 0 && !c->blocked) || c->nrefs || cap_head(c) >= FLUSH_BYTES)
        cap_flush(c); /* refs: the slots are reused after this batch */
}

/* Bytes the open segment's file will hold (its header included). */
static uint64_t cap_file_bytes(const CaptureObject *c)
{
    if (c->ncuts)
        return c->header_len + (c->len - c->cuts[c->ncuts - 1]);
    return c->written + c->len;
}

/* End the open file here: the next record starts a new one. */
void cap_cut(CaptureObject *c)
{
    if (c->ncuts == MAX_CUTS) { /* nobody rotates: keep writing into the last file */
        return;
    }
    c->cut_frames[c->ncuts] = c->frames;
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
int64_t cap_deadline(const CaptureObject *c)
{
    if (c->closed || !c->has_header || c->oldest < 0 || cap_head(c) == 0)
        return INT64_MAX;
    int64_t delay = c->flush_ns > 0 ? c->flush_ns : 0;
    return c->oldest + (c->blocked && delay < RETRY_NS ? RETRY_NS : delay);
}

/* May this frame be written from where it lies? `stays`: the caller keeps its bytes unchanged
 * until cap_appended ends the batch. */
static bool cap_may_ref(const CaptureObject *c, uint32_t caplen, bool stays)
{
    return stays && caplen >= REF_MIN_BYTES && c->file && c->has_header && !c->ncuts &&
           !c->limit_frames && !c->limit_bytes && c->nrefs < MAX_SLOT_REFS;
}

/* The record's frame bytes at buf offset `at`: copied, or a ref to where they lie. Returns the
 * bytes put in buf. */
static size_t cap_frame(CaptureObject *c, size_t at, const uint8_t *data, uint32_t caplen,
                        bool ref)
{
    c->record_ref = ref ? caplen : 0;
    if (!ref) {
        memcpy(c->buf + at, data, caplen);
        return caplen;
    }
    c->refs[c->nrefs++] = (slot_ref_t){at, data, caplen};
    c->ref_bytes += caplen;
    return 0;
}

/* Start a record (pcap: the whole record; pcapng: the EPB up to its options). Returns its
 * offset in the buffer, or SIZE_MAX when the capture stopped. `stays`: see cap_may_ref. */
size_t cap_begin(CaptureObject *c, uint32_t iface, int64_t ts, const uint8_t *data,
                 uint32_t len, bool stays)
{
    uint32_t caplen = len < c->snaplen ? len : c->snaplen;
    if (!cap_admit(c))
        return SIZE_MAX;
    bool ref = cap_may_ref(c, caplen, stays);
    size_t off = c->len, copied = ref ? 0 : caplen;
    if (c->pcapng) {
        size_t pad = pad4(caplen);
        if (!cap_reserve(c, 28 + copied + pad))
            return SIZE_MAX;
        uint8_t *p = c->buf + off;
        put32(p, 6);
        put32(p + 4, 0); /* total length, set by cap_end */
        put32(p + 8, iface);
        put32(p + 12, (uint32_t)((uint64_t)ts >> 32));
        put32(p + 16, (uint32_t)ts);
        put32(p + 20, caplen);
        put32(p + 24, len);
        copied = cap_frame(c, off + 28, data, caplen, ref);
        memset(p + 28 + copied, 0, pad);
        c->len += 28 + copied + pad;
    } else {
        if (!cap_reserve(c, 16 + copied))
            return SIZE_MAX;
        uint8_t *p = c->buf + off;
        uint64_t sec = (uint64_t)ts / 1000000000u, frac = (uint64_t)ts % 1000000000u;
        put32(p, (uint32_t)sec);
        put32(p + 4, (uint32_t)(c->nanosecond ? frac : frac / 1000));
        put32(p + 8, caplen);
        put32(p + 12, len);
        c->len += 16 + cap_frame(c, off + 16, data, caplen, ref);
    }
    return off;
}

/* Finish a pcapng EPB: epb_flags, the "dropped by a, b" comment, end of options, length. */
void cap_end(CaptureObject *c, size_t off, uint32_t flags, const dir_t *d,
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
    c->len = off + total;
    total += c->record_ref; /* the frame's bytes written from their slot count too */
    put32(p, (uint32_t)total);
    put32(c->buf + off + 4, (uint32_t)total);
}
