/* The Engine type and its event loop: the epoll set, one event of an engine socket served
 * (on_readable dispatches to the listener, the hand-off socket, TLS, SCRAM, the slow path or
 * the pumps), run() and select() (the event loop's wait, with Python's own descriptors in the
 * same set), and the methods Python configures the engine with. */

static void on_readable(ConnObject *c) {
    if (c->kind == KIND_LISTENER) {
        listener_accept(c);
        return;
    }
    if (c->kind == KIND_HANDOFF) {
        handoff_receive(c);
        return;
    }
    if (c->tls_state & TLS_HANDSHAKE) {
        tls_handshake_step(c);
        return;
    }
    if (c->scram) {
        if (read_buffered(c, 4096)) scram_pump(c);
        return;
    }
    if (c->mode == MODE_SLOW) {
        char plain_chunk[READ_CHUNK];
        char *chunk = plain_chunk;
        ssize_t n;
        if (tls_active(c)) {
            n = tls_recv(c, tls_scratch); /* decrypted: up to TLS_SCRATCH bytes */
            if (n < 0) return; /* nothing yet, or lost (Python was told) */
            if (n == 0) {
                conn_lost(c, NULL);
                return;
            }
            /* tls_scratch is every Conn's, and every Engine's of the process: Python runs
             * below (claim, startup_received) and whatever decrypts meanwhile (an engine
             * in another thread, a nested run) writes over it. This client's bytes are
             * its own from here on. */
            PyObject *owned = PyBytes_FromStringAndSize(tls_scratch, n);
            if (!owned) {
                report_error(c->engine);
                conn_lost(c, NULL);
                return;
            }
            slow_received(c, PyBytes_AS_STRING(owned), n, owned);
            Py_DECREF(owned);
            return;
        } else {
            n = sock_recv(c->fd, chunk, READ_CHUNK, MSG_DONTWAIT);
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
            lost_errno(c, errno);
            return;
        }
        if (n == 0) {
            conn_lost(c, NULL);
            return;
        }
        slow_received(c, chunk, n, NULL);
        return;
    }
    if (!read_buffered(c, 16384)) return;
    if (c->kind == KIND_CLIENT) {
        c->last_activity = now_ns();
        Py_INCREF(c);
        client_pump(c);
        partial_note(c);
        Py_DECREF(c);
    } else {
        server_pump(c);
    }
}

