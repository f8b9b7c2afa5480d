/* Framing: what a message is, read from its bytes alone. The hazard pre-filter (may the fast
 * path carry this SQL text, or must Python see it), which client messages the fast path
 * carries (message_fast), the answers a server still owes for what was forwarded (one letter
 * per request, so that Python's statement router can take over mid-pipeline), and the
 * StartupMessage. Pure functions of bytes, but for the owed record's statement names. */

/* -- the fast path: pre-filter ----------------------------------------------------------- */
static int is_ident(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch >= 0x80;
}

/* ASCII lower case; other bytes as they are ("_" must stay "_"). */
static inline unsigned char fold(unsigned char ch) {
    return (ch >= 'A' && ch <= 'Z') ? (unsigned char)(ch | 0x20) : ch;
}

/* Does ``word`` (lower case) occur in ``s``, ignoring ASCII case? */
static int contains_ci(const unsigned char *s, size_t n, const char *word) {
    size_t w = strlen(word);
    if (w > n) return 0;
    unsigned char first = (unsigned char)word[0];
    for (size_t i = 0; i + w <= n; i++) {
        if (fold(s[i]) != first) continue;
        size_t k = 1;
        while (k < w && fold(s[i + k]) == (unsigned char)word[k]) k++;
        if (k == w) return 1;
    }
    return 0;
}

/* Does ``s`` (``n`` bytes) begin with ``word`` (lower case), in any case? */
static int starts_ci(const unsigned char *s, size_t n, const char *word) {
    size_t w = strlen(word);
    if (w > n) return 0;
    for (size_t k = 0; k < w; k++)
        if (fold(s[k]) != (unsigned char)word[k]) return 0;
    return 1;
}

/* Does one of the words that send a text to Python occur anywhere in it, in any case? One
 * pass over the text (it runs on every query the fast path carries): a position is looked at
 * further only if its letter and the next are the first two of one of the words. Those
 * letters (a, s, t, h, l, p, d) are common in SQL, so the test of the second letter comes
 * before any loop over the rest. */
static int hazard_word_at_any(const unsigned char *s, size_t n) {
    static const char *const words[] = {"advisory_lock", "set_config", "temp", "hold", "listen",
                                        "prepare", "discard", "deallocate", NULL};
    static unsigned char starting[256]; /* letter -> a bit for each word it starts */
    static size_t lengths[8];
    static int ready;
    if (!ready) {
        for (int w = 0; words[w]; w++) {
            lengths[w] = strlen(words[w]);
            starting[(unsigned char)words[w][0]] |= (unsigned char)(1u << w);
        }
        ready = 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        unsigned mask = starting[fold(s[i])];
        if (!mask) continue;
        unsigned char second = fold(s[i + 1]);
        for (; mask; mask &= mask - 1) {
            int w = __builtin_ctz(mask);
            const char *word = words[w];
            size_t len = lengths[w]; /* every word has 4 letters or more */
            if ((unsigned char)word[1] != second || len > n - i) continue;
            size_t k = 2;
            while (k < len && fold(s[i + k]) == (unsigned char)word[k]) k++;
            if (k == len) return 1;
        }
    }
    return 0;
}

/* PostgreSQL's whitespace (scan.l: space, tab, newline, carriage return, form feed, and
 * vertical tab since 16): what it skips before a statement, the filter skips too. */
static inline int sql_blank(unsigned char ch) {
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\f' || ch == '\v';
}

/* A Unicode-escaped identifier (U&"..."): its escapes may spell any word, so the parser reads
 * the text (hazards.classify). */
static int has_unicode_ident(const unsigned char *s, size_t n) {
    for (const unsigned char *p = s; n >= 3 && (p = memchr(p, '&', n - (size_t)(p - s) - 1));
         p++) {
        if (p > s && (p[-1] == 'u' || p[-1] == 'U') && p[1] == '"') return 1;
        if ((size_t)(p - s) + 2 >= n) break;
    }
    return 0;
}

/* The same test as hazards.might_be_hazard plus what the prepared-statement router must see
 * (DISCARD / DEALLOCATE), a little more cautious: a text that is not a single plain statement
 * goes to Python. 0 means the fast path may carry it. */
