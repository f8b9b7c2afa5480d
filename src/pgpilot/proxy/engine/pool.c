/* The FastPool type: one per pool of Python's on the fast path, with the engine's
 * side of its state (idle servers, waiting clients, statistics) and the methods Python's
 * pool and janitor use on it (take_idle, recall_idle, drop_waiters, kick, take_stats ...). */

/* ==================================================================== FastPool */
static int pool_traverse(PoolObject *p, visitproc visit, void *arg) {
    Py_VISIT(p->handler);
    return 0;
}

static int pool_clear(PoolObject *p) {
    Py_CLEAR(p->handler);
    return 0;
}

static void pool_dealloc(PoolObject *p) {
    PyObject_GC_UnTrack(p);
    pool_clear(p);
    qs_pool_free(p);
    free(p->shapes);
    free(p->events);
    Py_XDECREF(p->engine);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pool_take_idle(PoolObject *p, PyObject *unused) {
    ConnObject *s = p->idle_head;
    if (!s) Py_RETURN_NONE;
    Py_INCREF(s);
    leave_fast(s);
    update_events(s);
    PyObject *proto = Py_NewRef(s->protocol);
    Py_DECREF(s);
    return proto;
}

/* "Older than ``age`` seconds": the monotonic time before which a start counts. */
static int age_cutoff(PyObject *age_arg, int64_t *cutoff) {
    double age = PyFloat_AsDouble(age_arg);
    if (age == -1.0 && PyErr_Occurred()) return -1;
    *cutoff = now_ns() - secs_to_ns(age);
    return 0;
}

/* Servers idle in C longer than ``age`` seconds go back to Python (checks, idle timeouts). */
static PyObject *pool_recall_idle(PoolObject *p, PyObject *arg) {
    int64_t cutoff;
    if (age_cutoff(arg, &cutoff) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    ConnObject *s = p->idle_head;
    while (s) {
        ConnObject *next = s->next;
        if (s->idle_since <= cutoff) {
            PyObject *item = Py_BuildValue("(Od)", s->protocol, secs(s->idle_since));
            Py_INCREF(s);
            leave_fast(s);
            update_events(s);
            Py_DECREF(s);
            if (!item || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
        s = next;
    }
    return out;
}

/* Waiting clients older than ``age`` seconds leave the queue (query_wait_timeout). */
static PyObject *pool_drop_waiters(PoolObject *p, PyObject *arg) {
    int64_t cutoff;
    if (age_cutoff(arg, &cutoff) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    ConnObject *c = p->wait_head;
    while (c) {
        ConnObject *next = c->next;
        if (c->wait_started <= cutoff) {
            Py_INCREF(c);
            if (claim(c) < 0) {
                Py_DECREF(c);
                c = next;
                continue;
            }
            leave_fast(c);
            c->rb.start = c->rb.end = 0;
            update_events(c);
            int bad = PyList_Append(out, c->protocol);
            Py_DECREF(c);
            if (bad < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        c = next;
    }
    return out;
}

/* Hand idle servers to waiting clients (after RESUME, or when Python added servers). */
static PyObject *pool_kick(PoolObject *p, PyObject *unused) {
    while (p->wait_head && p->idle_head && !p->paused) {
        ConnObject *s = p->idle_head;
        Py_INCREF(s);
        queue_remove(s);
        server_free(s);
        Py_DECREF(s);
    }
    Py_RETURN_NONE;
}

/* The first waiting client goes back to Python with its bytes (a server only Python can
 * lend, such as one behind TLS, is free). */
static PyObject *pool_eject_waiter(PoolObject *p, PyObject *unused) {
    ConnObject *c = p->wait_head;
    if (!c) Py_RETURN_FALSE;
    eject_client(c, NULL, EJECT_UNLINKED);
    Py_RETURN_TRUE;
}

static PyObject *pool_take_stats(PoolObject *p, PyObject *unused) {
    PyObject *buckets = PyTuple_New(N_BUCKETS + 1);
    if (!buckets) return NULL;
    for (int i = 0; i <= N_BUCKETS; i++) {
        PyTuple_SET_ITEM(buckets, i, PyLong_FromLongLong(p->buckets[i]));
        p->buckets[i] = 0;
    }
    PyObject *r = Py_BuildValue("{sLsLsLsLsLsLsLsdsdsdsN}", "xact_count", p->xact_count,
                                "query_count", p->query_count, "errors", p->errors,
                                "bytes_received", p->bytes_in, "bytes_sent", p->bytes_out,
                                "server_assignment_count", p->assignments, "wait_count",
                                p->wait_count, "xact_time", p->xact_ns / 1e9, "query_time",
                                p->query_ns / 1e9, "wait_time", p->wait_ns / 1e9, "buckets",
                                buckets);
    p->xact_count = p->query_count = p->errors = p->bytes_in = p->bytes_out = 0;
    p->assignments = p->wait_count = 0;
    p->xact_ns = p->query_ns = p->wait_ns = 0;
    return r;
}

static PyObject *pool_oldest_wait(PoolObject *p, PyObject *unused) {
    if (!p->wait_head) return PyFloat_FromDouble(0.0);
    return PyFloat_FromDouble((now_ns() - p->wait_head->wait_started) / 1e9);
}

static PyObject *pool_get_phantoms(PoolObject *p, void *unused) {
    return PyLong_FromLong(p->n_phantoms);
}

static PyObject *pool_get_counts(PoolObject *p, void *unused) {
    return Py_BuildValue("(lll)", p->n_linked, p->n_waiting, p->n_idle);
}

static PyObject *pool_get_check_after(PoolObject *p, void *unused) {
    return PyFloat_FromDouble(p->check_after < 0 ? -1.0 : p->check_after / 1e9);
}

static int pool_set_check_after(PoolObject *p, PyObject *value, void *unused) {
    double v = value ? PyFloat_AsDouble(value) : -1.0;
    if (v == -1.0 && PyErr_Occurred()) return -1;
    p->check_after = v < 0 ? -1 : secs_to_ns(v);
    return 0;
}

static PyObject *pool_get_int(PoolObject *p, void *which) {
    int *field = (int *)((char *)p + (size_t)which);
    return PyLong_FromLong(*field);
}

static PyObject *pool_get_routed_primary(PoolObject *p, void *unused) {
    return PyLong_FromLongLong(p->routed_primary);
}

static int pool_set_int(PoolObject *p, PyObject *value, void *which) {
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value out of range");
        return -1;
    }
    *(int *)((char *)p + (size_t)which) = (int)v;
    return 0;
}

static PyMethodDef pool_methods[] = {
    {"take_idle", (PyCFunction)pool_take_idle, METH_NOARGS,
     "The most recently used idle server's protocol, taken out of the fast path, or None."},
    {"recall_idle", (PyCFunction)pool_recall_idle, METH_O,
     "[(server protocol, idle since)] for servers idle longer than the given seconds."},
    {"drop_waiters", (PyCFunction)pool_drop_waiters, METH_O,
     "Client protocols that waited longer than the given seconds, taken off the queue."},
    {"kick", (PyCFunction)pool_kick, METH_NOARGS, "Lend idle servers to waiting clients."},
    {"eject_waiter", (PyCFunction)pool_eject_waiter, METH_NOARGS,
     "Hand the first waiting client back to Python (True if there was one)."},
    {"take_stats", (PyCFunction)pool_take_stats, METH_NOARGS,
     "Counters since the last call (SHOW STATS names), then reset."},
    {"take_queries", (PyCFunction)pool_take_queries, METH_NOARGS,
     "Per-statement aggregates since the last call (query statistics), then reset."},
    {"set_shapes", (PyCFunction)pool_set_shapes, METH_O,
     "Tell the engine the shape id of statement keys: [(key, shape), ...] (N+1 at the wire)."},
    {"take_bursts", (PyCFunction)pool_take_bursts, METH_NOARGS,
     "N+1 events since the last call: [(shape, count, params id, final)], then empty."},
    {"oldest_wait", (PyCFunction)pool_oldest_wait, METH_NOARGS,
     "Seconds the first waiting client has waited."},
    {NULL}};

#define INT_FIELD(name, doc) \
    {#name, (getter)pool_get_int, (setter)pool_set_int, doc, (void *)offsetof(PoolObject, name)}

static PyGetSetDef pool_getset[] = {
    {"counts", (getter)pool_get_counts, NULL, "(linked clients, waiting clients, idle servers)",
     NULL},
    {"phantoms", (getter)pool_get_phantoms, NULL,
     "Clients of this pool the engine logged in alone (no Python object yet).", NULL},
    INT_FIELD(paused, "Lend nothing (PAUSE)."),
    {"check_after", (getter)pool_get_check_after, (setter)pool_set_check_after,
     "Seconds idle after which Python checks a server before it is lent (negative: never).",
     NULL},
    INT_FIELD(statement_mode, "Statement pooling: a transaction block goes to Python."),
    INT_FIELD(assist, "Call handler.starved() when a client has to wait."),
    INT_FIELD(py_waiters, "Clients waiting in Python: released servers go to Python first."),
    INT_FIELD(route_reads, "Read/write split: serve only transactions surely for the primary."),
    {"routed_primary", (getter)pool_get_routed_primary, NULL,
     "Transactions the engine sent to the primary under route_reads.", NULL},
    INT_FIELD(qs_on, "query_stats: time each statement (take_queries)."),
    INT_FIELD(burst_threshold, "Executions of one shape in a burst that make an N+1 (0: off)."),
    {"burst_window", (getter)pool_get_burst_window, (setter)pool_set_burst_window,
     "Seconds between two statements of one burst, at most.", NULL},
    {NULL}};

static PyObject *pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyErr_SetString(PyExc_TypeError, "use Engine.pool(handler, buckets)");
    return NULL;
}

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgpilot.proxy._fastpath.FastPool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One pool's idle servers and waiting clients on the fast path.",
    .tp_traverse = (traverseproc)pool_traverse,
    .tp_clear = (inquiry)pool_clear,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
    .tp_new = pool_new,
};
