/*
 * tunnelscope/nio/fastpath/endpoint.c - endpoint I/O: frames in and out of a link end.
 *
 * A datagram socket (UDP, Unix, AF_PACKET) is read with recvmmsg into the loop's receive
 * slots and written with sendmmsg; with gso, runs of equal-size frames to a UDP peer leave as
 * one UDP_SEGMENT send. A TAP is read and written one frame per call. The counters (refused,
 * oversize, send_busy, send_failed) are those of tunnelscope.nio.spec.Endpoint. A Unix
 * datagram endpoint with a peer path reconnects once its peer restarts.
 */
#include "fastpath.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <unistd.h>

#define GSO_BYTES 65507               /* UDP_SEGMENT: bytes per send (the largest datagram) */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

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

/* Set up one endpoint from add_bridge's arguments; false with an exception set. */
bool endpoint_init(endpoint_t *ep, int fd, int kind, PyObject *peer)
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

/* One recvmmsg into the loop's receive slots; returns frames kept or -errno. */
int recv_dgram(LoopObject *L, endpoint_t *ep)
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
int recv_fd(LoopObject *L, endpoint_t *ep, uint32_t events)
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
void send_batch(endpoint_t *ep, frame_t **frames, size_t n, txbuf_t *tx, bool gso,
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
