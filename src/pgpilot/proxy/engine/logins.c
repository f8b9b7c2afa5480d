/* Engine logins: a client whose StartupMessage matches a login route Python made is logged in
 * by the engine alone (SCRAM, welcome, cancel key) and served as a "phantom", with no Python
 * object until Python has to see it (claim). Also the phantoms' connection log lines, written
 * by the engine itself when the log is the CLI's plain files. */

/* -- engine logins ------------------------------------------------------------------------
 * A login route (Engine.configure_logins; built by fastpath.LoginRoute after a login Python
 * ran itself) says everything a StartupMessage -- byte for byte the same -- leads to: the pool,
 * the parameters' id, the user's SCRAM secret and the welcome. With routes known, a client an
 * engine listener accepts gets no Python object ("phantom"): the engine reads its
 * StartupMessage, runs the SCRAM exchange against the route's secret, sends the welcome with
 * a cancel key of its own (entered in the pooler's cancel_keys dict) and puts the client on
 * the fast path. The Python object is made ("claimed") only when Python has to see the client:
 * a packet with no route, a failed login, a hand-back to Python, a CancelRequest for its key,
 * a login timeout, an admin command. A phantom that just leaves costs Python nothing. */
#define ROUTE_ITEMS 8 /* (route, FastPool, params_id, stored_key, server_key, salt_b64,
                       *  iterations, welcome); the four SCRAM items None: no password
                       *  (trust) */

static void conn_close_fd(ConnObject *c);
static void lost_errno(ConnObject *c, int err);
static void enter_fast_mode(ConnObject *c, PoolObject *p, long long params_id, double expires);

static void phantom_unlist(ConnObject *c) {
    EngineObject *e = c->engine;
    if (!(c->flags & F_PHANTOM)) return;
    c->flags &= ~F_PHANTOM;
    if (c->flags & F_WELCOMED) {
        ((PoolObject *)PyTuple_GET_ITEM(c->route, 1))->n_phantoms--;
        e->phantoms_welcomed--;
    }
    if (c->ph_prev) c->ph_prev->ph_next = c->ph_next; else e->phantom_head = c->ph_next;
    if (c->ph_next) c->ph_next->ph_prev = c->ph_prev;
    c->ph_prev = c->ph_next = NULL;
    e->phantoms--;
}

static void forget_cancel_key(ConnObject *c) {
    EngineObject *e = c->engine;
    if (!e->cancel_keys || !c->cancel_pid) return;
    PyObject *k = Py_BuildValue("(II)", c->cancel_pid, c->cancel_key);
    PyObject *v = k ? PyDict_GetItemWithError(e->cancel_keys, k) : NULL;
    if (v == (PyObject *)c && PyDict_DelItem(e->cancel_keys, k) < 0) PyErr_Clear();
    PyErr_Clear();
    Py_XDECREF(k);
    c->cancel_pid = c->cancel_key = 0;
}

static PyObject *address_tuple(const struct sockaddr *a);
static int host_and_port(const struct sockaddr *a, char host[INET6_ADDRSTRLEN], int *port);

/* Lines the engine writes itself (log_to): each in the CLI's format (logs.LOG_FORMAT, as
 * logging's default time format: local time, comma, milliseconds), kept until the end of the
 * batch of events it came in, then written with one write() per log descriptor. */
static int log_reserve(EngineObject *e, size_t more) {
    if (e->log_len + more <= e->log_cap) return 0;
    size_t cap = e->log_cap ? e->log_cap : 8192;
    while (cap < e->log_len + more) cap *= 2;
    char *grown = PyMem_Realloc(e->log_buf, cap);
    if (!grown) return -1;
    e->log_buf = grown;
    e->log_cap = cap;
    return 0;
}

static void log_append(EngineObject *e, const char *text, size_t n) {
    memcpy(e->log_buf + e->log_len, text, n);
    e->log_len += n;
}

/* The lines so far, to every log descriptor; as logging's handlers, a descriptor that fails
 * loses these lines and nothing else stops. A descriptor that cannot take them now (a full
 * non-blocking pipe) is never waited for: the loop holds the GIL here and serves every
 * client. What it did not take is dropped and counted (Engine.log_lines_dropped), whole
 * lines only, the rest of a line cut short ended by a newline. */
