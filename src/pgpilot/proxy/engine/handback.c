/* Handing back to Python: a client (and its server) leaves the fast path at a message boundary
 * with its exact protocol state and unsent bytes (eject_client -> handler.ejected), a server
 * the fast path cannot keep goes back alone (return_server), and when a hand-back fails or a
 * server breaks the protocol, the pair is closed instead (failing closed). Also the Engine's
 * list of fast clients holding part of a message (client_message_timeout). */

/* -- ejecting to Python ------------------------------------------------------------------ */
static PyObject *take_bytes(Buf *b) {
    PyObject *out = PyBytes_FromStringAndSize(b->p + b->start, (Py_ssize_t)buf_len(b));
    b->start = b->end = 0;
    buf_shrink(b);
    return out;
}

static double secs(int64_t ns) { return ns ? (double)ns / 1e9 : 0.0; }

/* The engine's list of fast clients holding part of a message: entered when a read leaves
 * bytes the fast path could not pass on yet, left when it is looked at and holds none (or
 * the connection leaves the fast path or closes). No reference is held: every way out of the
 * fast path and every close takes the connection off first. */
static void partial_remove(ConnObject *c) {
    if (!c->in_partial) return;
    EngineObject *e = c->engine;
    if (c->pt_prev) c->pt_prev->pt_next = c->pt_next; else e->partial_head = c->pt_next;
    if (c->pt_next) c->pt_next->pt_prev = c->pt_prev;
    c->pt_prev = c->pt_next = NULL;
    c->in_partial = 0;
}

/* Is ``c`` a fast client whose buffer holds a message it has not finished sending? (Bytes a
 * queued client or one waiting for quiet holds are complete messages: bounded by
 * query_wait_timeout and by its server's answers.) */
static int holds_partial(ConnObject *c) {
    return c->kind == KIND_CLIENT && c->mode == MODE_FAST && !(c->flags & (F_CLOSED | F_CLOSING)) &&
           (c->skip || (buf_len(&c->rb) && c->at != AT_WAITING && !(c->flags & F_EJECT_WANTED)));
}

static void partial_note(ConnObject *c) {
    if (!holds_partial(c)) {
        partial_remove(c);
        return;
    }
    if (c->in_partial) return;
    EngineObject *e = c->engine;
    c->pt_prev = NULL;
    c->pt_next = e->partial_head;
    if (e->partial_head) e->partial_head->pt_prev = c;
    e->partial_head = c;
    c->in_partial = 1;
}

static void qs_burst_free(ConnObject *c);

static void leave_fast(ConnObject *c) {
    qs_burst_free(c); /* before c->pool goes: its burst's last events are the pool's */
    partial_remove(c);
    queue_remove(c);
    Py_CLEAR(c->statements);
    Py_CLEAR(c->prepared);
    c->mode = MODE_SLOW;
    c->flags &= ~(F_THROTTLED | F_EJECT_WANTED | F_EJECT_STREAMED | F_ANSWERS_WAIT);
    c->skip = 0;
    PoolObject *p = c->pool;
    c->pool = NULL;
    Py_XDECREF(p);
}

static void fail_closed(ConnObject *c, ConnObject *s, const char *text);
static void fail_closed_code(ConnObject *c, ConnObject *s, const char *code, const char *text);
static void server_free(ConnObject *s);

/* Hand ``c`` (a client) and its server, if any, back to Python with their state. */
static void eject_client(ConnObject *c, ConnObject *server, int how) {
    PyObject *cb = NULL, *sb = NULL, *r = NULL;
    PoolObject *p = c->pool;
    if (!p) return;
    if (c->skip) {
        /* Mid-way through a Bind the client streams (see "streaming"): its server holds part
         * of a message and the client's next bytes are the rest of it, so neither can be
         * handed over: both are closed (claim() first, a phantom has no object yet). */
        if (claim(c) < 0) return;
        ConnObject *s = server ? server : c->peer;
        int server_gone = !s || (s->flags & (F_CLOSED | F_CLOSING));
        fail_closed_code(c, s, server_gone ? "08006" : "08P01",
                         server_gone ? "server closed the connection during a message"
                                     : "the connection cannot go on: a message was cut off "
                                       "while it was passed on to the server");
        return;
    }
    if (claim(c) < 0) {
        /* The client is gone (claim() dropped it). A server its caller took off the idle
         * list for it, not linked to it, goes back to the pool: to the next waiting client
         * or idle (a linked one was closed by claim(), as it may be mid-transaction). */
        if (server && server->mode == MODE_FAST && !server->peer && server->at == AT_NONE &&
            !(server->flags & (F_CLOSED | F_CLOSING))) {
            Py_INCREF(server);
            server_free(server);
            Py_DECREF(server);
        }
        return;
    }
    Py_INCREF(c);
    Py_INCREF(p);
    if (server) Py_INCREF(server);
    /* What it timed that is still in flight goes to Python, which times it to its answer. */
    PyObject *inflight = c->peer ? qs_inflight(c) : NULL;
    if (!inflight) {
        PyErr_Clear();
        inflight = Py_NewRef(Py_None);
    }
    if (c->peer) unlink_pair(c);
    int was_waiting = c->at == AT_WAITING;
    leave_fast(c);
    if (server && server->mode == MODE_FAST) leave_fast(server);
    if (was_waiting && how == EJECT_UNLINKED) how = EJECT_WAITING;
    cb = take_bytes(&c->rb);
    sb = server ? take_bytes(&server->rb) : PyBytes_FromStringAndSize(NULL, 0);
    PyObject *owed = cb && sb ? owed_record(c) : NULL;
    if (!owed) {
        report_error(c->engine);
        fail_closed(c, server, "pooler error: the connection could not be handed over");
        goto done;
    }
    /* c->txn is only ever I, T or E (server_pump refuses any other status). */
    char txn[2] = {c->txn == 'T' || c->txn == 'E' ? c->txn : 'I', 0};
    r = py_method(p->handler, "ejected", "OOiiisdddOOOOiO", c->protocol,
                            server ? server->protocol : Py_None, how, c->expected_rfq,
                            c->unsynced, txn, secs(c->query_started), secs(c->xact_started),
                            secs(c->idle_in_txn_since), cb, sb, PyTuple_GET_ITEM(owed, 0),
                            PyTuple_GET_ITEM(owed, 1),
                            server ? ((server->flags & F_FATAL_SEEN) ? 1 : 0) |
                                     ((server->flags & F_RESULT_PASSED) ? 2 : 0) : 0,
                            inflight);
    Py_DECREF(owed);
    if (!r) {
        /* Python could not take the pair over: neither is used again (fail closed). */
        report_error(c->engine);
        fail_closed(c, server, "pooler error: the connection could not be handed over");
        goto done;
    }
    c->expected_rfq = 0;
    c->unsynced = 0;
    c->query_started = c->xact_started = c->idle_in_txn_since = 0;
    owed_reset(c);
    update_events(c);
    if (server) update_events(server);
done:
    Py_XDECREF(inflight);
    Py_XDECREF(r);
    Py_XDECREF(cb);
    Py_XDECREF(sb);
    if (server) Py_DECREF(server);
    Py_DECREF(p);
    Py_DECREF(c);
}

