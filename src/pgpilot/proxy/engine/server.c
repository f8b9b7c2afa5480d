/* The server side of the fast path: server_pump reads a server's answers by their headers,
 * checks them as strictly as a client's messages (types, lengths, ReadyForQuery's status),
 * counts them and passes them to the linked client; at ReadyForQuery 'I' with nothing owed it
 * releases the server, which server_free lends to the next waiting client or puts idle. */

/* -- the fast path: servers -------------------------------------------------------------- */
/* PostgreSQL's own cap on a message (PQ_LARGE_MESSAGE_LIMIT is 1 GB - 1, MaxAllocSize). */
#define MAX_SERVER_MESSAGE 0x3fffffffu

/* A message type a server may send once logged in (protocol 3.0, PostgreSQL 16 and older):
 * anything else (an Authentication, a BackendKeyData, a NegotiateProtocolVersion, a byte no
 * version defines) is a protocol violation and closes the pair. */
static int server_type_ok(unsigned char t) {
    switch (t) {
    case '1': case '2': case '3': case 'A': case 'C': case 'c': case 'D': case 'd': case 'E':
    case 'G': case 'H': case 'I': case 'N': case 'n': case 's': case 'S': case 'T': case 't':
    case 'V': case 'W': case 'Z':
        return 1;
    }
    return 0;
}

