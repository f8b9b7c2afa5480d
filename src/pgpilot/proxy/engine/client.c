/* The client side of the fast path: client_pump scans a client's complete messages
 * (client_scan), lends it a server (or queues it), renames its statements, forwards the
 * bytes and accounts them; a large Bind is streamed as it comes; reads in route_reads pools go
 * to Python (the read/write split). Anything it will not carry is handed back (handback.c). */

/* -- the fast path: clients -------------------------------------------------------------- */
static void client_pump(ConnObject *c);

/* -- read/write split ----------------------------------------------------------------------
 * In a pool whose database sends reads to replicas (route_reads, set by proxy/routing.py),
 * the engine links a client that has no server only when its transaction surely goes to the
 * primary: the first message is a Query or Parse whose text begins with INSERT, UPDATE,
 * DELETE or MERGE, or with BEGIN / START without "only" anywhere (a read-write transaction).
 * It marks the client (ROUTE_WROTE, and route_ended: Python's read-your-writes then waits
 * for a WAL position sampled after its end) and counts it. Anything else goes to Python, which decides
 * (routing.py). */
#define ROUTE_WROTE 1

static int word_at(const unsigned char *b, const unsigned char *e, const char *w) {
    size_t k = strlen(w);
    if ((size_t)(e - b) <= k) return 0;
    for (size_t i = 0; i < k; i++)
        if ((b[i] | 0x20) != (unsigned char)w[i]) return 0;
    unsigned char next = b[k];
    return !((next | 0x20) >= 'a' && (next | 0x20) <= 'z') && !(next >= '0' && next <= '9') &&
           next != '_' && next != '$';
}

static int surely_primary(const unsigned char *m, size_t avail) {
    if (avail < 5) return 0;
    uint32_t len = be32(m + 1);
    if (len < 5 || avail < (size_t)len + 1) return 0;
    const unsigned char *b = m + 5, *e = m + 1 + len;
    if (m[0] == 'P') { /* the statement's name, then its text */
        while (b < e && *b) b++;
        if (b >= e) return 0;
        b++;
    } else if (m[0] != 'Q') {
        return 0;
    }
    while (b < e && (*b == ' ' || *b == '\t' || *b == '\n' || *b == '\r')) b++;
    if (word_at(b, e, "insert") || word_at(b, e, "update") || word_at(b, e, "delete") ||
        word_at(b, e, "merge"))
        return 1;
    if (!word_at(b, e, "begin") && !word_at(b, e, "start")) return 0;
    for (; b + 4 <= e && *b; b++) /* BEGIN ... READ ONLY: Python's (a replica) */
        if (word_at(b, e, "only")) return 0;
    return 1;
}
static void server_free(ConnObject *s);

static ConnObject *take_idle(PoolObject *p, long long params_id, int *exact) {
    ConnObject *s = p->idle_head;
    for (ConnObject *x = s; x; x = x->next) {
        if (x->params_id == params_id) {
            *exact = 1;
            return x;
        }
    }
    *exact = 0;
    return s;
}

static void call_starved(PoolObject *p) {
    if (!p->assist) return;
    PyObject *r = py_method(p->handler, "starved", NULL);
    if (!r) report_error(p->engine);
    Py_XDECREF(r);
}

/* Bytes of complete client messages client_scan examined, in all (Python: scanned_bytes()). */
static unsigned long long scanned_total;

/* -- streaming ---------------------------------------------------------------------------
 * A Bind longer than STREAM_OVER (a large parameter: a bytea, a document) is not held whole:
 * once its portal and statement names are read (within the first STREAM_OVER bytes) and the
 * client has a server, the engine passes it on as it comes, the names renamed as for any
 * Bind; ``skip`` counts its body bytes still to come, which go out as they are read. So a
 * client costs its read buffer and its server's write buffer (HIGH_WATER, then the client
 * is not read), not the message. A client with no server yet holds at most
 * WAITING_READ_CAP of it. Query and Parse texts are still read whole (up to
 * MAX_FAST_MESSAGE, then Python): the hazard pre-filter must see the whole text before any
 * of it may reach a server.
 * While a message is streamed, the pair cannot be handed to Python (the server holds part
 * of a message; the client's next bytes are the rest of it): answers that ask for Python
 * wait for its end (F_EJECT_STREAMED; the server's answers from there are held, up to
 * MAX_HELD_ANSWERS), as does Python asking for the pair (Conn.eject: SHOW, /metrics,
 * timeouts), and what cannot wait (the client or the server lost, client_message_timeout,
 * Python writing to or closing the client) closes both instead (eject_client). */