/* ==================================================================== Engine */
static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *call_soon, *error_handler;
    if (!PyArg_ParseTuple(args, "OO", &call_soon, &error_handler)) return NULL;
    EngineObject *e = (EngineObject *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        Py_DECREF(e);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->call_soon = call_soon == Py_None ? NULL : Py_NewRef(call_soon);
    e->error_handler = Py_NewRef(error_handler);
    e->graveyard = PyList_New(0);
    if (!e->graveyard) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static int engine_traverse(EngineObject *e, visitproc visit, void *arg) {
    Py_VISIT(e->call_soon);
    Py_VISIT(e->error_handler);
    Py_VISIT(e->graveyard);
    Py_VISIT(e->routes);
    Py_VISIT(e->cancel_keys);
    Py_VISIT(e->client_ids);
    Py_VISIT(e->log_events);
    Py_VISIT(e->log_drain);
    Py_VISIT(e->handoff_in);
    Py_VISIT(e->handoff_listener);
    Py_VISIT(e->client_tls);
    return 0;
}

static int engine_clear(EngineObject *e) {
    Py_CLEAR(e->call_soon);
    Py_CLEAR(e->error_handler);
    Py_CLEAR(e->graveyard);
    Py_CLEAR(e->routes);
    Py_CLEAR(e->cancel_keys);
    Py_CLEAR(e->client_ids);
    Py_CLEAR(e->log_events);
    Py_CLEAR(e->log_drain);
    Py_CLEAR(e->handoff_in);
    Py_CLEAR(e->handoff_listener);
    Py_CLEAR(e->client_tls);
    if (e->counters) {
        counter_set(e, e->me, SLOT_ACCEPTING, 0);
        e->counters = NULL;
        PyBuffer_Release(&e->counters_view);
    }
    PyMem_Free(e->handoff_fds);
    e->handoff_fds = NULL;
    return 0;
}

static void engine_dealloc(EngineObject *e) {
    PyObject_GC_UnTrack(e);
    if (e->epfd >= 0) close(e->epfd);
    log_flush(e);
    log_close_fds(e);
    PyMem_Free(e->log_head);
    PyMem_Free(e->log_buf);
    engine_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* bind(call_soon, error_handler): the loop's call_soon, once the loop exists (an engine made
 * for the loop's selector comes first). */
static PyObject *engine_bind(EngineObject *e, PyObject *args) {
    PyObject *call_soon, *error_handler;
    if (!PyArg_ParseTuple(args, "OO", &call_soon, &error_handler)) return NULL;
    Py_XSETREF(e->call_soon, call_soon == Py_None ? NULL : Py_NewRef(call_soon));
    Py_XSETREF(e->error_handler, Py_NewRef(error_handler));
    Py_RETURN_NONE;
}

static PyObject *engine_fileno(EngineObject *e, PyObject *unused) {
    return PyLong_FromLong(e->epfd);
}

/* A Conn for ``fd``, registered with epoll; NULL with an exception (``fd`` is closed then). */
static ConnObject *new_conn(EngineObject *e, int fd, PyObject *protocol, PyObject *extra,
                            int kind) {
    ConnObject *c = PyObject_GC_New(ConnObject, &ConnType);
    if (!c) {
        close(fd);
        return NULL;
    }
    memset((char *)c + sizeof(PyObject), 0, sizeof(ConnObject) - sizeof(PyObject));
    c->engine = (EngineObject *)Py_NewRef(e);
    c->protocol = Py_NewRef(protocol);
    c->extra = Py_XNewRef(extra);
    c->fd = fd;
    c->kind = kind;
    c->mode = MODE_SLOW;
    c->txn = 'I';
    e->n_conns++;
    PyObject_GC_Track(c);
    Py_INCREF(c); /* the engine's reference, dropped when the fd closes */
    update_events(c);
    if (!c->registered) {
        int err = errno;
        conn_close_fd(c);
        Py_DECREF(c);
        Py_DECREF(c);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return c;
}

/* Adopt a connected socket (the engine owns ``fd`` from now on). */
static PyObject *engine_connection(EngineObject *e, PyObject *args) {
    int fd, kind;
    PyObject *protocol, *extra;
    if (!PyArg_ParseTuple(args, "iOO!p", &fd, &protocol, &PyDict_Type, &extra, &kind)) return NULL;
    return (PyObject *)new_conn(e, fd, protocol, extra, kind ? KIND_SERVER : KIND_CLIENT);
}

/* Accept clients on a listening socket (the engine owns ``fd``; close() stops it). */
static PyObject *engine_listen(EngineObject *e, PyObject *args) {
    int fd, keepalive, read_at_accept = 0;
    PyObject *handler;
    if (!PyArg_ParseTuple(args, "iOp|p", &fd, &handler, &keepalive, &read_at_accept))
        return NULL;
    ConnObject *l = new_conn(e, fd, handler, NULL, KIND_LISTENER);
    if (l && keepalive) l->flags |= F_KEEPALIVE;
    if (l && read_at_accept) l->flags |= F_READ_AT_ACCEPT;
    return (PyObject *)l;
}

/* balance(counters, index, send_fds, receive_fd, listener): take part in balancing clients
 * between workers (see "balancing"): ``counters`` a writable buffer of SLOT_WORDS 64-bit words
 * per worker (shared memory), ``index`` this worker's, ``send_fds`` each sibling's hand-off
 * send end (-1 for this worker), ``receive_fd`` this worker's receive end (the engine owns it
 * from now on, whatever happens), ``listener`` the engine listener whose handler serves the
 * clients handed in (None: there is none; they are closed). Once per engine. Clients handed
 * to this worker's predecessor (a worker that died) and still queued are taken in now. */
static PyObject *engine_balance(EngineObject *e, PyObject *args) {
    PyObject *buffer, *send, *listener;
    int me, receive_fd;
    if (!PyArg_ParseTuple(args, "OiO!iO", &buffer, &me, &PyTuple_Type, &send, &receive_fd,
                          &listener))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(send);
    int *fds = NULL;
    if (e->counters) {
        PyErr_SetString(PyExc_RuntimeError, "the engine balances already");
        goto fail;
    }
    if (listener != Py_None && (!PyObject_TypeCheck(listener, &ConnType) ||
                                ((ConnObject *)listener)->kind != KIND_LISTENER)) {
        PyErr_SetString(PyExc_TypeError, "listener must be an engine listener or None");
        goto fail;
    }
    if (me < 0 || me >= n) {
        PyErr_SetString(PyExc_ValueError, "index out of range");
        goto fail;
    }
    if (!(fds = PyMem_Malloc((size_t)n * sizeof(int)))) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(send, i));
        if (fd == -1 && PyErr_Occurred()) goto fail;
        if (fd < -1 || fd > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "invalid file descriptor %ld", fd);
            goto fail;
        }
        fds[i] = i == me ? -1 : (int)fd;
    }
    if (PyObject_GetBuffer(buffer, &e->counters_view, PyBUF_WRITABLE) < 0) goto fail;
    if (e->counters_view.len < n * SLOT_WORDS * (Py_ssize_t)sizeof(int64_t) ||
        (uintptr_t)e->counters_view.buf % sizeof(int64_t)) {
        PyBuffer_Release(&e->counters_view);
        PyErr_SetString(PyExc_ValueError, "counters: too small or not aligned");
        goto fail;
    }
    ConnObject *in = new_conn(e, receive_fd, Py_None, NULL, KIND_HANDOFF);
    if (!in) { /* (new_conn closed the fd) */
        PyBuffer_Release(&e->counters_view);
        PyMem_Free(fds);
        return NULL;
    }
    e->counters = e->counters_view.buf;
    e->n_workers = (int)n;
    e->me = me;
    e->handoff_fds = fds;
    e->handoff_in = in;
    e->handoff_listener = (ConnObject *)Py_XNewRef(listener == Py_None ? NULL : listener);
    counter_set(e, me, SLOT_ACCEPTING, 0);
    handoff_receive(in);
    /* The count starts from what this worker holds (its predecessor's clients are gone). */
    counter_set(e, me, SLOT_CLIENTS, e->counted);
    if (e->handoff_listener && !(e->handoff_listener->flags & F_CLOSED))
        counter_set(e, me, SLOT_ACCEPTING, 1);
    Py_RETURN_NONE;
fail:
    PyMem_Free(fds);
    close(receive_fd);
    return NULL;
}