static void log_flush(EngineObject *e) {
    if (!e->log_len) return;
    for (int i = 0; i < e->n_log_fds; i++) {
        size_t done = 0;
        while (done < e->log_len) {
            ssize_t w = write(e->log_fds[i], e->log_buf + done, e->log_len - done);
            if (w > 0) {
                done += (size_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR) continue;
            break;
        }
        if (done < e->log_len) {
            /* A line cut short is ended, if the descriptor takes one more byte. */
            if (done && e->log_buf[done - 1] != '\n' && write(e->log_fds[i], "\n", 1) == 1) {
                const char *nl = memchr(e->log_buf + done, '\n', e->log_len - done);
                done = nl ? (size_t)(nl - e->log_buf) + 1 : e->log_len;
                e->log_dropped++;
            }
            for (size_t k = done; k < e->log_len; k++) e->log_dropped += e->log_buf[k] == '\n';
        }
    }
    e->log_len = 0;
}

static void log_close_fds(EngineObject *e) {
    for (int i = 0; i < e->n_log_fds; i++) close(e->log_fds[i]);
    e->n_log_fds = 0;
}

static const char *utf8_attr(PyObject *obj, const char *name, Py_ssize_t *n) {
    PyObject *value = PyObject_GetAttrString(obj, name);
    const char *text = value && PyUnicode_Check(value) ? PyUnicode_AsUTF8AndSize(value, n) : NULL;
    Py_XDECREF(value); /* the route keeps the str, and the str its UTF-8 */
    if (!text) {
        PyErr_Clear();
        *n = 1;
        return "?";
    }
    return text;
}

/* A phantom's line: as FastPath.drain_log words it, and ClientConnection for any client. */
static void log_phantom_line(ConnObject *c, int kind) {
    EngineObject *e = c->engine;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != e->log_second || !e->log_time[0]) {
        struct tm tm;
        if (!localtime_r(&ts.tv_sec, &tm) ||
            !strftime(e->log_time, sizeof e->log_time - 8, "%Y-%m-%d %H:%M:%S", &tm))
            e->log_time[0] = 0;
        e->log_second = ts.tv_sec;
    }
    PyObject *route = PyTuple_GET_ITEM(c->route, 0);
    Py_ssize_t db_len, user_len;
    const char *db = utf8_attr(route, "database", &db_len);
    const char *user = utf8_attr(route, "user", &user_len);
    char host[INET6_ADDRSTRLEN] = "unix";
    int port = 0;
    host_and_port(&c->peer_addr.sa, host, &port); /* as drain_log: "unix:0" otherwise */
    /* PgBouncer's words for a client leaving: "closing because: ... (age=Ns)". */
    char what[96];
    if (kind == 0)
        snprintf(what, sizeof what, "login ok");
    else
        snprintf(what, sizeof what, "closing because: client closed the connection (age=%llds)",
                 (long long)((now_ns() - c->accepted) / 1000000000LL));
    char stamp[64], id[96], tail[INET6_ADDRSTRLEN + 160];
    int stamp_len = snprintf(stamp, sizeof stamp, "%s,%03ld", e->log_time, ts.tv_nsec / 1000000);
    int id_len = snprintf(id, sizeof id, "C-%lld(", (long long)c->client_id);
    int tail_len = snprintf(tail, sizeof tail, "@%s:%d) %s\n", host, port, what);
    size_t need = (size_t)stamp_len + e->log_head_len + (size_t)id_len + (size_t)db_len + 1 +
                  (size_t)user_len + (size_t)tail_len;
    if (log_reserve(e, need) < 0) {
        PyErr_Clear();
        return;
    }
    log_append(e, stamp, (size_t)stamp_len);
    log_append(e, e->log_head, e->log_head_len);
    log_append(e, id, (size_t)id_len);
    log_append(e, db, (size_t)db_len);
    log_append(e, "/", 1);
    log_append(e, user, (size_t)user_len);
    log_append(e, tail, (size_t)tail_len);
}

/* With connection logging on, a phantom's login (kind 0) or leaving (1) is logged: by the
 * engine (log_to), or noted for Python to log in its words (FastPath.drain_log), a batch at a
 * time. Either way the phantom stays a phantom. */
