/* Named prepared statements in C: a Bind or Describe of a statement the client prepared goes
 * out under the server-side name Python's StatementRouter gave it, when the server has it.
 * Python's maps are read, never changed (but for marking a statement used). */

/* -- named statements ----------------------------------------------------------------------
 * Drivers that prepare statements by name (pgbench -M prepared, asyncpg, psycopg's
 * prepare_threshold, JDBC) get them renamed by Python's StatementRouter (prepared.py): one
 * shared server-side name per distinct statement, prepared on each server when first needed.
 * The engine carries the steady state itself: a Bind or Describe of a statement the client
 * has prepared (its router.statements knows the name) on a server that has it
 * (server.prepared) goes out under the server-side name, and the answers pass unchanged.
 * Whatever makes up or swallows answers, or changes the maps, stays with Python: a named
 * Parse (the server may have the statement: Python answers ParseComplete itself), a Close of
 * a statement (answered by Python), a Bind or Describe whose statement the server lacks
 * (Python slips a Parse in front and drops its ParseComplete), an error for a renamed
 * statement (Python names the statement as the client does, and puts its record right if a
 * table changed under it or the server lacks it), DEALLOCATE ALL / DISCARD ALL done. Python
 * changes neither map while the client or server is on the fast path: the engine only reads
 * them (and marks a statement used in server.prepared, so its least-recently-used order
 * stays true). When Python takes a client over, it learns the client's names of the
 * statements renamed and still owed an answer (owed 'b' / 'd'). */
#define MAX_RENAMES OWED_MAX

/* One client chunk as it goes to the server, when it renames statements. Built by
 * client_scan, used by client_pump in the same call: one per client_pump call, on its stack
 * (no process-wide scratch: Python run from a nested pump cannot touch another's). */
typedef struct {
    Buf out;
    PyObject *names[MAX_RENAMES];   /* owned: the server-side names used, in order */
    PyObject *clients[MAX_RENAMES]; /* owned: the client's names they stand for */
    int n_names;
} Renamed;

static void renamed_clear(Renamed *rn) {
    for (int i = 0; i < rn->n_names; i++) {
        Py_CLEAR(rn->names[i]);
        Py_CLEAR(rn->clients[i]);
    }
    rn->n_names = 0;
    if (rn->out.cap) buf_free(&rn->out);
}

/* The server-side name (borrowed; an ASCII str) of the client's statement ``name``, or NULL
 * if the client has not prepared it (or names it in bytes Python's parser would refuse); the
 * client's name as a str in ``*client_name`` (a new reference) when found. */
static PyObject *statement_for(ConnObject *c, const unsigned char *name, size_t n,
                               PyObject **client_name) {
    *client_name = NULL;
    if (!c->statements) return NULL;
    PyObject *key = PyUnicode_DecodeUTF8((const char *)name, (Py_ssize_t)n, NULL);
    PyObject *stmt = key ? PyDict_GetItemWithError(c->statements, key) : NULL;
    PyObject *server_name = stmt && PyTuple_Check(stmt) && PyTuple_GET_SIZE(stmt) >= 1
                                ? PyTuple_GET_ITEM(stmt, 0)
                                : NULL;
    if (!server_name || !PyUnicode_Check(server_name) ||
        !PyUnicode_IS_COMPACT_ASCII(server_name)) {
        PyErr_Clear();
        Py_XDECREF(key);
        return NULL;
    }
    *client_name = key;
    return server_name;
}

static int on_server(ConnObject *s, PyObject *server_name) {
    if (!s->prepared) return 0;
    int r = PyDict_Contains(s->prepared, server_name);
    if (r < 0) PyErr_Clear();
    return r > 0;
}

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8), p[3] = (unsigned char)v;
}