static PyObject *engine_pool(EngineObject *e, PyObject *args) {
    PyObject *handler, *bounds;
    if (!PyArg_ParseTuple(args, "OO", &handler, &bounds)) return NULL;
    PyObject *seq = PySequence_Fast(bounds, "bounds must be a sequence");
    if (!seq) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != N_BUCKETS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "need %d bucket bounds", N_BUCKETS);
        return NULL;
    }
    PoolObject *p = PyObject_GC_New(PoolObject, &PoolType);
    if (!p) {
        Py_DECREF(seq);
        return NULL;
    }
    memset((char *)p + sizeof(PyObject), 0, sizeof(PoolObject) - sizeof(PyObject));
    for (int i = 0; i < N_BUCKETS; i++) {
        double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (b == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            Py_DECREF(p);
            return NULL;
        }
        p->bounds[i] = secs_to_ns(b);
    }
    Py_DECREF(seq);
    p->engine = (EngineObject *)Py_NewRef(e);
    p->handler = Py_NewRef(handler);
    p->check_after = -1;
    PyObject_GC_Track(p);
    return (PyObject *)p;
}

/* One event of an engine socket. */
static void serve_event(ConnObject *c, uint32_t ev) {
    Py_INCREF(c);
    if (!(c->flags & F_CLOSED) && (ev & EPOLLOUT)) on_writable(c);
    if (!(c->flags & F_CLOSED) && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        if (wants_read(c) || (c->flags & F_CLOSING)) {
            if (c->flags & F_CLOSING) {
                /* Reading stopped for a closing socket: only a broken peer matters. */
                if (ev & (EPOLLHUP | EPOLLERR)) {
                    c->wb.start = c->wb.end = 0;
                    on_writable(c);
                }
            } else {
                on_readable(c);
            }
        } else if (ev & (EPOLLHUP | EPOLLERR)) {
            conn_lost(c, NULL);
        }
    }
    Py_DECREF(c);
}