static int sql_needs_python(const unsigned char *s, size_t n) {
    if (hazard_word_at_any(s, n) || has_unicode_ident(s, n)) return 1;
    size_t i = 0;
    while (i < n && sql_blank(s[i])) i++;
    if (i + 1 < n && ((s[i] == '-' && s[i + 1] == '-') || (s[i] == '/' && s[i + 1] == '*')))
        return 1; /* a leading comment may hide a SET */
    if (i + 3 <= n && fold(s[i]) == 's' && fold(s[i + 1]) == 'e' && fold(s[i + 2]) == 't' &&
        (i + 3 == n || !is_ident(s[i + 3])))
        return 1;
    if (i + 5 <= n && contains_ci(s + i, 5, "reset")) return 1;
    /* EXECUTE of a statement the client prepared in the protocol: Python names it as the
     * server knows it (prepared.py, StatementRouter._executed). */
    if (starts_ci(s + i, n - i, "execute")) return 1;
    /* CREATE / ALTER / DROP DATABASE: Python first closes the pool's idle servers of the
     * database it names (client.py, _database_statement), which would keep it busy. */
    if ((starts_ci(s + i, n - i, "drop") || starts_ci(s + i, n - i, "alter") ||
         starts_ci(s + i, n - i, "create")) && contains_ci(s, n, "database"))
        return 1;
    /* More than one statement: Python reads them all. */
    size_t end = n;
    while (end > 0 && (sql_blank(s[end - 1]) || s[end - 1] == ';' || s[end - 1] == 0)) end--;
    if (memchr(s, ';', end)) return 1;
    return 0;
}

static int type_maybe_fast(unsigned char t) {
    return t == 'Q' || t == 'P' || t == 'B' || t == 'D' || t == 'C' || t == 'E' || t == 'S' ||
           t == 'H';
}

#define FAST_NO 0
#define FAST_YES 1
#define FAST_NAMED 2 /* a Bind or Describe of a named statement: see "named statements" */

/* A complete client message: may the fast path carry it? */
static int message_fast(unsigned char t, const unsigned char *body, size_t n) {
    switch (t) {
    case 'Q':
        return !sql_needs_python(body, n);
    case 'P': {
        if (n < 2 || body[0] != 0) return FAST_NO; /* named: Python may answer it itself */
        const unsigned char *sql = body + 1;
        const unsigned char *nul = memchr(sql, 0, n - 1);
        if (!nul) return FAST_NO;
        return !sql_needs_python(sql, (size_t)(nul - sql));
    }
    case 'B': {
        const unsigned char *nul = memchr(body, 0, n);
        if (!nul || (size_t)(nul - body) + 1 >= n) return FAST_NO;
        return nul[1] == 0 ? FAST_YES : FAST_NAMED;
    }
    case 'D':
        if (n < 2) return FAST_NO;
        if (body[0] == 'P') return FAST_YES;
        if (body[0] != 'S') return FAST_NO;
        return body[1] == 0 ? FAST_YES : FAST_NAMED;
    case 'C':
        /* Closing a named statement is answered by Python (the server's copy stays). */
        if (n < 2) return FAST_NO;
        if (body[0] == 'P') return FAST_YES;
        return body[0] == 'S' && body[1] == 0;
    case 'E':
    case 'S':
    case 'H':
        return FAST_YES;
    }
    return FAST_NO;
}

/* -- answers owed ------------------------------------------------------------------------- */
static void owed_pop(ConnObject *c) {
    if (c->owed_names) Py_CLEAR(c->owed_names[c->owed_start]);
    c->owed_start++;
}

static void owed_reset(ConnObject *c) {
    while (c->owed_start < c->owed_end) owed_pop(c);
    c->owed_start = c->owed_end = c->owed_lost = c->owed_skip = 0;
}

/* Note one more request the server will answer; ``name``: the client's name of the statement
 * of a Bind or Describe the engine renamed ('b', 'd'). */
static void owed_push(ConnObject *c, char kind, PyObject *name) {
    if (c->owed_skip && kind != 'S') return; /* the server will not answer it */
    if (kind == 'S') c->owed_skip = 0;
    if (c->owed_end == OWED_MAX) {
        if (c->owed_start) {
            int n = c->owed_end - c->owed_start;
            memmove(c->owed, c->owed + c->owed_start, (size_t)n);
            if (c->owed_names) {
                memmove(c->owed_names, c->owed_names + c->owed_start, n * sizeof(PyObject *));
                memset(c->owed_names + n, 0, (OWED_MAX - n) * sizeof(PyObject *));
            }
            c->owed_end = n;
            c->owed_start = 0;
        } else {
            c->owed_lost = 1;
            return;
        }
    }
    if (name) {
        if (!c->owed_names && !(c->owed_names = PyMem_Calloc(OWED_MAX, sizeof(PyObject *)))) {
            PyErr_Clear();
            c->owed_lost = 1;
            return;
        }
        c->owed_names[c->owed_end] = Py_NewRef(name);
    }
    c->owed[c->owed_end++] = kind;
}

