/* The Conn type: an engine socket as the transport of a Python protocol object (write, close,
 * abort, pause_reading, get_extra_info ...), and what happens when its connection closes or
 * breaks (conn_close_fd, conn_lost: Python is told as by an asyncio transport). Python puts a
 * Conn on the fast path (set_fast) and takes it back (eject) through these methods. */

/* The engine's own reference goes when the fd closes; during run() the conn is kept until
 * the batch ends, since a later event of the same epoll_wait may still point at it. */
static void drop_engine_ref(ConnObject *c) {
    EngineObject *e = c->engine;
    if (e->running && e->graveyard) {
        if (PyList_Append(e->graveyard, (PyObject *)c) < 0) PyErr_Clear();
    }
    Py_DECREF(c);
}

/* -- closing, losing ---------------------------------------------------------------------- */
static void conn_close_fd(ConnObject *c) {
    if (c->flags & F_CLOSED) return;
    tls_close(c);
    partial_remove(c);
    c->flags |= F_CLOSED;
    if (c->registered) {
        epoll_ctl(c->engine->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        c->registered = 0;
    }
    close(c->fd);
    c->fd = -1;
    buf_free(&c->rb);
    buf_free(&c->wb);
    scram_free(c);
    c->engine->n_conns--;
    if (c->flags & F_COUNTED) uncount_client(c);
    /* Siblings hand no more clients to a worker that serves none on the engine. */
    if (c == c->engine->handoff_listener && c->engine->counters)
        counter_set(c->engine, c->engine->me, SLOT_ACCEPTING, 0);
}

/* The connection broke or the peer closed it: Python is told, as by an asyncio transport. */
static void conn_lost(ConnObject *c, PyObject *exc) {
    if (c->flags & F_CLOSED) return;
    if (c->flags & F_PHANTOM) {
        /* A phantom that leaves between transactions (the usual way: Terminate) is gone
         * without Python; one that leaves a server mid-transaction is claimed first, so that
         * Python takes the server back as for any client. */
        if (!c->peer) {
            phantom_drop(c);
            return;
        }
        if (claim(c) < 0) return;
    }
    Py_INCREF(c);
    /* The connection is over: closing from here on, so that nothing Python does before it
     * hears so (a hand-back's bytes that end a transaction, a release) can put it back on
     * the fast path (set_fast refuses a closing Conn). A server lent again there would be
     * closed under its next client, which would wait for its answers forever. */
    c->flags |= F_CLOSING;
    if (c->mode == MODE_FAST) {
        if (c->kind == KIND_CLIENT) {
            eject_client(c, c->peer, c->peer ? EJECT_LINKED : EJECT_UNLINKED);
        } else if (c->peer) {
            eject_client(c->peer, c, EJECT_LINKED);
        } else {
            /* An idle server: no bytes to pass on. It leaves the fast path and Python hears
             * it died (connection_lost, below), never that it is back and free to lend
             * (server_returned): it would go to the next waiting client, or idle here. */
            leave_fast(c);
        }
        /* Whatever the hand-back did (one that closes the pair refuses a closing client
         * without a word, and so without leave_fast), the connection is off the fast path:
         * its pool, statement map and N+1 burst are let go now, not at its dealloc. */
        if (c->mode == MODE_FAST) leave_fast(c);
    }
    if (!(c->flags & F_CLOSED)) {
        conn_close_fd(c);
        PyObject *r = py_method(c->protocol, "connection_lost", "O",
                                          exc ? exc : Py_None);
        if (!r) report_error(c->engine);
        Py_XDECREF(r);
        drop_engine_ref(c);
    }
    Py_DECREF(c);
}

static void lost_errno(ConnObject *c, int err) {
    PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "is", err, strerror(err));
    if (!exc) PyErr_Clear();
    conn_lost(c, exc);
    Py_XDECREF(exc);
}

static ConnObject *new_conn(EngineObject *e, int fd, PyObject *protocol, PyObject *extra,
                            int kind);

/* An IP address's host text and port; 0 (and nothing set) for any other family. */
static int host_and_port(const struct sockaddr *a, char host[INET6_ADDRSTRLEN], int *port) {
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)a;
        if (!inet_ntop(AF_INET, &in->sin_addr, host, INET6_ADDRSTRLEN)) host[0] = 0;
        *port = ntohs(in->sin_port);
        return 1;
    }
    if (a->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
        if (!inet_ntop(AF_INET6, &in6->sin6_addr, host, INET6_ADDRSTRLEN)) host[0] = 0;
        *port = ntohs(in6->sin6_port);
        return 1;
    }
    return 0;
}