/* The batch is done: conns closed during it may go now. */
static void bury(EngineObject *e) {
    if (e->graveyard && PyList_GET_SIZE(e->graveyard)) {
        if (PyList_SetSlice(e->graveyard, 0, PyList_GET_SIZE(e->graveyard), NULL) < 0)
            PyErr_Clear();
    }
}

/* Python's own descriptors (Engine.watch) share the epoll set, tagged in the event data: an
 * engine Conn's pointer is even, a watched fd is stored as (fd << 1) | 1. */
#define WATCHED(u64) ((u64) & 1)
#define WATCHED_FD(u64) ((int)((u64) >> 1))
#define SELECT_READ 1 /* selectors.EVENT_READ */
#define SELECT_WRITE 2 /* selectors.EVENT_WRITE */

/* Called by the event loop when the epoll fd is readable: serve every ready socket. */
static PyObject *engine_run(EngineObject *e, PyObject *unused) {
    struct epoll_event events[128];
    Py_INCREF(e);
    e->running++;
    for (int round = 0; round < 8; round++) {
        int n = epoll_wait(e->epfd, events, 128, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            e->running--;
            Py_DECREF(e);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) serve_event(events[i].data.ptr, events[i].events);
        bury(e);
        log_flush(e);
        if (n < 128) break;
    }
    e->running--;
    Py_DECREF(e);
    Py_RETURN_NONE;
}

static int epoll_mask(int select_events) {
    return ((select_events & SELECT_READ) ? EPOLLIN : 0) |
           ((select_events & SELECT_WRITE) ? EPOLLOUT : 0);
}

