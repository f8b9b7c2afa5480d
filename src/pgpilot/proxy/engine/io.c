/* A Conn's reads and writes, plain or through TLS (tls.c): conn_send writes what the socket
 * takes now and queues the rest, read_buffered fills the read buffer, on_writable drains the
 * write buffer. Write pressure: a fast Conn whose peer cannot take more stops its peer's
 * reading (F_THROTTLED); a slow one pauses its protocol (pause_writing / resume_writing), as
 * asyncio's transports do. */

/* -- writing ----------------------------------------------------------------------------- */
static void conn_lost(ConnObject *c, PyObject *exc);
static void lost_errno(ConnObject *c, int err);
static int conn_send(ConnObject *c, const char *data, size_t n);

static void write_pressure(ConnObject *c) {
    size_t pending = buf_len(&c->wb);
    if (c->mode == MODE_FAST) {
        ConnObject *peer = c->peer;
        if (peer && pending > HIGH_WATER && !(peer->flags & F_THROTTLED)) {
            peer->flags |= F_THROTTLED;
            update_events(peer);
        }
        return;
    }
    if (pending > HIGH_WATER && !(c->flags & (F_WRITE_PAUSED | F_PHANTOM))) {
        c->flags |= F_WRITE_PAUSED;
        PyObject *r = py_method(c->protocol, "pause_writing", NULL);
        if (!r) report_error(c->engine);
        Py_XDECREF(r);
    }
}

/* Send now what the socket takes; keep the rest. Returns -1 when the connection broke. */
static int conn_send(ConnObject *c, const char *data, size_t n) {
    if (c->flags & F_CLOSED) return 0;
    if (!n) return 0;
    if (tls_active(c)) {
        if (tls_send(c, data, n) < 0) return -1;
        write_pressure(c);
        return 0;
    }
    size_t sent = 0;
    if (!buf_len(&c->wb)) {
        ssize_t r = sock_send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
            r = 0;
        }
        sent = (size_t)r;
        if (sent == n) return 0;
    }
    if (buf_append(&c->wb, data + sent, n - sent) < 0) {
        PyErr_Clear();
        return -1;
    }
    update_events(c);
    write_pressure(c);
    return 0;
}

/* Read what the socket has into the connection's buffer (room for ``want`` more bytes):
 * 1 if bytes came, 0 if none yet or the connection is gone (Python was told). */
static int read_buffered(ConnObject *c, size_t want) {
    if (buf_reserve(&c->rb, want) < 0) {
        PyErr_Clear();
        conn_lost(c, NULL);
        return 0;
    }
    if (tls_active(c)) {
        ssize_t n = tls_recv(c, tls_scratch);
        if (n < 0) return 0; /* nothing yet, or lost (Python was told) */
        if (n == 0) {
            conn_lost(c, NULL);
            return 0;
        }
        if (buf_append(&c->rb, tls_scratch, (size_t)n) < 0) {
            PyErr_Clear();
            conn_lost(c, NULL);
            return 0;
        }
        return 1;
    }
    ssize_t n = sock_recv(c->fd, c->rb.p + c->rb.end, c->rb.cap - c->rb.end, MSG_DONTWAIT);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost_errno(c, errno);
        return 0;
    }
    if (n == 0) {
        conn_lost(c, NULL);
        return 0;
    }
    c->rb.end += (size_t)n;
    return 1;
}

static void on_writable(ConnObject *c) {
    Buf *b = &c->wb;
    while (buf_len(b)) {
        ssize_t r = sock_send(c->fd, b->p + b->start, buf_len(b), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            lost_errno(c, errno);
            return;
        }
        b->start += (size_t)r;
    }
    size_t pending = buf_len(b);
    if (!pending) {
        b->start = b->end = 0;
        buf_shrink(b);
    }
    if (c->flags & F_CLOSING) {
        if (!pending) {
            conn_close_fd(c);
            if (c->engine->call_soon) {
                PyObject *lost = PyObject_GetAttrString(c->protocol, "connection_lost");
                PyObject *r = lost ? py_call_soon(c->engine, lost, Py_None) : NULL;
                if (!r) report_error(c->engine);
                Py_XDECREF(r);
                Py_XDECREF(lost);
            }
            drop_engine_ref(c);
        }
        return;
    }
    if (pending <= LOW_WATER) {
        if (c->mode == MODE_FAST) {
            ConnObject *peer = c->peer;
            if (peer && (peer->flags & F_THROTTLED)) {
                peer->flags &= ~F_THROTTLED;
                update_events(peer);
            }
        } else if (c->flags & F_WRITE_PAUSED) {
            c->flags &= ~F_WRITE_PAUSED;
            PyObject *r = py_method(c->protocol, "resume_writing", NULL);
            if (!r) report_error(c->engine);
            Py_XDECREF(r);
        }
    }
    update_events(c);
}