/* An address as asyncio gives it: (host, port) for IPv4, (host, port, flowinfo, scope_id) for
 * IPv6, "" for a unix socket. */
static PyObject *address_tuple(const struct sockaddr *a) {
    char host[INET6_ADDRSTRLEN];
    int port;
    if (!host_and_port(a, host, &port)) return PyUnicode_FromString("");
    if (a->sa_family == AF_INET) return Py_BuildValue("(si)", host, port);
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
    return Py_BuildValue("(siII)", host, port, (unsigned)ntohl(in6->sin6_flowinfo),
                         (unsigned)in6->sin6_scope_id);
}

static void keep_address(ConnObject *c, const struct sockaddr_storage *peer) {
    if (peer->ss_family == AF_INET)
        memcpy(&c->peer_addr.in4, peer, sizeof c->peer_addr.in4);
    else if (peer->ss_family == AF_INET6)
        memcpy(&c->peer_addr.in6, peer, sizeof c->peer_addr.in6);
}

static void on_readable(ConnObject *c);
static int hand_off(EngineObject *e, int fd, const struct sockaddr_storage *peer);

/* ==================================================================== Conn (the transport) */
static int conn_traverse(ConnObject *c, visitproc visit, void *arg) {
    Py_VISIT(c->protocol);
    Py_VISIT(c->extra);
    Py_VISIT(c->route);
    Py_VISIT(c->statements);
    Py_VISIT(c->prepared);
    return 0;
}

static int conn_clear(ConnObject *c) {
    Py_CLEAR(c->protocol);
    Py_CLEAR(c->extra);
    Py_CLEAR(c->route);
    Py_CLEAR(c->statements);
    Py_CLEAR(c->prepared);
    return 0;
}