/* watch(fd, events, is_new): Python's selector registers a descriptor in the engine's set. */
static PyObject *engine_watch(EngineObject *e, PyObject *args) {
    int fd, events, is_new;
    if (!PyArg_ParseTuple(args, "iip", &fd, &events, &is_new)) return NULL;
    if (fd < 0) return PyErr_Format(PyExc_ValueError, "invalid file descriptor %d", fd);
    struct epoll_event ev;
    ev.events = epoll_mask(events);
    ev.data.u64 = ((uint64_t)fd << 1) | 1;
    if (epoll_ctl(e->epfd, is_new ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *engine_unwatch(EngineObject *e, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < INT_MIN || fd > INT_MAX) /* (a negative one is EBADF below, as before) */
        return PyErr_Format(PyExc_ValueError, "invalid file descriptor %ld", fd);
    /* As selectors.EpollSelector: a descriptor closed before it was unregistered is gone
     * from the set already. */
    if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, (int)fd, NULL) < 0 && errno != EBADF && errno != ENOENT)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* select(timeout) -> [(fd, events)]: the event loop's wait. Engine sockets are served here, in
 * C, for as long as none of Python's descriptors is ready, no callback into Python was made
 * and the timeout (seconds; None: none) has not passed: traffic the fast path carries alone
 * costs one epoll_wait per batch and no turn of the Python event loop. */
static PyObject *engine_select(EngineObject *e, PyObject *arg) {
    int64_t deadline = -1;
    if (arg != Py_None) {
        double t = PyFloat_AsDouble(arg);
        if (t == -1.0 && PyErr_Occurred()) return NULL;
        deadline = now_ns() + (t > 0 ? secs_to_ns(t) : 0);
    }
    PyObject *ready = PyList_New(0);
    if (!ready) return NULL;
    struct epoll_event events[128];
    unsigned long calls_before = python_calls;
    Py_INCREF(e);
    e->running++;
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ns();
            /* rounded up, as selectors.EpollSelector, so a timer is never woken for early */
            ms = left <= 0 ? 0 : (int)((left + 999999) / 1000000);
        }
        int n;
        if (ms == 0) {
            n = epoll_wait(e->epfd, events, 128, 0);
        } else {
            Py_BEGIN_ALLOW_THREADS
            n = epoll_wait(e->epfd, events, 128, ms);
            Py_END_ALLOW_THREADS
        }
        if (n < 0) {
            if (errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                Py_CLEAR(ready);
            } else if (PyErr_CheckSignals() < 0) {
                Py_CLEAR(ready);
            }
            break; /* a signal: its Python handler may have work for the loop */
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (!WATCHED(tag)) {
                serve_event(events[i].data.ptr, events[i].events);
                continue;
            }
            uint32_t ev = events[i].events;
            int mask = 0;
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) mask |= SELECT_READ;
            if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) mask |= SELECT_WRITE;
            PyObject *item = Py_BuildValue("(ii)", WATCHED_FD(tag), mask);
            if (!item || PyList_Append(ready, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(ready);
                break;
            }
            Py_DECREF(item);
        }
        bury(e);
        log_flush(e);
        if (!ready || PyList_GET_SIZE(ready) || python_calls != calls_before || ms == 0 ||
            n == 0)
            break;
    }
    e->running--;
    Py_DECREF(e);
    return ready;
}

static PyObject *engine_get_n_conns(EngineObject *e, void *unused) {
    return PyLong_FromLong(e->n_conns);
}

/* configure_logins(routes, cancel_keys, pid_base, pid_mask, client_ids, log_logins,
 * log_leaves, drain, key_bits): engine logins (see above). */
static PyObject *engine_configure_logins(EngineObject *e, PyObject *args) {
    PyObject *routes, *cancel_keys, *client_ids = Py_None, *drain = Py_None;
    unsigned long base, mask, key_bits = 0;
    int log_logins = 0, log_leaves = 0;
    if (!PyArg_ParseTuple(args, "O!O!kk|OppOk", &PyDict_Type, &routes, &PyDict_Type,
                          &cancel_keys, &base, &mask, &client_ids, &log_logins, &log_leaves,
                          &drain, &key_bits))
        return NULL;
    if ((log_logins || log_leaves) && (!PyIter_Check(client_ids) || !PyCallable_Check(drain))) {
        PyErr_SetString(PyExc_TypeError, "connection logging needs client ids and a drain");
        return NULL;
    }
    Py_XSETREF(e->routes, Py_NewRef(routes));
    Py_XSETREF(e->cancel_keys, Py_NewRef(cancel_keys));
    e->pid_base = (uint32_t)base;
    e->pid_mask = (uint32_t)mask & 0x7FFFFFFF;
    e->key_bits = (uint32_t)key_bits & 0x7FFFFFFF;
    Py_XSETREF(e->client_ids, Py_NewRef(client_ids));
    Py_XSETREF(e->log_drain, Py_NewRef(drain));
    if (!e->log_events && !(e->log_events = PyList_New(0))) return NULL;
    e->log_logins = log_logins;
    e->log_leaves = log_leaves;
    Py_RETURN_NONE;
}

