/* Accepting clients on the engine's listening sockets, and what a slow Conn reads: the first
 * packets of a new client (one SSLRequest and one GSSENCRequest answered, the StartupMessage
 * to a login route or to Python), then every byte to protocol.data_received(). */

/* A new client on a listening socket: its own Conn in SLOW mode, the protocol from
 * handler.new_client(), then protocol.connection_made(conn), as an asyncio server does.
 * ``handed_in``: a sibling worker accepted it and handed it over (see "balancing"). */
static void accept_one(ConnObject *l, int fd, const struct sockaddr_storage *peer,
                       int handed_in) {
    EngineObject *e = l->engine;
    int one = 1;
    if (peer->ss_family == AF_INET || peer->ss_family == AF_INET6) {
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (l->flags & F_KEEPALIVE) setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    }
    PyObject *proto = NULL;
    ConnObject *c = NULL;
    if (e->routes && PyDict_GET_SIZE(e->routes) && e->phantoms < e->phantom_cap) {
        /* A login route may serve it: no Python object until one is needed (claim()). */
        c = new_conn(e, fd, l->protocol, NULL, KIND_CLIENT);
        fd = -1;
        if (!c) goto fail;
        keep_address(c, peer);
        count_client(c, handed_in);
        c->flags |= F_STARTUP | F_PHANTOM;
        c->accepted = now_ns();
        c->ph_next = e->phantom_head;
        if (e->phantom_head) e->phantom_head->ph_prev = c;
        e->phantom_head = c;
        e->phantoms++;
        goto read_now;
    }
    proto = py_method(l->protocol, "new_client", NULL);
    if (!proto) goto fail;
    c = new_conn(e, fd, proto, NULL, KIND_CLIENT);
    fd = -1; /* new_conn owns it, even when it fails */
    if (!c) goto fail;
    keep_address(c, peer);
    count_client(c, handed_in);
    c->flags |= F_STARTUP;
    PyObject *r = py_method(proto, "connection_made", "O", (PyObject *)c);
    if (!r) {
        report_error(e);
        conn_lost(c, NULL);
    }
    Py_XDECREF(r);
read_now:
    /* With TCP_DEFER_ACCEPT on the listening socket (tcp_defer_accept, as PgBouncer) a
     * connection is accepted only once its first packet is in: read it now rather than wake
     * up once more for it. */
    if ((l->flags & F_READ_AT_ACCEPT) && wants_read(c)) on_readable(c);
    goto done;
fail:
    report_error(e);
    if (fd >= 0) close(fd);
    /* No Conn was made: the sender's count of it is undone here. */
    if (handed_in && e->counters) counter_add(e, e->me, SLOT_CLIENTS, -1);
done:
    Py_XDECREF(c);
    Py_XDECREF(proto);
}

static void listener_accept(ConnObject *l) {
    for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
        if (l->flags & (F_CLOSED | F_READ_PAUSED)) return;
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        memset(&peer, 0, sizeof peer);
        int fd = accept4(l->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK) return;
            if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
            /* Out of descriptors or memory: stop accepting; Python resumes in a moment (as
             * asyncio's accept_retry_delay), instead of epoll waking us in a tight loop. */
            l->flags |= F_READ_PAUSED;
            update_events(l);
            PyObject *r = py_method(l->protocol, "accept_failed", "i", err);
            if (!r) report_error(l->engine);
            Py_XDECREF(r);
            return;
        }
        /* Balancing (workers = N): before anything is read or made for it. */
        if (l->engine->counters && hand_off(l->engine, fd, &peer)) continue;
        Py_INCREF(l);
        accept_one(l, fd, &peer, 0);
        Py_DECREF(l);
    }
}

/* What a slow (Python's) connection read: ``n`` bytes at ``chunk``; ``owned``, if not NULL,
 * the bytes object they live in (a TLS connection's decrypted bytes). */
static void slow_received(ConnObject *c, const char *chunk, ssize_t n, PyObject *owned) {
    if (c->flags & F_STARTUP) {
        /* An engine listener serves no TLS (with client TLS configured the pooler keeps
         * asyncio's listeners), so an SSLRequest or GSSENCRequest gets 'N' here, as
         * Python would answer it. Only a packet read whole and alone: bytes behind it
         * (CVE-2021-23214) or a split read go to Python, which knows what to do. */
        if (n == 8 && be32((unsigned char *)chunk) == 8 &&
            (be32((unsigned char *)chunk + 4) == SSL_REQUEST_CODE ||
             be32((unsigned char *)chunk + 4) == GSSENC_REQUEST_CODE)) {
            /* One of each, as PostgreSQL (ProcessStartupPacket): a second is refused
             * in its words, never answered again and again. */
            unsigned asked = be32((unsigned char *)chunk + 4) == SSL_REQUEST_CODE
                                 ? F_SSL_ASKED : F_GSS_ASKED;
            if (c->flags & asked) {
                refuse_client(c, "08P01", asked == F_SSL_ASKED
                                  ? "protocol violation: a second SSLRequest"
                                  : "protocol violation: a second GSSENCRequest");
                return;
            }
            c->flags |= asked;
            /* Engine.client_tls set: 'S', and the handshake follows (tls.c). */
            if (asked == F_SSL_ASKED && !tls_active(c) && tls_accept_client(c)) return;
            if (conn_send(c, "N", 1) < 0) lost_errno(c, errno);
            return;
        }
        c->flags &= ~F_STARTUP;
        /* A route's key is a packet Python took whole and alone: the same bytes need no
         * second reading. */
        if ((c->flags & F_PHANTOM) && route_login(c, chunk, (size_t)n)) return;
        PyObject *params = startup_params((unsigned char *)chunk, (size_t)n);
        if ((c->flags & F_PHANTOM) && claim(c) < 0) {
            Py_XDECREF(params);
            return;
        }
        if (params) {
            PyObject *r = py_method(c->protocol, "startup_received", "iOy#",
                                    (int)be32((unsigned char *)chunk + 4), params, chunk,
                                    (Py_ssize_t)n);
            Py_DECREF(params);
            if (!r) {
                report_error(c->engine);
                conn_lost(c, NULL);
            }
            Py_XDECREF(r);
            return;
        }
    }
    if (claim(c) < 0) return;
    PyObject *data = owned ? Py_NewRef(owned) : PyBytes_FromStringAndSize(chunk, n);
    PyObject *r = data ? py_method(c->protocol, "data_received", "O", data) : NULL;
    if (!r) {
        report_error(c->engine);
        /* As asyncio: a protocol that raised is cut off. */
        conn_lost(c, NULL);
    }
    Py_XDECREF(r);
    Py_XDECREF(data);
}