static void conn_dealloc(ConnObject *c) {
    PyObject_GC_UnTrack(c);
    if (c->weakreflist) PyObject_ClearWeakRefs((PyObject *)c);
    partial_remove(c);
    if (!(c->flags & F_CLOSED) && c->fd >= 0) {
        if (c->registered) epoll_ctl(c->engine->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->engine->n_conns--;
        if (c->flags & F_COUNTED) uncount_client(c);
    }
    tls_free(c);
    buf_free(&c->rb);
    buf_free(&c->wb);
    scram_free(c);
    owed_reset(c);
    PyMem_Free(c->owed_names);
    free(c->qs);
    free(c->burst);
    conn_clear(c);
    Py_XDECREF(c->pool);
    Py_XDECREF(c->engine);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Python touches a fast connection (writes, closes, pauses): it takes the pair back first. */
static void make_slow(ConnObject *c) {
    if (c->mode != MODE_FAST) return;
    if (c->kind == KIND_CLIENT) {
        eject_client(c, c->peer, c->peer ? EJECT_LINKED : EJECT_UNLINKED);
    } else if (c->peer) {
        eject_client(c->peer, c, EJECT_LINKED);
    } else {
        return_server(c);
    }
}

static PyObject *conn_write(ConnObject *c, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (c->flags & (F_CLOSED | F_CLOSING)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    make_slow(c);
    int r = conn_send(c, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (r < 0) {
        /* As asyncio: the break is reported through connection_lost, soon. */
        int err = errno;
        c->flags |= F_CLOSING;
        buf_free(&c->wb);
        conn_close_fd(c);
        PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "is", err, strerror(err));
        PyObject *lost = PyObject_GetAttrString(c->protocol, "connection_lost");
        if (lost && exc && c->engine->call_soon) {
            PyObject *rr = py_call_soon(c->engine, lost, exc);
            Py_XDECREF(rr);
        }
        Py_XDECREF(lost);
        Py_XDECREF(exc);
        PyErr_Clear();
        drop_engine_ref(c);
    }
    Py_RETURN_NONE;
}

/* close(): the fd closes once the write buffer is out; abort(): now, dropping it. */
static PyObject *conn_shut(ConnObject *c, int drop_unsent) {
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_NONE;
    make_slow(c);
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_NONE;
    c->flags |= F_CLOSING;
    if (drop_unsent) c->wb.start = c->wb.end = 0;
    if (!buf_len(&c->wb)) {
        on_writable(c);
    } else {
        update_events(c);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_close(ConnObject *c, PyObject *unused) { return conn_shut(c, 0); }

static PyObject *conn_abort(ConnObject *c, PyObject *unused) { return conn_shut(c, 1); }

static PyObject *conn_pause_reading(ConnObject *c, PyObject *unused) {
    make_slow(c);
    c->flags |= F_READ_PAUSED;
    update_events(c);
    Py_RETURN_NONE;
}

static PyObject *conn_resume_reading(ConnObject *c, PyObject *unused) {
    c->flags &= ~F_READ_PAUSED;
    update_events(c);
    Py_RETURN_NONE;
}

static PyObject *conn_is_closing(ConnObject *c, PyObject *unused) {
    return PyBool_FromLong((c->flags & (F_CLOSED | F_CLOSING)) != 0);
}

static PyObject *conn_is_reading(ConnObject *c, PyObject *unused) {
    return PyBool_FromLong(wants_read(c));
}

static PyObject *conn_get_write_buffer_size(ConnObject *c, PyObject *unused) {
    return PyLong_FromSize_t(buf_len(&c->wb));
}

static PyObject *conn_get_extra_info(ConnObject *c, PyObject *args) {
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &name, &dflt)) return NULL;
    if (c->extra) {
        PyObject *v = PyDict_GetItemWithError(c->extra, name);
        if (v) return Py_NewRef(v);
        if (PyErr_Occurred()) return NULL;
    }
    if (c->tls && PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "peercert") == 0)
        return tls_peercert(c);
    if (!c->extra && c->peer_addr.sa.sa_family != AF_UNSPEC && PyUnicode_Check(name)) {
        /* An engine listener's client: its addresses, made now. */
        if (PyUnicode_CompareWithASCIIString(name, "peername") == 0)
            return address_tuple(&c->peer_addr.sa);
        if (PyUnicode_CompareWithASCIIString(name, "sockname") == 0 && c->fd >= 0) {
            struct sockaddr_storage local;
            socklen_t llen = sizeof local;
            if (getsockname(c->fd, (struct sockaddr *)&local, &llen) == 0)
                return address_tuple((struct sockaddr *)&local);
        }
    }
    return Py_NewRef(dflt);
}

/* Enter the fast path: a client of ``pool`` (its parameters' id), or a server given to it. */
static PyObject *conn_set_fast(ConnObject *c, PyObject *args) {
    PoolObject *p;
    long long params_id;
    double expires = 0;
    PyObject *names = Py_None;
    if (!PyArg_ParseTuple(args, "O!L|dO", &PoolType, &p, &params_id, &expires, &names))
        return NULL;
    if (names != Py_None && !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "statements must be a dict or None");
        return NULL;
    }
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_FALSE;
    if (c->mode == MODE_FAST) {
        PyErr_SetString(PyExc_RuntimeError, "connection is already on the fast path");
        return NULL;
    }
    if (c->kind == KIND_SERVER) {
        if (names != Py_None) Py_XSETREF(c->prepared, Py_NewRef(names));
    } else {
        /* None: the client's statements are not renamed (max_prepared_statements = 0), and
         * a map from an earlier stay must not rename them either. */
        Py_XSETREF(c->statements, names == Py_None ? NULL : Py_NewRef(names));
    }
    enter_fast_mode(c, p, params_id, expires);
    Py_RETURN_TRUE;
}

/* set_statements(statements): a client's statement map from now on, on the fast path or off
 * it (None: its named statements go to Python, which passes them unrenamed). For a change
 * of max_prepared_statements at a reload. */
static PyObject *conn_set_statements(ConnObject *c, PyObject *names) {
    if (names != Py_None && !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "statements must be a dict or None");
        return NULL;
    }
    if (c->kind == KIND_SERVER) {
        PyErr_SetString(PyExc_TypeError, "set_statements is for client connections");
        return NULL;
    }
    Py_XSETREF(c->statements, names == Py_None ? NULL : Py_NewRef(names));
    Py_RETURN_NONE;
}

static void enter_fast_mode(ConnObject *c, PoolObject *p, long long params_id, double expires) {
    c->mode = MODE_FAST;
    c->pool = (PoolObject *)Py_NewRef(p);
    c->params_id = params_id;
    c->flags &= ~(F_READ_PAUSED | F_HOLD | F_RESULT_PASSED);
    c->expected_rfq = 0;
    c->unsynced = 0;
    c->txn = 'I';
    c->skip = 0;
    owed_reset(c);
    c->expires = expires > 0 ? secs_to_ns(expires) : 0;
    if (c->kind == KIND_SERVER) {
        server_free(c);
    } else {
        c->last_activity = now_ns();
        update_events(c);
        if (buf_len(&c->rb)) {
            Py_INCREF(c);
            client_pump(c);
            partial_note(c);
            Py_DECREF(c);
        }
    }
}