/* log_to(fds, head): the engine writes its phantoms' log lines itself, to these descriptors
 * (it owns them from now on), with ``head`` (bytes) between time and message; () and b"":
 * Python writes them (take_log_events). The lines of the old setting go out first. */
static PyObject *engine_log_to(EngineObject *e, PyObject *args) {
    PyObject *fds;
    const char *head;
    Py_ssize_t head_len;
    if (!PyArg_ParseTuple(args, "O!y#", &PyTuple_Type, &fds, &head, &head_len)) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fds);
    if (n > MAX_LOG_FDS)
        return PyErr_Format(PyExc_ValueError, "at most %d log descriptors", MAX_LOG_FDS);
    int new_fds[MAX_LOG_FDS];
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) return NULL;
        if (fd < 0 || fd > INT_MAX)
            return PyErr_Format(PyExc_ValueError, "invalid file descriptor %ld", fd);
        new_fds[i] = (int)fd;
    }
    char *head_copy = PyMem_Malloc(head_len ? (size_t)head_len : 1);
    if (!head_copy) return PyErr_NoMemory();
    memcpy(head_copy, head, (size_t)head_len);
    log_flush(e);
    log_close_fds(e);
    PyMem_Free(e->log_head);
    e->log_head = head_copy;
    e->log_head_len = (size_t)head_len;
    memcpy(e->log_fds, new_fds, sizeof(int) * (size_t)n);
    e->n_log_fds = (int)n;
    Py_RETURN_NONE;
}

/* take_log_events(): the phantoms' connection events not logged yet, oldest first (none when
 * the engine writes the lines itself: those it writes now). */
static PyObject *engine_take_log_events(EngineObject *e, PyObject *unused) {
    log_flush(e); /* what the engine wrote itself goes out first, in order */
    PyObject *events = e->log_events ? e->log_events : PyList_New(0);
    if (!events) return NULL;
    e->log_events = PyList_New(0);
    if (!e->log_events) {
        e->log_events = events;
        return NULL;
    }
    return events;
}

/* Claim phantoms: all of them, or (stale) those still logging in that were accepted at
 * least ``age`` seconds ago. Returns how many. */
static PyObject *claim_phantoms(EngineObject *e, int stale_only, double age) {
    int64_t cutoff = now_ns() - secs_to_ns(age);
    long n = 0;
    ConnObject *c = e->phantom_head;
    while (c) {
        if (stale_only && ((c->flags & F_WELCOMED) || c->accepted > cutoff)) {
            c = c->ph_next;
            continue;
        }
        claim(c); /* unlists it, claimed or dropped */
        n++;
        c = e->phantom_head; /* Python ran: the list may have changed */
        if (stale_only) {
            while (c && ((c->flags & F_WELCOMED) || c->accepted > cutoff)) c = c->ph_next;
        }
    }
    return PyLong_FromLong(n);
}

static PyObject *engine_claim_all(EngineObject *e, PyObject *unused) {
    return claim_phantoms(e, 0, 0);
}

/* stalled(age) -> [client protocol]: fast clients that have held part of a message with no
 * byte from them for ``age`` seconds (client_message_timeout), handed back to Python (with
 * their server, if linked) for it to fail them. */
static PyObject *engine_stalled(EngineObject *e, PyObject *arg) {
    double age = PyFloat_AsDouble(arg);
    if (age == -1.0 && PyErr_Occurred()) return NULL;
    int64_t cutoff = now_ns() - secs_to_ns(age < 0 ? 0 : age);
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    ConnObject *c = e->partial_head;
    while (c) {
        ConnObject *next = c->pt_next;
        if (!holds_partial(c)) {
            partial_remove(c);
        } else if (c->last_activity <= cutoff) {
            Py_INCREF(c);
            partial_remove(c);
            int claimed = claim(c) == 0;
            if (claimed && c->skip) {
                /* Stalled in a Bind it streams: its server has part of it, so both close
                 * (eject_client could not hand them over), in the words Python uses. */
                char text[120];
                snprintf(text, sizeof text, "client_message_timeout: no byte of an unfinished "
                         "message for %g s", age);
                fail_closed_code(c, c->peer, "08P01", text);
            } else if (claimed) {
                if (c->mode == MODE_FAST)
                    eject_client(c, c->peer, c->peer ? EJECT_LINKED : EJECT_UNLINKED);
                if (!(c->flags & (F_CLOSED | F_CLOSING)) && c->mode == MODE_SLOW &&
                    PyList_Append(out, c->protocol) < 0) {
                    Py_DECREF(c);
                    Py_DECREF(out);
                    return NULL;
                }
            }
            Py_DECREF(c);
            next = e->partial_head; /* Python ran: the list may have changed */
        }
        c = next;
    }
    return out;
}