static void log_phantom(ConnObject *c, int kind) {
    EngineObject *e = c->engine;
    if (!c->route) return;
    if (e->n_log_fds) {
        log_phantom_line(c, kind);
        return;
    }
    if (!e->log_events || !e->log_drain) return;
    PyObject *addr = address_tuple(&c->peer_addr.sa);
    PyObject *ev = addr ? Py_BuildValue("(iLON)", kind, c->client_id,
                                        PyTuple_GET_ITEM(c->route, 0), addr)
                        : NULL;
    if (!ev || PyList_Append(e->log_events, ev) < 0) {
        Py_XDECREF(ev);
        report_error(e);
        return;
    }
    Py_DECREF(ev);
    if (PyList_GET_SIZE(e->log_events) == 1) {
        PyObject *r = py_call_soon(e, e->log_drain, NULL);
        if (!r) report_error(e);
        Py_XDECREF(r);
    }
}

/* A phantom leaves (it closed, or could not be claimed): nothing of it reaches Python but a
 * line in the log, if asked for. */
static void phantom_drop(ConnObject *c) {
    if ((c->flags & (F_PHANTOM | F_WELCOMED)) == (F_PHANTOM | F_WELCOMED) && c->client_id &&
        c->engine->log_leaves)
        log_phantom(c, 1);
    Py_INCREF(c);
    leave_fast(c);
    forget_cancel_key(c);
    phantom_unlist(c);
    Py_CLEAR(c->route);
    if (!(c->flags & F_CLOSED)) {
        conn_close_fd(c);
        drop_engine_ref(c);
    }
    Py_DECREF(c);
}

/* Give a phantom its Python object: the listener's handler makes it before the startup packet
 * has a route, the route's object during the route's SCRAM exchange or after the welcome.
 * 0, or -1: the phantom could not be claimed and is gone. */
static int claim(ConnObject *c) {
    if (!(c->flags & F_PHANTOM)) return 0;
    double accepted = secs(c->accepted);
    PyObject *proto;
    Py_INCREF(c);
    if (c->flags & F_WELCOMED)
        proto = py_method(PyTuple_GET_ITEM(c->route, 0), "materialize", "OkkdL", (PyObject *)c,
                          (unsigned long)c->cancel_pid, (unsigned long)c->cancel_key, accepted,
                          c->client_id);
    else if (c->route)
        proto = py_method(PyTuple_GET_ITEM(c->route, 0), "claim_login", "Od", (PyObject *)c,
                          accepted);
    else
        proto = py_method(c->protocol, "claim", "Od", (PyObject *)c, accepted);
    int ok = proto != NULL;
    if (!ok) {
        report_error(c->engine);
        if (c->peer) {
            /* Its server is mid-transaction: Python closes it (it never lends a dirty one). */
            ConnObject *s = c->peer;
            Py_INCREF(s);
            unlink_pair(c);
            conn_lost(s, NULL);
            Py_DECREF(s);
        }
        phantom_drop(c);
    } else {
        phantom_unlist(c);
        Py_CLEAR(c->route);
        Py_SETREF(c->protocol, proto);
    }
    Py_DECREF(c);
    return ok ? 0 : -1;
}

/* A StartupMessage with a route: the SCRAM exchange starts here. 1 if it did, 0 if Python
 * has to handle this client (no route, or the route is unusable). */
static int route_login(ConnObject *c, const char *packet, size_t n) {
    EngineObject *e = c->engine;
    if (!e->routes || !PyDict_GET_SIZE(e->routes)) return 0;
    /* TLS required: a client in clear text is Python's to refuse, whatever route it names. */
    if (e->client_tls_required && !tls_active(c)) return 0;
    PyObject *key = PyBytes_FromStringAndSize(packet, (Py_ssize_t)n);
    PyObject *route = key ? PyDict_GetItemWithError(e->routes, key) : NULL;
    Py_XDECREF(key);
    if (!route || !PyTuple_Check(route) || PyTuple_GET_SIZE(route) != ROUTE_ITEMS ||
        !PyBytes_Check(PyTuple_GET_ITEM(route, 7)) ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(route, 1), &PoolType)) {
        PyErr_Clear();
        return 0;
    }
    if (PyTuple_GET_ITEM(route, 3) == Py_None) {
        /* No password asked (trust): the welcome goes out at once. */
        c->route = Py_NewRef(route);
        route_welcome(c, NULL);
        return 1;
    }
    if (!PyBytes_Check(PyTuple_GET_ITEM(route, 3)) || !PyBytes_Check(PyTuple_GET_ITEM(route, 4)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(route, 5)))
        return 0;
    long iterations = PyLong_AsLong(PyTuple_GET_ITEM(route, 6));
    PyObject *stored = PyTuple_GET_ITEM(route, 3), *server = PyTuple_GET_ITEM(route, 4);
    PyObject *sasl = iterations > 0 ? scram_start(c, PyBytes_AS_STRING(stored),
                                                  PyBytes_GET_SIZE(stored),
                                                  PyBytes_AS_STRING(server),
                                                  PyBytes_GET_SIZE(server),
                                                  PyTuple_GET_ITEM(route, 5), iterations, 1)
                                    : NULL;
    if (!sasl) {
        PyErr_Clear();
        return 0;
    }
    c->route = Py_NewRef(route);
    if (conn_send(c, PyBytes_AS_STRING(sasl), (size_t)PyBytes_GET_SIZE(sasl)) < 0)
        lost_errno(c, errno);
    Py_DECREF(sasl);
    return 1;
}