/* claim(): the client's Python object, made now if it is a phantom (None if that failed). */
static PyObject *conn_claim(ConnObject *c, PyObject *unused) {
    if (claim(c) < 0) Py_RETURN_NONE;
    return Py_NewRef(c->protocol);
}

/* Python reads (and clears) F_UNNAMED_PARSED before it rewrites a client's request. */
static PyObject *conn_take_unnamed_parsed(ConnObject *c, PyObject *unused) {
    int was = (c->flags & F_UNNAMED_PARSED) != 0;
    c->flags &= ~F_UNNAMED_PARSED;
    return PyBool_FromLong(was);
}

/* Python wants the pair back now (a timeout, an admin command, a cancel). */
static PyObject *conn_eject(ConnObject *c, PyObject *unused) {
    ConnObject *client = c->kind == KIND_CLIENT ? c : c->peer;
    if (c->mode == MODE_FAST && client && client->skip) {
        /* Mid-way through a Bind the client streams (see "streaming"): the pair cannot be
         * handed over now, so it goes to Python when the Bind is through (a SHOW or a
         * /metrics scrape must not cut the client off). */
        client->flags |= F_EJECT_STREAMED;
        Py_RETURN_FALSE;
    }
    int was = c->mode == MODE_FAST;
    make_slow(c);
    return PyBool_FromLong(was);
}

static PyObject *conn_set_hold(ConnObject *c, PyObject *arg) {
    if (PyObject_IsTrue(arg)) c->flags |= F_HOLD; else c->flags &= ~F_HOLD;
    Py_RETURN_NONE;
}

static PyObject *conn_set_read_at_accept(ConnObject *c, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    if (c->kind != KIND_LISTENER) {
        PyErr_SetString(PyExc_TypeError, "set_read_at_accept: not a listener");
        return NULL;
    }
    if (on) c->flags |= F_READ_AT_ACCEPT; else c->flags &= ~F_READ_AT_ACCEPT;
    Py_RETURN_NONE;
}

static PyObject *conn_get_fast(ConnObject *c, void *unused) {
    return PyBool_FromLong(c->mode == MODE_FAST);
}

static PyObject *conn_get_peer(ConnObject *c, void *unused) {
    if (c->peer && claim(c->peer) < 0) Py_RETURN_NONE;
    if (c->peer && c->peer->protocol) return Py_NewRef(c->peer->protocol);
    Py_RETURN_NONE;
}

static PyObject *conn_get_state(ConnObject *c, void *unused) {
    /* (linked, waiting, expected_rfq, txn status, query_started, idle_in_txn_since,
     *  last_activity, wait_started), times in time.monotonic() seconds */
    char txn[2] = {c->txn ? c->txn : 'I', 0};
    return Py_BuildValue("(iiisdddd)", c->peer != NULL, c->at == AT_WAITING, c->expected_rfq,
                         txn, secs(c->query_started), secs(c->idle_in_txn_since),
                         secs(c->last_activity), secs(c->wait_started));
}

/* set_protocol(protocol): as asyncio's transports (a server after its TLS handshake). */
static PyObject *conn_set_protocol(ConnObject *c, PyObject *protocol) {
    Py_XSETREF(c->protocol, Py_NewRef(protocol));
    Py_RETURN_NONE;
}

static PyObject *conn_get_protocol(ConnObject *c, PyObject *unused) {
    return Py_NewRef(c->protocol ? c->protocol : Py_None);
}

static PyObject *conn_get_tls(ConnObject *c, void *unused) {
    return PyBool_FromLong(c->tls != NULL && !(c->tls_state & TLS_HANDSHAKE));
}

