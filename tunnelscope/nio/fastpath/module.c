/*
 * tunnelscope/nio/fastpath/module.c - the module tunnelscope.nio._fastpath.
 *
 * Its init registers the types Capture and Loop and the constants of _fastpath.pyi.
 * send_frames and recv_frames are the batch I/O of tunnelscope.analysis.traffic (blast, sink,
 * probe): one sendmmsg or recvmmsg call from Python, no loop.
 */
#include "fastpath.h"

#include <poll.h>
#include <stdlib.h>

#define RECV_FRAMES_MAX 1024          /* recv_frames() reads at most this many at once */
#define SEND_POLL_MS 100              /* send_frames(): wait this long for room, then skip */

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