/* The body bytes of the message at ``at`` that are in the first ``end`` bytes read. */
static size_t body_have(const unsigned char *base, size_t at, size_t end) {
    size_t n = (size_t)be32(base + at + 1) - 4;
    return end - at - 5 < n ? end - at - 5 : n;
}

/* Scan the client's complete messages. Returns the bytes that may be forwarded; *bad is set
 * when a message the fast path will not carry starts within the buffer. When they rename
 * statements, ``rn`` holds them as they go to the server. A large Bind not complete yet may
 * end the bytes returned (see "streaming"): *stream_at is then where it starts (else
 * SIZE_MAX), and the bytes returned go past it.
 *
 * The framing pass is pure C: no call that can run Python, so the buffer cannot move under
 * it. The names of named statements are looked up after it (Python's dicts), and the bytes
 * are read again from the buffer by offset after that. */
static size_t client_scan(ConnObject *c, size_t from, int unnamed_before, Renamed *rn, int *bad,
                          int *terminate, size_t *stream_at, size_t *unnamed_at) {
    const unsigned char *base = (const unsigned char *)c->rb.p + c->rb.start;
    size_t avail = buf_len(&c->rb), pos = from <= avail ? from : 0;
    size_t named_at[MAX_RENAMES];
    int n_named = 0;
    /* The unnamed statement: a Bind or Describe of it whose Parse came in an earlier chunk
     * goes to Python, which parses it again first if the server may lack it (the client may
     * have moved to another server since); a Parse of it that no Bind follows in the chunk
     * (a driver preparing it for later: asyncpg without its cache) goes to Python too, so
     * that Python knows what to parse again. A Parse followed by its Bind stays here. */
    int unnamed_parsed = unnamed_before; /* an unnamed Parse before ``from`` */
    size_t lone_parse_at = (size_t)-1, first_parse_at = (size_t)-1;
    *bad = 0;
    *terminate = 0;
    *stream_at = SIZE_MAX;
    *unnamed_at = SIZE_MAX;
    renamed_clear(rn);
    while (avail - pos >= 5) {
        unsigned char t = base[pos];
        uint32_t len = be32(base + pos + 1);
        if (len < 4 || !type_maybe_fast(t) ||
            len > (t == 'B' ? MAX_STREAMED_MESSAGE : MAX_FAST_MESSAGE)) {
            *bad = 1;
            *terminate = t == 'X';
            break;
        }
        if (avail - pos < (size_t)len + 1) {
            if (t != 'B' || len - 4 <= STREAM_OVER) break; /* read whole */
            size_t have = avail - pos - 5, name_len;
            int how = message_fast(t, base + pos + 5, have);
            if (how == FAST_NO || (how == FAST_NAMED && !named_statement(base + pos, have,
                                                                        &name_len))) {
                /* Its names are not all in yet: wait for them, within STREAM_OVER. */
                if (have >= STREAM_OVER) *bad = 1;
                break;
            }
            if (how == FAST_NAMED) {
                if (n_named == MAX_RENAMES) {
                    *bad = 1;
                    break;
                }
                named_at[n_named++] = pos;
            } else { /* a Bind of the unnamed statement: its Parse must be in this chunk */
                if (!unnamed_parsed) {
                    *bad = 1;
                    break;
                }
                lone_parse_at = (size_t)-1;
            }
            *stream_at = pos;
            pos = avail;
            break;
        }
        if (len > MAX_FAST_MESSAGE) { /* a whole Bind that came in one read: Python's */
            *bad = 1;
            break;
        }
        scanned_total += (size_t)len + 1;
        int how = message_fast(t, base + pos + 5, len - 4);
        if (how == FAST_NO || (how == FAST_NAMED && n_named == MAX_RENAMES)) {
            *bad = 1;
            break;
        }
        if (how == FAST_NAMED) named_at[n_named++] = pos;
        if (t == 'Q' && first_parse_at == (size_t)-1) first_parse_at = pos;
        if (how == FAST_YES && t == 'P') {
            unnamed_parsed = 1;
            if (*unnamed_at == SIZE_MAX) *unnamed_at = pos;
            if (first_parse_at == (size_t)-1) first_parse_at = pos;
            if (lone_parse_at == (size_t)-1) lone_parse_at = pos;
        } else if (how == FAST_YES && (t == 'B' || (t == 'D' && base[pos + 5] == 'S'))) {
            if (!unnamed_parsed) {
                *bad = 1;
                break;
            }
            if (t == 'B') lone_parse_at = (size_t)-1;
        }
        pos += (size_t)len + 1;
    }
    if (lone_parse_at != (size_t)-1 && lone_parse_at < pos) {
        /* With part of a message still to come (the Parse's Bind, perhaps, split by TCP or
         * large), wait for it rather than hand a Parse that may yet have its Bind to Python. */
        if (*bad || pos >= avail) {
            *bad = 1;
            *terminate = 0;
        }
        pos = lone_parse_at;
        while (n_named && named_at[n_named - 1] >= pos) n_named--;
    }
    if (first_parse_at < pos) c->flags |= F_UNNAMED_PARSED;
    if (!n_named) return pos;
    /* The names, in order: the first the client has not prepared (Python forwards it for
     * PostgreSQL to refuse) or this server lacks (Python prepares it there first) ends the
     * chunk there. */
    for (int i = 0; i < n_named; i++) {
        if ((c->flags & F_CLOSED) || buf_len(&c->rb) < pos) { /* (never: no Python ran) */
            renamed_clear(rn);
            *bad = *terminate = 0;
            return 0;
        }
        base = (const unsigned char *)c->rb.p + c->rb.start;
        size_t at = named_at[i], name_len;
        PyObject *client_name = NULL;
        const unsigned char *name = named_statement(base + at, body_have(base, at, pos), &name_len);
        PyObject *server_name = name ? statement_for(c, name, name_len, &client_name) : NULL;
        if (!server_name || (c->peer && !on_server(c->peer, server_name))) {
            Py_XDECREF(client_name);
            pos = at;
            *bad = 1;
            *terminate = 0;
            break;
        }
        rn->clients[rn->n_names] = client_name; /* owned from here */
        rn->names[rn->n_names++] = Py_NewRef(server_name);
    }
    if (!rn->n_names) return pos;
    /* The chunk as it goes out, pure C again. */
    base = (const unsigned char *)c->rb.p + c->rb.start;
    size_t done = 0;
    for (int k = 0; k < rn->n_names; k++) {
        size_t at = named_at[k], name_len, have = body_have(base, at, pos);
        uint32_t len = be32(base + at + 1);
        const unsigned char *name = named_statement(base + at, have, &name_len);
        if ((at > done && buf_append(&rn->out, (const char *)base + done, at - done) < 0) ||
            !name ||
            rename_into(&rn->out, base + at, len - 4, have, name, name_len, rn->names[k]) < 0) {
            PyErr_Clear();
            renamed_clear(rn);
            *bad = 1;
            *terminate = 0;
            return named_at[0];
        }
        done = at + 5 + have;
    }
    if (pos > done && buf_append(&rn->out, (const char *)base + done, pos - done) < 0) {
        PyErr_Clear();
        renamed_clear(rn);
        *bad = 1;
        *terminate = 0;
        return named_at[0];
    }
    return pos;
}