static PyMethodDef conn_methods[] = {
    {"set_protocol", (PyCFunction)conn_set_protocol, METH_O, "Change the protocol object."},
    {"get_protocol", (PyCFunction)conn_get_protocol, METH_NOARGS, NULL},
    {"start_tls", (PyCFunction)conn_start_tls, METH_VARARGS,
     "start_tls(context, host=None, verify_host=False): begin a TLS handshake on this fresh "
     "socket (the engine's TLS: engine/tls.c); protocol.tls_done() follows, or "
     "connection_lost(exc) with exc.tls_reason / verify_code / verify_message."},
    {"claim", (PyCFunction)conn_claim, METH_NOARGS,
     "The client's protocol object, made now if the engine logged it in alone."},
    {"write", (PyCFunction)conn_write, METH_O, "Send bytes (as asyncio.Transport.write)."},
    {"close", (PyCFunction)conn_close, METH_NOARGS, "Close once written out."},
    {"abort", (PyCFunction)conn_abort, METH_NOARGS, "Close now, dropping unsent bytes."},
    {"pause_reading", (PyCFunction)conn_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)conn_resume_reading, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)conn_is_closing, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)conn_is_reading, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)conn_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)conn_get_extra_info, METH_VARARGS, NULL},
    {"set_fast", (PyCFunction)conn_set_fast, METH_VARARGS,
     "set_fast(pool, params_id, expires=0, statements=None): enter the fast path; "
     "statements: a client's router.statements, a server's prepared (named statements)."},
    {"set_statements", (PyCFunction)conn_set_statements, METH_O,
     "set_statements(statements): a client's router.statements from now on (None: no "
     "renaming; its named statements go to Python)."},
    {"eject", (PyCFunction)conn_eject, METH_NOARGS,
     "Take the connection back from the fast path: True if it was on it. False also for a pair\n"
     "mid-way through a streamed Bind, which comes back when the Bind is through."},
    {"take_unnamed_parsed", (PyCFunction)conn_take_unnamed_parsed, METH_NOARGS,
     "Did the engine carry an unnamed Parse or a simple query since last asked (so Python's "
     "record of the client's unnamed statement is out of date)?"},
    {"scram_login", (PyCFunction)conn_scram_login, METH_VARARGS,
     "scram_login(stored_key, server_key, salt_b64, iterations, valid) -> bytes: run this "
     "client's SCRAM-SHA-256 exchange in the engine; returns the AuthenticationSASL message."},
    {"scram_feed", (PyCFunction)conn_scram_feed, METH_O,
     "scram_feed(data): bytes of the SCRAM exchange that reached Python first."},
    {"set_read_at_accept", (PyCFunction)conn_set_read_at_accept, METH_O,
     "Listener: read a client as soon as it is accepted (TCP_DEFER_ACCEPT is on)."},
    {"set_hold", (PyCFunction)conn_set_hold, METH_O,
     "A held server goes back to Python when released instead of being lent again."},
    {NULL}};

static PyObject *conn_get_route_flags(ConnObject *c, void *unused) {
    return PyLong_FromLong(c->route_flags);
}

static int conn_set_route_flags(ConnObject *c, PyObject *value, void *unused) {
    long v = value ? PyLong_AsLong(value) : -1;
    if (v == -1 && (!value || PyErr_Occurred())) {
        if (!value) PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    c->route_flags = (int)(v & ROUTE_WROTE);
    if (!c->route_flags) c->route_ended = 0;
    return 0;
}

static PyObject *conn_get_route_ended(ConnObject *c, void *unused) {
    return PyFloat_FromDouble(c->route_ended / 1e9);
}

static PyGetSetDef conn_getset[] = {
    {"fast", (getter)conn_get_fast, NULL, "On the fast path?", NULL},
    {"route_flags", (getter)conn_get_route_flags, (setter)conn_set_route_flags,
     "Read/write split: 1 = the engine sent a transaction of it to the primary (0 clears).",
     NULL},
    {"route_ended", (getter)conn_get_route_ended, NULL,
     "When the last such transaction ended in the engine (time.monotonic(); 0: not there).",
     NULL},
    {"peer", (getter)conn_get_peer, NULL, "The linked connection's protocol, if linked in C.",
     NULL},
    {"fast_state", (getter)conn_get_state, NULL, "The fast path's view of a client.", NULL},
    {"tls", (getter)conn_get_tls, NULL, "Encrypted by the engine (handshake done)?", NULL},
    {"tls_info", (getter)conn_get_tls_info, NULL, "'version/cipher' of its TLS, or ''.", NULL},
    {NULL}};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgpilot.proxy._fastpath.Conn",
    .tp_basicsize = sizeof(ConnObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A socket owned by the engine; the transport of a client or server protocol.",
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_methods = conn_methods,
    .tp_getset = conn_getset,
    .tp_weaklistoffset = offsetof(ConnObject, weakreflist),
};