/* Append the message at ``msg`` (type, length, body of ``n`` bytes: a Bind or a Describe
 * of a named statement, whose name, of ``old_len`` bytes, is at ``name``: named_statement())
 * to ``out`` under ``server_name``. Only the first ``have`` bytes of the body are read yet
 * (``have`` < ``n``: a Bind being streamed, its names within them): the length field says
 * the whole renamed message, the rest follows unchanged as it comes. */
static int rename_into(Buf *out, const unsigned char *msg, size_t n, size_t have,
                       const unsigned char *name, size_t old_len, PyObject *server_name) {
    const unsigned char *body = msg + 5;
    size_t head = (size_t)(name - body); /* bytes before the statement name */
    const unsigned char *nul = name + old_len;
    size_t new_len = (size_t)PyUnicode_GET_LENGTH(server_name);
    size_t total = 5 + n - old_len + new_len;
    size_t written = total - (n - have);
    if (buf_reserve(out, written) < 0) {
        PyErr_Clear();
        return -1;
    }
    unsigned char *o = (unsigned char *)out->p + out->end;
    o[0] = msg[0];
    put_be32(o + 1, (uint32_t)(total - 1));
    memcpy(o + 5, body, head);
    memcpy(o + 5 + head, PyUnicode_1BYTE_DATA(server_name), new_len);
    memcpy(o + 5 + head + new_len, nul, have - head - old_len);
    out->end += written;
    return 0;
}

/* The statement a FAST_NAMED message names: its bytes and their length. */
static const unsigned char *named_statement(const unsigned char *msg, size_t n, size_t *len) {
    const unsigned char *body = msg + 5;
    const unsigned char *name = msg[0] == 'B' ? (const unsigned char *)memchr(body, 0, n) + 1
                                              : body + 1;
    const unsigned char *nul = memchr(name, 0, n - (size_t)(name - body));
    if (!nul) return NULL;
    *len = (size_t)(nul - name);
    return name;
}

/* Does a CommandComplete tag (at least 6 bytes, its NUL included) name a schema change? */
static int is_ddl_tag(const unsigned char *tag) {
    return !memcmp(tag, "CREATE", 6) || !memcmp(tag, "ALTER ", 6) || !memcmp(tag, "DROP ", 5);
}

/* A server message Python's statement router must see before the client does: an error for
 * a renamed statement (it names the statement as the client does, and if the router's record
 * is out of date, a table changed under the statement or the server lacks it, puts it
 * right), or a DEALLOCATE ALL / DISCARD ALL done. */
static int router_must_see(ConnObject *c, unsigned char t, const unsigned char *body, size_t n) {
    /* (``body`` is read only for a CommandComplete, which the caller has whole.) */
    if (t == 'C')
        return (n == 15 && !memcmp(body, "DEALLOCATE ALL", 15)) ||
               (n == 12 && !memcmp(body, "DISCARD ALL", 12));
    if (c->owed_start == c->owed_end) return 0;
    char head = c->owed[c->owed_start];
    return head == 'b' || head == 'd';
}

/* Does ``s`` have every statement ``rn`` uses? */
static int renamed_all_on(ConnObject *s, const Renamed *rn) {
    for (int i = 0; i < rn->n_names; i++)
        if (!on_server(s, rn->names[i])) return 0;
    return 1;
}

/* The statements ``rn`` used become the most recently used on ``s`` (Python's OrderedDict:
 * called only once the chunk is passed on, never while a buffer is being read). */
static void renamed_touch(ConnObject *s, const Renamed *rn) {
    static PyObject *move_to_end;
    if (!s->prepared || !rn->n_names) return;
    if (!move_to_end && !(move_to_end = PyUnicode_InternFromString("move_to_end"))) {
        PyErr_Clear();
        return;
    }
    for (int i = 0; i < rn->n_names; i++) {
        PyObject *r = PyObject_CallMethodOneArg(s->prepared, move_to_end, rn->names[i]);
        if (!r) PyErr_Clear();
        Py_XDECREF(r);
    }
}