static PyObject *engine_claim_stale(EngineObject *e, PyObject *arg) {
    double age = PyFloat_AsDouble(arg);
    if (age == -1.0 && PyErr_Occurred()) return NULL;
    return claim_phantoms(e, 1, age);
}

static PyObject *engine_get_balanced_clients(EngineObject *e, void *unused) {
    return PyLong_FromLong(e->counted);
}

static PyObject *engine_get_log_dropped(EngineObject *e, void *unused) {
    return PyLong_FromLongLong(e->log_dropped);
}

static PyObject *engine_get_phantoms(EngineObject *e, void *unused) {
    return PyLong_FromLong(e->phantoms);
}

static PyObject *engine_get_phantoms_logging_in(EngineObject *e, void *unused) {
    return PyLong_FromLong(e->phantoms - e->phantoms_welcomed);
}

static PyObject *engine_get_phantom_cap(EngineObject *e, void *unused) {
    return PyLong_FromLong(e->phantom_cap);
}

static int engine_set_phantom_cap(EngineObject *e, PyObject *value, void *unused) {
    long v = value ? PyLong_AsLong(value) : 0;
    if (v == -1 && PyErr_Occurred()) return -1;
    e->phantom_cap = v;
    return 0;
}

static PyMethodDef engine_methods[] = {
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "The epoll fd the event loop watches."},
    {"connection", (PyCFunction)engine_connection, METH_VARARGS,
     "connection(fd, protocol, extra_info, is_server) -> Conn: adopt a connected socket."},
    {"listen", (PyCFunction)engine_listen, METH_VARARGS,
     "listen(fd, handler, keepalive, read_at_accept=False) -> Conn: accept clients on a "
     "listening socket; for each, handler.new_client() gives the protocol, then "
     "protocol.connection_made(conn). read_at_accept: the socket has TCP_DEFER_ACCEPT."},
    {"pool", (PyCFunction)engine_pool, METH_VARARGS,
     "pool(handler, wait_bucket_bounds) -> FastPool."},
    {"bind", (PyCFunction)engine_bind, METH_VARARGS,
     "bind(call_soon, error_handler): set what the constructor was given."},
    {"run", (PyCFunction)engine_run, METH_NOARGS, "Serve the sockets that are ready."},
    {"select", (PyCFunction)engine_select, METH_O,
     "select(timeout) -> [(fd, events)]: serve engine sockets until one of the watched "
     "descriptors is ready (selectors' EVENT_READ / EVENT_WRITE), Python was called or the "
     "timeout (seconds, None for none) passed."},
    {"take_log_events", (PyCFunction)engine_take_log_events, METH_NOARGS,
     "The connection events of clients logged in by the engine alone, not logged yet: "
     "(kind, client id, route, peer address) with kind 0: logged in, 1: left."},
    {"log_to", (PyCFunction)engine_log_to, METH_VARARGS,
     "log_to(fds, head): write the connection lines of clients logged in by the engine alone "
     "to these descriptors (the engine owns them), with ``head`` between time and message, "
     "at the end of each batch; (), b'': leave them to take_log_events()."},
    {"configure_logins", (PyCFunction)engine_configure_logins, METH_VARARGS,
     "configure_logins(routes, cancel_keys, pid_base, pid_mask[, client_ids, log_logins, "
     "log_leaves, drain, key_bits]): the login routes (dict: startup packet -> route tuple), "
     "the pooler's cancel-key dict, how cancel keys are made (the pid's fixed and random "
     "bits, the key's fixed bits)."},
    {"claim_all", (PyCFunction)engine_claim_all, METH_NOARGS,
     "Give every phantom client its Python object; returns how many."},
    {"stalled", (PyCFunction)engine_stalled, METH_O,
     "stalled(age) -> [client protocol]: fast clients holding part of a message with no byte "
     "from them for ``age`` seconds, handed back to Python (client_message_timeout)."},
    {"claim_stale", (PyCFunction)engine_claim_stale, METH_O,
     "claim_stale(age): the same for phantoms still logging in after ``age`` seconds."},
    {"balance", (PyCFunction)engine_balance, METH_VARARGS,
     "balance(counters, index, send_fds, receive_fd, listener): balance TCP clients with "
     "sibling workers (workers = N): hand new ones to the least busy at accept, take in "
     "those handed here."},
    {"watch", (PyCFunction)engine_watch, METH_VARARGS,
     "watch(fd, events, is_new): add (or change) a descriptor of Python's in the set."},
    {"unwatch", (PyCFunction)engine_unwatch, METH_O, "unwatch(fd): take it out again."},
    {NULL}};