static void server_pump(ConnObject *s) {
    ConnObject *c = s->peer;
    if (!c) {
        /* Bytes from a server nobody is using (a notice, an error before it closes). */
        return_server(s);
        return;
    }
    if (s->flags & F_ANSWERS_WAIT) {
        /* Its answers wait for Python, and Python for the client's streamed message to end.
         * The server is still read (it may be writing answers to requests before that
         * message, and read no more of it until they are out), up to a bound. */
        if (buf_len(&s->rb) > MAX_HELD_ANSWERS)
            fail_closed_code(c, s, "54000", "the server's answers held while the client "
                             "streamed a message exceeded 1 MiB");
        return;
    }
    PoolObject *p = s->pool;
    const unsigned char *base = (const unsigned char *)s->rb.p + s->rb.start;
    size_t avail = buf_len(&s->rb), pos = 0;
    int eject = 0, release = 0;
    /* Where this chunk's first whole message starts: statement mode may give Python the
     * chunk from there (as the Python path refuses a transaction before forwarding any of
     * the answer that opened it). */
    size_t first_boundary = s->skip < avail ? s->skip : avail;
    long long queries = 0, errors = 0;
    /* F_RESULT_PASSED as this chunk leaves it: 1 a result passed after its last 'Z', 0 a 'Z'
     * after its last result, -1 neither (or nothing of the chunk passes) */
    int result_passed = -1;
    int64_t now = 0; /* one clock reading per chunk read: its answers came at once */
    while (pos < avail) {
        if (s->skip) {
            size_t take = avail - pos < s->skip ? avail - pos : s->skip;
            pos += take;
            s->skip -= take;
            continue;
        }
        if (avail - pos < 5) break;
        unsigned char t = base[pos];
        uint32_t len = be32(base + pos + 1);
        if (len < 4 || len > MAX_SERVER_MESSAGE || !server_type_ok(t) ||
            (t == 'Z' && len != 5)) {
            fail_closed(c, s, "server sent an invalid message (protocol violation)");
            return;
        }
        if (t == 'S' || t == 'G' || t == 'H' || t == 'W') {
            eject = 1;
            break;
        }
        if (t == 'Z') {
            if (avail - pos < 6) break;
            char status = (char)base[pos + 5];
            if (status != 'I' && status != 'T' && status != 'E') {
                fail_closed(c, s, "server sent an invalid ReadyForQuery status");
                return;
            }
            owed_answer(c, t);
            if (p->statement_mode && status != 'I') {
                eject = 1;
                pos = first_boundary;
                s->skip = 0;
                queries = errors = 0;
                result_passed = -1;
                break;
            }
            pos += 6;
            result_passed = 0;
            queries++; /* a request answered, as PgBouncer counts queries (client.py) */
            if (!now) now = now_ns();
            if (c->qs) qs_answer(c, 'Z', NULL, 0, 1, now);
            if (c->expected_rfq > 0) c->expected_rfq--;
            c->txn = status;
            if (c->query_started) {
                p->query_ns += now - c->query_started;
                c->query_started = c->expected_rfq > 0 ? now : 0;
            }
            if (status == 'I') {
                if (c->route_flags & ROUTE_WROTE) c->route_ended = now;
                p->xact_count++;
                if (c->xact_started) {
                    p->xact_ns += now - c->xact_started;
                    c->xact_started = 0;
                }
            }
            if (c->expected_rfq <= 0) {
                if (status != 'I') {
                    c->idle_in_txn_since = now;
                } else if (!c->unsynced) {
                    release = 1;
                    break;
                }
                if (c->flags & F_EJECT_WANTED) break;
            }
            continue;
        }
        if (t == 'E' && len - 4 <= MAX_WHOLE_ERROR) {
            /* A FATAL: the server is about to close, and its client has PostgreSQL's own
             * reason. Python, told at the hand-back, adds no error of its own then (as a
             * direct connection: one error, then the close). */
            if (avail - pos < (size_t)len + 1) break;
            if (memmem(base + pos + 5, len - 4, "VFATAL", 7) ||
                memmem(base + pos + 5, len - 4, "VPANIC", 7))
                s->flags |= F_FATAL_SEEN;
        }
        if (t == 'C' && len >= 4 + 6) {
            /* DDL (a CommandComplete tag CREATE, ALTER or DROP ...): Python bumps the
             * catalog generation that names shared prepared statements (prepared.Catalog). */
            if (avail - pos < 5 + 6) break;
            if (is_ddl_tag(base + pos + 5)) {
                eject = 1;
                break;
            }
        }
        if (c->statements && (t == 'E' || (t == 'C' && (len == 4 + 15 || len == 4 + 12)))) {
            /* A CommandComplete is read whole (at most 19 bytes); an ErrorResponse is judged
             * by what is owed alone, never buffered whole (a server's error has no cap). */
            if (t == 'C' && avail - pos < (size_t)len + 1) break;
            if (router_must_see(c, t, base + pos + 5, len - 4)) {
                eject = 1;
                break;
            }
        }
        if (c->qs && (t == 'C' || t == 'E' || t == 'I' || t == 's')) {
            /* Rows of a CommandComplete, the SQLSTATE of an error, from what is at hand. */
            size_t have = avail - pos - 5 < (size_t)len - 4 ? avail - pos - 5 : (size_t)len - 4;
            if (!now) now = now_ns();
            qs_answer(c, t, base + pos + 5, have, have == (size_t)len - 4, now);
        }
        if (t == 'E') errors++;
        if (t == 'C' || t == 'E' || t == 'I') result_passed = 1;
        owed_answer(c, t);
        pos += 5;
        s->skip = (size_t)len - 4;
    }
    if (result_passed > 0) s->flags |= F_RESULT_PASSED;
    else if (result_passed == 0) s->flags &= ~F_RESULT_PASSED;
    p->query_count += queries;
    p->errors += errors;
    if (pos) {
        p->bytes_out += (long long)pos;
        if (pass_on(s, c, pos) < 0) return;
    }
    buf_shrink(&s->rb);
    if (eject && c->skip) {
        /* The client is streaming a message to this server (see "streaming"): the pair goes
         * to Python once it is through; this answer and the next wait. */
        c->flags |= F_EJECT_STREAMED;
        s->flags |= F_ANSWERS_WAIT;
        return;
    }
    if (eject) {
        eject_client(c, s, EJECT_LINKED);
        return;
    }
    if (c->flags & F_EJECT_WANTED) {
        if (c->expected_rfq <= 0) eject_client(c, s, EJECT_LINKED);
        return;
    }
    if (!release) return;
    if (buf_len(&c->rb) || c->skip) {
        /* The client has begun its next message: keep the server until it is complete. */
        return;
    }
    Py_INCREF(c);
    Py_INCREF(s);
    unlink_pair(c);
    c->txn = 'I';
    update_events(c);
    server_free(s);
    Py_DECREF(s);
    Py_DECREF(c);
}

/* A server just released in C: to the next waiting client, else idle. */
static void server_free(ConnObject *s) {
    PoolObject *p = s->pool;
    if (!p || s->mode != MODE_FAST) return;
    if ((s->flags & F_HOLD) || p->py_waiters > 0 || buf_len(&s->rb) ||
        (s->expires && now_ns() > s->expires)) {
        return_server(s);
        return;
    }
    while (p->wait_head && !p->paused) {
        ConnObject *c = p->wait_head;
        Py_INCREF(c);
        queue_remove(c);
        if (c->params_id != s->params_id) {
            eject_client(c, s, EJECT_ATTACH);
            Py_DECREF(c);
            return;
        }
        link_pair(c, s);
        update_events(c);
        client_pump(c);
        Py_DECREF(c);
        return;
    }
    s->idle_since = now_ns();
    idle_push(p, s);
    update_events(s);
}
