/*
 * tunnelscope/nio/fastpath/capture_type.c - the Python type Capture.
 *
 * Capture(fd, pcapng, nanosecond, snaplen, flush_ms, close_fd=False): one capture file and its
 * buffer (capture.c). Python sets the header and may append records of its own; the loop
 * encodes the records of the bridges the capture is added to. Every method takes the
 * capture's mutex, and those that may write release the GIL first. The C twin of
 * tunnelscope.formats.capture.RecordSink.
 */
#include "fastpath.h"

#include <unistd.h>

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
    cap_set_fd(c, fd);
    c->pcapng = pcapng;
    c->nanosecond = nanosecond;
    c->close_fd = close_fd;
    c->snaplen = (uint32_t)snaplen;
    c->flush_ns = flush_ns;
    Py_INCREF(flush_ms);
    c->flush_ms = flush_ms;
    c->oldest = -1;
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
            cap_set_fd(c, fd);
            c->offset = 0;
            c->written = 0;
            memmove(c->cuts, c->cuts + 1, (c->ncuts - 1) * sizeof *c->cuts);
            memmove(c->cut_frames, c->cut_frames + 1, --c->ncuts * sizeof *c->cut_frames);
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

PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunnelscope.nio._fastpath.Capture",
    .tp_basicsize = sizeof(CaptureObject),
    .tp_dealloc = (destructor)Capture_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Capture(fd, pcapng, nanosecond, snaplen, flush_ms, close_fd=False)\n\n"
              "Encodes pcap/pcapng records in C and writes them once per batch, flushed on a "
              "timer: the C twin of tunnelscope.formats.capture.RecordSink.",
    .tp_methods = Capture_methods,
    .tp_getset = Capture_getset,
    .tp_new = Capture_new,
};
