/* Which client has which server: a FastPool's wait queue (clients waiting for a server, FIFO)
 * and idle list (servers, most recently used first), and linking a client to a server and
 * unlinking them (the pool's wait statistics are counted at the link). The queues hold a
 * reference to each Conn in them; a linked pair holds one on each other. */

/* -- queues ------------------------------------------------------------------------------ */
static void queue_remove(ConnObject *c) {
    PoolObject *p = c->pool;
    if (!p || c->at == AT_NONE) return;
    if (c->at == AT_WAITING) {
        if (c->prev) c->prev->next = c->next; else p->wait_head = c->next;
        if (c->next) c->next->prev = c->prev; else p->wait_tail = c->prev;
        p->n_waiting--;
    } else {
        if (c->prev) c->prev->next = c->next; else p->idle_head = c->next;
        if (c->next) c->next->prev = c->prev;
        p->n_idle--;
    }
    c->prev = c->next = NULL;
    c->at = AT_NONE;
    c->scan_ok = 0;
    c->scan_unnamed = 0;
    Py_DECREF(c); /* the queue's reference */
}

static void wait_push(PoolObject *p, ConnObject *c) {
    Py_INCREF(c);
    c->at = AT_WAITING;
    c->next = NULL;
    c->prev = p->wait_tail;
    if (p->wait_tail) p->wait_tail->next = c; else p->wait_head = c;
    p->wait_tail = c;
    p->n_waiting++;
}

static void idle_push(PoolObject *p, ConnObject *s) {
    Py_INCREF(s);
    s->at = AT_IDLE;
    s->prev = NULL;
    s->next = p->idle_head;
    if (p->idle_head) p->idle_head->prev = s;
    p->idle_head = s;
    p->n_idle++;
}

/* -- linking ----------------------------------------------------------------------------- */
static void link_pair(ConnObject *c, ConnObject *s) {
    PoolObject *p = c->pool;
    Py_INCREF(s);
    Py_INCREF(c);
    c->peer = s;
    s->peer = c;
    s->idle_since = 0; /* in use: not idle until its next release */
    p->n_linked++;
    p->assignments++;
    /* Every hand-over counts as a wait, 0 when a server was free (as Pool.record_wait). */
    int64_t waited = c->wait_started ? now_ns() - c->wait_started : 0;
    p->wait_ns += waited;
    p->wait_count++;
    int b = 0;
    while (b < N_BUCKETS && waited > p->bounds[b]) b++;
    p->buckets[b]++;
    c->wait_started = 0;
    if (p->qs_on) qs_linked(c, waited);
}

static void unlink_pair(ConnObject *c) {
    ConnObject *s = c->peer;
    if (!s) return;
    c->peer = NULL;
    s->peer = NULL;
    if (c->qs) qs_unlinked(c);
    if (c->pool) c->pool->n_linked--;
    c->flags &= ~F_THROTTLED;
    s->flags &= ~F_THROTTLED;
    Py_DECREF(c);
    Py_DECREF(s);
}