/* The first ``n`` bytes read from ``from`` are done with: ``data`` (``len`` bytes: they, or
 * what they became) goes to ``to``; if ``to`` broke, it is lost. */
static int pass_on_as(ConnObject *from, ConnObject *to, size_t n, const char *data, size_t len) {
    if (!to || (to->flags & F_CLOSED)) return -1; /* unlinked meanwhile: nothing is passed */
    int broke = conn_send(to, data, len) < 0;
    from->rb.start += n;
    if (broke) {
        Py_INCREF(to);
        conn_lost(to, NULL);
        Py_DECREF(to);
        return -1;
    }
    return 0;
}

/* Forward the first ``n`` bytes read from ``from`` to ``to`` as they are. */
static int pass_on(ConnObject *from, ConnObject *to, size_t n) {
    return pass_on_as(from, to, n, from->rb.p + from->rb.start, n);
}

static void client_account(ConnObject *c, size_t n, const Renamed *rn) {
    const unsigned char *base = (const unsigned char *)c->rb.p + c->rb.start;
    size_t pos = 0;
    int64_t now = 0;
    int names = 0;
    while (pos < n) {
        unsigned char t = base[pos];
        uint32_t len = be32(base + pos + 1);
        /* All of the body but for a streamed Bind's, of which the part read (its names). */
        size_t have = body_have(base, pos, n);
        if (t == 'Q' && c->owed_skip && !c->owed_lost) {
            /* Behind an error, before the Sync: PostgreSQL skips it, no ReadyForQuery. */
            pos += (size_t)len + 1;
            continue;
        }
        if (names < rn->n_names && (t == 'B' || t == 'D') &&
            message_fast(t, base + pos + 5, have) == FAST_NAMED) {
            if (c->qs && t == 'B')
                qs_sent(c, t, base + pos + 5, have, rn->names[names], rn->clients[names],
                        &now);
            owed_push(c, (char)(t | 0x20), rn->clients[names++]); /* 'b', 'd' */
        } else if (t != 'H') {
            if (c->qs) qs_sent(c, t, base + pos + 5, have, NULL, NULL, &now);
            owed_push(c, (char)t, NULL);
        }
        if (t == 'Q' || t == 'S') {
            if (!c->expected_rfq) {
                if (!now) now = now_ns();
                c->query_started = now;
                if (!c->xact_started) c->xact_started = now;
            }
            c->expected_rfq++;
            if (t == 'S') c->unsynced = 0;
        } else if (t != 'H') {
            c->unsynced = 1;
        }
        pos += (size_t)len + 1;
    }
    c->idle_in_txn_since = 0;
}