/* A server the fast path cannot keep (held, too old, wanted by Python, unexpected bytes, due
 * for its health check). */
static void return_server(ConnObject *s) {
    PoolObject *p = s->pool;
    if (!p) return;
    Py_INCREF(s);
    Py_INCREF(p);
    leave_fast(s);
    PyObject *sb = take_bytes(&s->rb);
    PyObject *r = sb ? py_method(p->handler, "server_returned", "OOd", s->protocol, sb,
                                           secs(s->idle_since))
                     : NULL;
    if (!r) report_error(s->engine);
    Py_XDECREF(r);
    Py_XDECREF(sb);
    update_events(s);
    Py_DECREF(p);
    Py_DECREF(s);
}

/* -- failing closed ----------------------------------------------------------------------- *
 * When a server breaks the protocol (a ReadyForQuery status other than I/T/E, a length under
 * 4, a message type a server never sends mid-session) or a hand-back to Python fails, neither
 * connection of the pair can be trusted again: the server is closed (Python hears
 * connection_lost and replaces it), the client gets an ErrorResponse with a SQLSTATE and is
 * closed once it is written. Nothing of the pair is ever lent again. */
static void on_writable(ConnObject *c);
static void phantom_drop(ConnObject *c);
static void conn_close_fd(ConnObject *c);

/* A FATAL ErrorResponse to ``c`` (best effort: it is being closed anyway). */
static void send_fatal(ConnObject *c, const char *code, const char *text) {
    char msg[320];
    size_t tl = strnlen(text, 200), n = 5;
    n += (size_t)snprintf(msg + n, sizeof msg - n, "SFATAL%cVFATAL%cC%s%cM", 0, 0, code, 0);
    memcpy(msg + n, text, tl);
    n += tl;
    msg[n++] = 0;
    msg[n++] = 0;
    msg[0] = 'E';
    put_be32((unsigned char *)msg + 1, (uint32_t)(n - 1));
    if (conn_send(c, msg, n) < 0) c->wb.start = c->wb.end = 0;
}

/* Send the client a FATAL error and close it (once written); Python hears connection_lost. */
static void refuse_client(ConnObject *c, const char *code, const char *text) {
    if (c->flags & (F_CLOSED | F_CLOSING)) return;
    Py_INCREF(c);
    if (c->mode == MODE_FAST) leave_fast(c);
    owed_reset(c);
    c->expected_rfq = c->unsynced = 0;
    c->rb.start = c->rb.end = 0;
    buf_shrink(&c->rb);
    send_fatal(c, code, text);
    if (c->flags & F_PHANTOM) {
        phantom_drop(c);
    } else {
        c->flags |= F_CLOSING;
        if (!buf_len(&c->wb)) on_writable(c); else update_events(c);
    }
    Py_DECREF(c);
}

/* Close the pair (either may be NULL) as above; ``text`` is what the client is told. */
static void fail_closed(ConnObject *c, ConnObject *s, const char *text) {
    fail_closed_code(c, s, "08006", text);
}

/* The same, the client told ``code`` (a SQLSTATE). */
static void fail_closed_code(ConnObject *c, ConnObject *s, const char *code, const char *text) {
    if (c) Py_INCREF(c);
    if (s) Py_INCREF(s);
    if (c && c->peer) unlink_pair(c);
    if (s && s->peer) unlink_pair(s->peer);
    if (s && !(s->flags & F_CLOSED)) {
        if (s->mode == MODE_FAST) leave_fast(s);
        conn_close_fd(s);
        PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "s", text);
        PyObject *r = py_method(s->protocol, "connection_lost", "O", exc ? exc : Py_None);
        if (!r) report_error(s->engine);
        Py_XDECREF(r);
        Py_XDECREF(exc);
        PyErr_Clear();
        drop_engine_ref(s);
    }
    if (c) refuse_client(c, code, text);
    if (s) Py_DECREF(s);
    if (c) Py_DECREF(c);
}