/* The route's SCRAM exchange passed (or there is none): send SASL final (``final``; NULL
 * without SCRAM) + the welcome + BackendKeyData + ReadyForQuery in one write and enter the
 * fast path, all without Python. */
static void route_welcome(ConnObject *c, PyObject *final) {
    EngineObject *e = c->engine;
    PyObject *route = c->route, *welcome = PyTuple_GET_ITEM(route, 7);
    uint32_t pid = 0, key = 0;
    for (int tries = 0; tries < 16 && !pid && e->cancel_keys; tries++) {
        uint32_t r[2];
        if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) break;
        uint32_t candidate = e->pid_base | (r[0] & e->pid_mask);
        if (!candidate) continue;
        uint32_t candidate_key = (r[1] & 0x7FFFFFFF) | e->key_bits;
        PyObject *k = Py_BuildValue("(II)", candidate, candidate_key);
        int taken = k ? PyDict_Contains(e->cancel_keys, k) : -1;
        if (taken == 0 && PyDict_SetItem(e->cancel_keys, k, (PyObject *)c) == 0) {
            pid = candidate;
            key = candidate_key;
        }
        Py_XDECREF(k);
        if (taken < 0) break;
    }
    if (!pid) {
        /* No randomness or no memory: Python says so, in its words. */
        PyErr_Clear();
        if (claim(c) == 0) scram_failed(c, SCRAM_INTERNAL, "no cancel key");
        return;
    }
    c->cancel_pid = pid;
    c->cancel_key = key;
    size_t fl = final ? (size_t)PyBytes_GET_SIZE(final) : 0;
    size_t wl = (size_t)PyBytes_GET_SIZE(welcome);
    size_t total = fl + wl + 13 + 6;
    char *out = PyMem_Malloc(total);
    if (!out) {
        PyErr_Clear();
        phantom_drop(c);
        return;
    }
    if (fl) memcpy(out, PyBytes_AS_STRING(final), fl);
    memcpy(out + fl, PyBytes_AS_STRING(welcome), wl);
    unsigned char *k = (unsigned char *)out + fl + wl;
    k[0] = 'K';
    k[1] = 0, k[2] = 0, k[3] = 0, k[4] = 12;
    k[5] = pid >> 24, k[6] = pid >> 16, k[7] = pid >> 8, k[8] = pid;
    k[9] = key >> 24, k[10] = key >> 16, k[11] = key >> 8, k[12] = key;
    memcpy(k + 13, "Z\0\0\0\5I", 6);
    c->flags |= F_WELCOMED;
    ((PoolObject *)PyTuple_GET_ITEM(route, 1))->n_phantoms++;
    e->phantoms_welcomed++;
    int broke = conn_send(c, out, total) < 0;
    PyMem_Free(out);
    if (broke) {
        lost_errno(c, errno);
        return;
    }
    if (e->log_logins || e->log_leaves) {
        /* An id from the pooler's own sequence, so its log lines read as any client's. */
        PyObject *id = PyIter_Next(e->client_ids);
        c->client_id = id ? PyLong_AsLongLong(id) : 0;
        Py_XDECREF(id);
        if (PyErr_Occurred()) {
            report_error(e);
            c->client_id = 0; /* (-1 from a failed conversion is no id) */
        }
        if (e->log_logins) log_phantom(c, 0);
    }
    /* Bytes sent behind the last SASL message are its first query: the fast path reads them
     * from the buffer they are in. */
    long long params_id = PyLong_AsLongLong(PyTuple_GET_ITEM(route, 2));
    if (params_id == -1 && PyErr_Occurred()) {
        /* A route with no usable parameters' id: Python serves this client. */
        report_error(e);
        claim(c);
        return;
    }
    enter_fast_mode(c, (PoolObject *)PyTuple_GET_ITEM(route, 1), params_id, 0);
}