static void client_pump_with(ConnObject *c, Renamed *rn);

static void client_pump(ConnObject *c) {
    Renamed rn;
    rn.out.p = NULL;
    rn.out.start = rn.out.end = rn.out.cap = 0;
    rn.n_names = 0;
    client_pump_with(c, &rn);
    renamed_clear(&rn);
}

static void client_pump_with(ConnObject *c, Renamed *rn) {
again:
    if (c->mode != MODE_FAST || (c->flags & F_CLOSED)) return;
    PoolObject *p = c->pool;
    if (c->skip) {
        /* The rest of a Bind being streamed (see "streaming"): to the server as it comes. */
        size_t take = buf_len(&c->rb) < c->skip ? buf_len(&c->rb) : c->skip;
        if (!c->peer) { /* (never: a streaming client is unlinked only by closing) */
            fail_closed(c, NULL, "pooler error: a streamed message lost its server");
            return;
        }
        if (take) {
            p->bytes_in += (long long)take;
            c->skip -= take;
            if (pass_on(c, c->peer, take) < 0) return;
        }
        if (c->skip) {
            buf_shrink(&c->rb);
            return;
        }
        if (c->flags & F_EJECT_STREAMED) {
            /* Its server's answers wanted Python meanwhile: the pair goes to it now. */
            c->flags &= ~F_EJECT_STREAMED;
            eject_client(c, c->peer, EJECT_LINKED);
            return;
        }
    }
    if (c->flags & F_EJECT_WANTED) return; /* bytes wait for the server to be quiet */
    int bad, terminate;
    size_t stream_at, unnamed_at;
    /* Queued: what was scanned at an earlier read is not scanned again (a client sending a
     * byte at a time behind 64 KB of queued queries would cost a full rescan per byte). */
    int queued = c->at == AT_WAITING;
    size_t n = client_scan(c, queued ? c->scan_ok : 0, queued && c->scan_unnamed, rn, &bad,
                           &terminate, &stream_at, &unnamed_at);
    /* Ends within a large Bind: the bytes before it are the whole messages. */
    int streams = n > stream_at;
    size_t whole = streams ? stream_at : n;
    if (bad) {
        ConnObject *s = c->peer;
        if (!s && terminate && n == 0 && c->at == AT_NONE) {
            /* Terminate between transactions: the client is done; Python hears it as a close
             * (as it would treat a lone Terminate), without a hand-back first. */
            leave_fast(c);
            conn_lost(c, NULL);
            return;
        }
        if (!s) {
            eject_client(c, NULL, EJECT_UNLINKED);
            return;
        }
        if ((c->expected_rfq <= 0 && !c->unsynced) || c->unsynced || terminate) {
            /* Quiet, or unsynced (waiting could deadlock), or the client is leaving (Python
             * cancels what runs): Python takes over now. */
            eject_client(c, s, EJECT_LINKED);
            return;
        }
        /* Answers are still owed on this server: Python takes over once they are in. */
        c->flags |= F_EJECT_WANTED;
        update_events(c);
        return;
    }
    if (!n) return;
    if (!c->peer) {
        if (c->at == AT_WAITING) {
            c->scan_ok = rn->n_names ? 0 : whole;
            c->scan_unnamed = c->scan_ok && (c->scan_unnamed || unnamed_at < whole);
            return;
        }
        if (p->route_reads) {
            if (!surely_primary((const unsigned char *)c->rb.p + c->rb.start, n)) {
                eject_client(c, NULL, EJECT_UNLINKED);
                return;
            }
            c->route_flags |= ROUTE_WROTE;
            p->routed_primary++;
        }
        int exact = 0;
        ConnObject *s = p->paused ? NULL : take_idle(p, c->params_id, &exact);
        if (s && p->check_after >= 0 && now_ns() - s->idle_since > p->check_after) {
            /* Idle past server_check_delay: Python checks it (the client waits meanwhile).
             * Python ran: it may have served this client (or others, in ``renamed``), so
             * everything is read again. */
            Py_INCREF(s);
            queue_remove(s);
            return_server(s);
            Py_DECREF(s);
            renamed_clear(rn);
            goto again;
        }
        if (!s) {
            c->wait_started = now_ns();
            wait_push(p, c);
            c->scan_ok = rn->n_names ? 0 : whole;
            c->scan_unnamed = c->scan_ok && (c->scan_unnamed || unnamed_at < whole);
            update_events(c);
            call_starved(p);
            return;
        }
        Py_INCREF(s);
        queue_remove(s);
        if (!exact) {
            eject_client(c, s, EJECT_ATTACH);
            Py_DECREF(s);
            return;
        }
        if (!renamed_all_on(s, rn)) {
            /* The server lacks one of the client's statements: Python prepares it there. */
            eject_client(c, s, EJECT_LINKED);
            Py_DECREF(s);
            return;
        }
        c->wait_started = 0;
        link_pair(c, s);
        Py_DECREF(s);
    }
    client_account(c, n, rn);
    p->bytes_in += (long long)n;
    if (streams) {
        /* Set before the bytes go: if the server breaks now, the pair is closed, never
         * handed over with half a message on one side (eject_client). */
        const unsigned char *at = (const unsigned char *)c->rb.p + c->rb.start + stream_at;
        c->skip = (size_t)be32(at + 1) + 1 - (n - stream_at);
    }
    if (rn->n_names) {
        ConnObject *s = c->peer;
        Py_INCREF(s);
        int broke = pass_on_as(c, s, n, rn->out.p + rn->out.start, buf_len(&rn->out)) < 0;
        if (!broke) renamed_touch(s, rn); /* Python's OrderedDict: after the bytes are out */
        Py_DECREF(s);
        renamed_clear(rn);
        if (broke) return;
    } else if (pass_on(c, c->peer, n) < 0) {
        return;
    }
    buf_shrink(&c->rb);
}