static int owed_ends(char kind, unsigned char t) {
    switch (kind) {
    case 'Q':
    case 'S': return t == 'Z';
    case 'P': return t == '1';
    case 'B':
    case 'b': return t == '2';
    case 'D':
    case 'd': return t == 'T' || t == 'n';
    case 'E': return t == 'C' || t == 'I' || t == 's';
    case 'C': return t == '3';
    }
    return 0;
}

/* A server message: pop what it answers (as the router's own bookkeeping does). */
static void owed_answer(ConnObject *c, unsigned char t) {
    if (c->owed_start == c->owed_end) {
        c->owed_start = c->owed_end = 0;
        return;
    }
    if (t == 'D' || t == 'N' || t == 'A' || t == 'S') return;
    char head = c->owed[c->owed_start];
    if (t == 'E') {
        if (head == 'Q') return; /* a Query's error ends at its ReadyForQuery */
        /* The extended protocol skips to the next Sync: nothing before it is answered, not
         * even a simple Query, whose ReadyForQuery then never comes. */
        while (c->owed_start < c->owed_end && c->owed[c->owed_start] != 'S') {
            if (c->owed[c->owed_start] == 'Q' && c->expected_rfq > 0) c->expected_rfq--;
            owed_pop(c);
        }
        if (c->owed_start == c->owed_end) c->owed_skip = 1;
        return;
    }
    if (owed_ends(head, t)) owed_pop(c);
    if (c->owed_start == c->owed_end) c->owed_start = c->owed_end = 0;
}

/* What the server still owes, for Python's statement router: the letters (None: not known;
 * "!": an error came back before the client's Sync, and the server skips what comes until
 * it), and the client's statement names of the renamed ones ('b', 'd'), in order. */
static PyObject *owed_record(ConnObject *c) {
    if (c->owed_lost) return Py_BuildValue("(O())", Py_None);
    if (c->owed_skip) return Py_BuildValue("(y())", "!");
    int n = 0;
    for (int i = c->owed_start; i < c->owed_end; i++) n += c->owed[i] == 'b' || c->owed[i] == 'd';
    PyObject *names = PyTuple_New(n);
    if (!names) return NULL;
    for (int i = c->owed_start, k = 0; i < c->owed_end; i++) {
        if (c->owed[i] != 'b' && c->owed[i] != 'd') continue;
        PyObject *name = c->owed_names && c->owed_names[i] ? c->owed_names[i] : Py_None;
        PyTuple_SET_ITEM(names, k++, Py_NewRef(name));
    }
    return Py_BuildValue("(y#N)", c->owed + c->owed_start,
                         (Py_ssize_t)(c->owed_end - c->owed_start), names);
}

/* A StartupMessage (protocol 3.x) read whole and alone, as a dict of its parameters; NULL
 * (no exception) for anything else, which Python's StartupReader then reads and, if need be,
 * refuses with the right message. Same rules as framing.parse_startup_packet. */
static PyObject *startup_params(const unsigned char *p, size_t n) {
    if (n < 9 || be32(p) != n || n > MAX_STARTUP_LENGTH || (be32(p + 4) >> 16) != 3) return NULL;
    const char *body = (const char *)p + 8, *end = (const char *)p + n - 1;
    if (*end != 0) return NULL;
    PyObject *params = PyDict_New();
    if (!params) return NULL;
    while (body < end) {
        size_t klen = strlen(body);
        if (!klen || body + klen + 1 >= end + 1) goto bad;
        const char *value = body + klen + 1;
        if (value >= end) goto bad;
        size_t vlen = strlen(value);
        PyObject *k = PyUnicode_DecodeUTF8(body, (Py_ssize_t)klen, "strict");
        PyObject *v = k ? PyUnicode_DecodeUTF8(value, (Py_ssize_t)vlen, "strict") : NULL;
        int bad_item = !v || PyDict_SetItem(params, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad_item) goto bad;
        body = value + vlen + 1;
    }
    if (body != end) goto bad;
    PyObject *user = PyDict_GetItemString(params, "user"); /* the last one counts */
    if (!user || !PyUnicode_GET_LENGTH(user)) goto bad;
    return params;
bad:
    PyErr_Clear();
    Py_DECREF(params);
    return NULL;
}