static PyObject *engine_get_client_tls(EngineObject *e, void *unused) {
    return Py_NewRef(e->client_tls ? e->client_tls : Py_None);
}

static int engine_set_client_tls(EngineObject *e, PyObject *value, void *unused) {
    if (value && value != Py_None && !TLS_TYPE_CHECK(value)) {
        PyErr_SetString(PyExc_TypeError, "client_tls must be a TLSContext or None");
        return -1;
    }
    Py_XSETREF(e->client_tls, value && value != Py_None ? Py_NewRef(value) : NULL);
    return 0;
}

static PyObject *engine_get_client_tls_required(EngineObject *e, void *unused) {
    return PyBool_FromLong(e->client_tls_required);
}

static int engine_set_client_tls_required(EngineObject *e, PyObject *value, void *unused) {
    int on = value ? PyObject_IsTrue(value) : 0;
    if (on < 0) return -1;
    e->client_tls_required = on;
    return 0;
}

static PyGetSetDef engine_getset[] = {
    {"client_tls_required", (getter)engine_get_client_tls_required,
     (setter)engine_set_client_tls_required,
     "client_tls_sslmode requires TLS: a client in clear text follows no login route.", NULL},
    {"client_tls", (getter)engine_get_client_tls, (setter)engine_set_client_tls,
     "The TLSContext an engine listener's clients get after SSLRequest (None: 'N').", NULL},
    {"connections", (getter)engine_get_n_conns, NULL, "Open sockets.", NULL},
    {"phantoms", (getter)engine_get_phantoms, NULL, "Clients with no Python object yet.", NULL},
    {"log_lines_dropped", (getter)engine_get_log_dropped, NULL,
     "Log lines the engine dropped because a log descriptor was full (never waited for).",
     NULL},
    {"balanced_clients", (getter)engine_get_balanced_clients, NULL,
     "Clients counted in this worker's share (balancing; 0 without).", NULL},
    {"phantoms_logging_in", (getter)engine_get_phantoms_logging_in, NULL,
     "Of those, the ones not logged in yet.", NULL},
    {"phantom_cap", (getter)engine_get_phantom_cap, (setter)engine_set_phantom_cap,
     "How many phantoms there may be (a new client past it gets its object at once).", NULL},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgpilot.proxy._fastpath.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Engine(call_soon, error_handler): the epoll set of adopted sockets.",
    .tp_new = engine_new,
    .tp_traverse = (traverseproc)engine_traverse,
    .tp_clear = (inquiry)engine_clear,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
};
