/* Query statistics (SHOW QUERIES) and N+1 at the wire, kept apart from the relaying: the
 * client and server pumps call a hook per message only while a pool's query_stats is on.
 * Statements are keyed by a hash of their text (literals as "?") or server-side name, timed
 * from request to answer into a per-pool table Python takes about once a second; bursts of
 * one query shape with changing parameters become events Python reports. */

/* -- query statistics ----------------------------------------------------------------------
 * Per-statement timing for stats.py (SHOW QUERIES), kept apart from the relaying above: the
 * hooks there are one call each (link_pair, unlink_pair, client_account, server_pump), made
 * only while the pool's ``query_stats`` is on. A linked client has a QsClient: the requests
 * it sent that still await their answer (a ring, oldest first: a Query, answered by its
 * ReadyForQuery; an Execute, by its CommandComplete, EmptyQueryResponse, PortalSuspended or
 * ErrorResponse; a Sync, by its ReadyForQuery, which also drops the Executes an error made the
 * server skip), each with its key and when it went out. The key is a 64-bit FNV-1a hash of the
 * statement's text (a Query, an unnamed Parse) or of its server-side name (a Bind of a named
 * statement the engine renamed). A statement's time runs from when it went out, or from the
 * answer before it if that came later (pipelined: its time on the server), to its answer;
 * it then goes into the pool's table
 * (QsEntry per key and params id: calls, errors by SQLSTATE, rows from the CommandComplete
 * tags, total and wait nanoseconds, log-linear buckets numbered as stats.bucket_of). Python
 * takes the table whole (FastPool.take_queries, about once a second) and it starts empty
 * again; an entry carries its text (copied when the key first appears in a batch), so Python
 * fingerprints each distinct text once and never sees the per-message flow. */
#if defined(__SSE2__)
#include <emmintrin.h> /* qs_next_start: 16 bytes of a text at a time */
#endif

/* The per-statement hooks are inlined where they are called (the pumps: one call each, often
 * of a constant message type that leaves one case): a call's own cost was a fifth of their
 * work on pgbench's prepared select. */
#define QS_INLINE static inline __attribute__((always_inline))

#define QS_SUB 8
#define QS_MAX_BUCKET (36 * QS_SUB)
#define QS_RING 32        /* statements in flight per client that are timed (a power of two) */
#define QS_SLOTS 512      /* per pool and batch (a power of two) */
#define QS_FULL 384       /* keys per batch; more go to the overflow entry ("other") */
#define QS_CODES 4        /* SQLSTATEs per entry and batch; more count as "other" */
#define QS_TEXT_MAX 8192  /* bytes of a text copied (the fingerprint of a longer one is of its
                           * beginning) */

typedef struct {
    uint64_t key;
    long long params_id;
    char *text; /* owned, or NULL (the overflow entry, a key whose text was not at hand) */
    size_t text_len;
    long long calls, rows;
    int64_t total_ns, wait_ns, max_ns;
    char codes[QS_CODES][6];
    long long code_counts[QS_CODES];
    long long other_errors;
    uint32_t buckets[QS_MAX_BUCKET + 1];
} QsEntry;

struct QsTable {
    QsEntry *slots[QS_SLOTS];
    QsEntry *overflow;
    int used;
};

typedef struct {
    uint64_t key;    /* 0: not timed */
    int64_t started;
    uint64_t params; /* a hash of its parameters (its literal values, for a Query) */
    QsEntry *entry;  /* its entry in the pool's table, found when it was sent: valid while the
                      * table is of generation ``gen`` (the answer then needs no look-up) */
    uint32_t gen;
    char kind;       /* 'Q', 'E' (Execute), 'S' (Sync) */
} QsSlot;

/* A statement's key and its entry in the pool's table of generation ``gen``. */
typedef struct {
    uint64_t key;
    QsEntry *entry;
    uint32_t gen;
} QsRef;

struct QsClient {
    QsSlot ring[QS_RING];
    unsigned head, count;
    int lost; /* more than QS_RING in flight: nothing more is timed until the ring drains */
    QsRef unnamed, bound;
    uint64_t bound_params;
    int64_t last_answer; /* when the last answer came: a pipelined statement starts there */
    int64_t wait_ns; /* waited for the server: for the next statement recorded */
    long long rows;  /* of the Query in front so far */
    char code[6];    /* the SQLSTATE of the Query in front, if it failed */
};

/* The keys of named statements, per pool. A statement the engine renamed is keyed by the hash
 * of its server-side name, a str Python keeps while the statement exists (the same object
 * for every client and Bind of it); a Bind finds its key and its entry in this batch's table
 * here by that str's address (the cache holds a reference, so an address names one str), not
 * by hashing the name and looking the entry up, a dict look-up for its text included, per
 * Bind. */
#define QS_NAMES 64 /* a power of two */
typedef struct {
    PyObject *name; /* owned; NULL: empty */
    long long params_id;
    QsRef ref;
} QsNamed;

struct QsNames {
    QsNamed slots[QS_NAMES];
};

/* Hashing is per statement on the hot path (every Query's text twice, every Bind's
 * parameters), so it goes eight bytes at a time: a word is mixed by one multiply and a shift
 * (FNV-1a byte by byte took ~5 instructions a byte, a fifth of the engine's work on a
 * simple-protocol TPC-B). Keys never leave the process: Python asks the engine for a text's
 * (text_key), so only equal inputs must give equal keys. */
#define QS_K 0x9e3779b97f4a7c15ULL

static inline uint64_t qs_mix(uint64_t h, uint64_t w) {
    h = (h ^ w) * QS_K;
    return h ^ (h >> 32);
}

/* The ``left`` (< 8) bytes at ``s`` as a word, zeros after them, as memcpy(&w, s, left) on a
 * little-endian machine would make it, without a call of memcpy (a tenth of the statistics'
 * work per Bind was that call): when ``back`` (8 or more bytes readable before ``s + left``),
 * the word that ends with them, shifted; otherwise in pieces of 4, 2 and 1. */
static inline uint64_t qs_tail(const unsigned char *s, size_t left, int back) {
    uint64_t w = 0;
    if (!left) return 0;
    if (back) {
        memcpy(&w, s + left - 8, 8);
        return w >> (8 * (8 - left));
    }
    size_t k = 0;
    if (left & 4) {
        uint32_t v;
        memcpy(&v, s, 4);
        w = v;
        k = 4;
    }
    if (left & 2) {
        uint16_t v;
        memcpy(&v, s + k, 2);
        w |= (uint64_t)v << (8 * k);
        k += 2;
    }
    if (left & 1) w |= (uint64_t)s[k] << (8 * k);
    return w;
}

/* ``h`` followed by the ``n`` bytes at ``s`` (a run: its length is mixed in, so runs that
 * meet at another place hash apart). */
QS_INLINE uint64_t qs_run(uint64_t h, const unsigned char *s, size_t n) {
    size_t left = n;
    while (left >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = qs_mix(h, w);
        s += 8;
        left -= 8;
    }
    return qs_mix(h, qs_tail(s, left, n >= 8) ^ ((uint64_t)n << 56));
}

static uint64_t qs_hash(const unsigned char *s, size_t n) {
    uint64_t h = qs_run(0xcbf29ce484222325ULL, s, n);
    return h ? h : 1;
}

/* What bytes are to qs_text_key: of a name (a digit after one is part of it, not a literal),
 * the start of something not taken as it is (a digit, a quote, a double quote, a slash), of
 * a number after its first digit (digits and '.'). */
static unsigned char qs_ident[256], qs_starts[256], qs_number[256];

static void qs_classes_init(void) {
    for (int ch = 0; ch < 256; ch++) {
        int digit = ch >= '0' && ch <= '9';
        qs_ident[ch] = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' ||
                       ch == '$' || ch >= 0x80 || digit;
        qs_starts[ch] = digit || ch == '\'' || ch == '"' || ch == '/';
        qs_number[ch] = digit || ch == '.';
    }
}

static inline int qs_hexish(unsigned char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F') ||
           ch == '-';
}

/* Whether a word has a byte b with m < b < n (bytes of 0x80 and more never count; m and n
 * at most 128): "Determine if a word has a byte between m and n", Bit Twiddling Hacks. */
#define QS_ONES 0x0101010101010101ULL
#define QS_HAS_BETWEEN(x, m, n)                                                              \
    (((QS_ONES * (127 + (n)) - ((x) & QS_ONES * 127)) & ~(x) &                               \
      (((x) & QS_ONES * 127) + QS_ONES * (127 - (m)))) & QS_ONES * 128)

#define QS_LITERAL 0x3f3f3f3f3f3f3f3fULL /* what a literal value counts as ("?") */

/* The bytes of a word from '"' to '9' (the top bit of each, exact per byte): the quotes, the
 * slash and the digits among them, which may start something qs_text_key does not take as it
 * is, with some punctuation (# $ % & ( ) * + , - .), which qs_starts tells apart. */
static inline uint64_t qs_maybe_special(uint64_t w) {
    return QS_HAS_BETWEEN(w, 0x21, 0x3a);
}

/* Where the next byte from ``i`` on that qs_starts is (a digit, a quote, a double quote, a
 * slash), or ``n``. Sixteen bytes at a time with SSE2 (any x86-64), the last sixteen of the
 * text read again for its end; eight at a time otherwise (qs_maybe_special, then the table for
 * the candidates). */
static inline size_t qs_next_start(const unsigned char *s, size_t i, size_t n) {
#if defined(__SSE2__)
    if (n >= 16) {
        const __m128i zero = _mm_set1_epi8('0'), nine = _mm_set1_epi8(9),
                      quote = _mm_set1_epi8('\''), dquote = _mm_set1_epi8('"'),
                      slash = _mm_set1_epi8('/');
        for (;;) {
            size_t at = i + 16 <= n ? i : n - 16; /* the end: its last 16 bytes again */
            __m128i x = _mm_loadu_si128((const __m128i *)(s + at));
            __m128i d = _mm_sub_epi8(x, zero);
            __m128i hit = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(d, nine), d), _mm_cmpeq_epi8(x, quote)),
                _mm_or_si128(_mm_cmpeq_epi8(x, dquote), _mm_cmpeq_epi8(x, slash)));
            unsigned m = (unsigned)_mm_movemask_epi8(hit) >> (i - at); /* from i on */
            if (m) return i + (size_t)__builtin_ctz(m);
            if (i + 16 >= n) return n;
            i += 16;
        }
    }
#endif
    while (i < n) {
        uint64_t w; /* zeros past the end: none of them */
        if (n - i >= 8) memcpy(&w, s + i, 8);
        else w = qs_tail(s + i, n - i, n >= 8);
        for (uint64_t m = qs_maybe_special(w); m; m &= m - 1) {
            size_t at = i + ((size_t)__builtin_ctzll(m) >> 3);
            if (qs_starts[s[at]]) return at;
        }
        i += 8;
    }
    return n;
}

/* Where the digits and '.' from ``i`` on end (a number's first part), or ``n``: sixteen bytes
 * at a time with SSE2 as qs_next_start, otherwise byte by byte. */
static inline size_t qs_number_end(const unsigned char *s, size_t i, size_t n) {
#if defined(__SSE2__)
    if (n >= 16) {
        const __m128i zero = _mm_set1_epi8('0'), nine = _mm_set1_epi8(9),
                      dot = _mm_set1_epi8('.');
        for (;;) {
            size_t at = i + 16 <= n ? i : n - 16;
            __m128i x = _mm_loadu_si128((const __m128i *)(s + at));
            __m128i d = _mm_sub_epi8(x, zero);
            __m128i part = _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(d, nine), d),
                                        _mm_cmpeq_epi8(x, dot));
            unsigned m = (~(unsigned)_mm_movemask_epi8(part) & 0xffffu) >> (i - at);
            if (m) return i + (size_t)__builtin_ctz(m);
            if (i + 16 >= n) return n;
            i += 16;
        }
    }
#endif
    while (i < n && qs_number[s[i]]) i++;
    return i;
}

/* The key of a statement text, the same for texts that differ only in their literal values
 * (a client that inlines them, psycopg2, Django ...): a string literal or a number outside an
 * identifier counts as "?", as does a run of 8 or more hex digits in a comment (a trace id in
 * a sqlcommenter comment); the rest (identifiers, $n, comments, quoted names) as it is. The
 * text is hashed in runs between those (qs_run), each literal as one marker, in one pass that
 * goes from one byte that may start a literal to the next (qs_next_start).
 * ``*params``: a hash of the literal values alone (each a run, in order): of two texts with
 * the same key, the same exactly when the texts are (the parameters, for N+1 counting). A
 * text whose string literal does not end is keyed as it is (and so are its parameters).
 * Python groups the keys by fingerprint. */
static uint64_t qs_text_key(const unsigned char *s, size_t n, uint64_t *params) {
    uint64_t h = 0xcbf29ce484222325ULL, ph = QS_K;
    size_t i = 0, run = 0; /* the bytes from ``run`` to ``i`` go as they are */
    for (;;) {
        i = qs_next_start(s, i, n);
        if (i >= n) break;
        unsigned char ch = s[i];
        if (ch == '/') {
            if (i + 1 >= n || s[i + 1] != '*') {
                i++;
                continue;
            }
            /* A comment: hex runs of 8 or more are markers, the rest as it is. */
            h = qs_run(h, s + run, i - run);
            const unsigned char *end = memmem(s + i + 2, n - i - 2, "*/", 2);
            size_t stop = end ? (size_t)(end - s) + 2 : n;
            size_t piece = i;
            while (i < stop) {
                size_t hex = 0;
                while (i + hex < stop && qs_hexish(s[i + hex])) hex++;
                if (hex >= 8) {
                    h = qs_mix(qs_run(h, s + piece, i - piece), QS_LITERAL);
                    ph = qs_run(ph, s + i, hex);
                    i += hex;
                    piece = i;
                } else {
                    i += hex ? hex : 1;
                }
            }
            h = qs_run(h, s + piece, i - piece);
            run = i;
            continue;
        }
        if (ch == '"') { /* a quoted name, as it is */
            const unsigned char *close = memchr(s + i + 1, '"', n - i - 1);
            i = close ? (size_t)(close - s) + 1 : n;
            continue;
        }
        if (ch != '\'' && i && qs_ident[s[i - 1]]) {
            i++; /* a digit that ends a name (t1), part of it; a literal ends before a name */
            continue;
        }
        h = qs_run(h, s + run, i - run);
        size_t start = i;
        if (ch == '\'') {
            size_t j = i + 1;
            for (;;) {
                const unsigned char *q = memchr(s + j, '\'', n - j);
                j = q ? (size_t)(q - s) : n;
                if (j + 1 < n && s[j + 1] == '\'') {
                    j += 2;
                    continue;
                }
                break;
            }
            if (j >= n) { /* no end: the text as it is */
                *params = qs_hash(s, n);
                return *params;
            }
            i = j + 1;
        } else { /* a number */
            i = qs_number_end(s, i, n);
            if (i + 1 < n && (s[i] == 'e' || s[i] == 'E') &&
                ((s[i + 1] >= '0' && s[i + 1] <= '9') || s[i + 1] == '-' || s[i + 1] == '+')) {
                i += 2;
                while (i < n && s[i] >= '0' && s[i] <= '9') i++;
            }
        }
        ph = qs_run(ph, s + start, i - start);
        h = qs_mix(h, QS_LITERAL);
        run = i;
    }
    h = qs_run(h, s + run, n - run);
    *params = ph;
    return h ? h : 1;
}

/* The bucket of a duration, as stats.bucket_of: 0 under a microsecond, then QS_SUB per power
 * of two of microseconds: with 2^k <= us < 2^(k+1), k * QS_SUB + 1 plus the eighth of that
 * power the duration is in, in integers (no float division, no frexp). */
static inline int qs_bucket(int64_t ns) {
    if (ns < 1000) return 0;
    if (ns >= (int64_t)(1000LL << 36)) return QS_MAX_BUCKET;
    int k = 63 - __builtin_clzll((uint64_t)ns / 1000); /* 2^k <= floor(us) <= us */
    /* floor(8 ns / (1000 * 2^k)), as floor(floor(8 ns / 2^k) / 1000): a constant divisor */
    int sub = (int)((((uint64_t)ns * QS_SUB) >> k) / 1000) - QS_SUB;
    int index = k * QS_SUB + sub + 1;
    return index > QS_MAX_BUCKET ? QS_MAX_BUCKET : index;
}

static void qs_table_clear(QsTable *t) {
    for (int i = 0; i < QS_SLOTS; i++) {
        if (t->slots[i]) {
            free(t->slots[i]->text);
            free(t->slots[i]);
            t->slots[i] = NULL;
        }
    }
    if (t->overflow) {
        free(t->overflow);
        t->overflow = NULL;
    }
    t->used = 0;
}

/* The pool's table is taken (or goes): entries found before (QsRef, QsSlot) are no more. */
static void qs_table_taken(PoolObject *p) {
    if (p->qs) qs_table_clear(p->qs);
    p->qs_gen++;
}

/* The pool goes: its table and the names it holds. */
static void qs_pool_free(PoolObject *p) {
    qs_table_taken(p);
    free(p->qs);
    p->qs = NULL;
    if (p->qs_names) {
        for (int i = 0; i < QS_NAMES; i++) Py_XDECREF(p->qs_names->slots[i].name);
        free(p->qs_names);
        p->qs_names = NULL;
    }
}

/* The entry of (key, params id) in ``p``'s table, made if need be (with ``text`` when given);
 * the overflow entry when the table is full; NULL when out of memory. */
static QsEntry *qs_entry(PoolObject *p, uint64_t key, long long params_id,
                         const unsigned char *text, size_t text_len) {
    if (!p->qs) {
        p->qs = calloc(1, sizeof(QsTable));
        if (!p->qs) return NULL;
    }
    QsTable *t = p->qs;
    uint64_t h = key ^ ((uint64_t)params_id * 0x9e3779b97f4a7c15ULL);
    size_t i = (size_t)(h ^ (h >> 29)) & (QS_SLOTS - 1);
    while (t->slots[i]) {
        QsEntry *e = t->slots[i];
        if (e->key == key && e->params_id == params_id) {
            if (!e->text && text) {
                size_t n = text_len < QS_TEXT_MAX ? text_len : QS_TEXT_MAX;
                e->text = malloc(n ? n : 1);
                if (e->text) {
                    memcpy(e->text, text, n);
                    e->text_len = n;
                }
            }
            return e;
        }
        i = (i + 1) & (QS_SLOTS - 1);
    }
    if (t->used >= QS_FULL) {
        if (!t->overflow) t->overflow = calloc(1, sizeof(QsEntry));
        return t->overflow;
    }
    QsEntry *e = calloc(1, sizeof(QsEntry));
    if (!e) return NULL;
    e->key = key;
    e->params_id = params_id;
    if (text) {
        size_t n = text_len < QS_TEXT_MAX ? text_len : QS_TEXT_MAX;
        e->text = malloc(n ? n : 1);
        if (e->text) {
            memcpy(e->text, text, n);
            e->text_len = n;
        }
    }
    t->slots[i] = e;
    t->used++;
    return e;
}

/* Rings of clients no longer linked, kept for the next links (no allocation per
 * transaction); a linked client holds one, an idle one none. */
#define QS_SPARE_MAX 256
static QsClient *qs_spare[QS_SPARE_MAX];
static int qs_n_spare;

/* A client is linked (link_pair): it gets a ring, and the wait it just had. */
static void qs_linked(ConnObject *c, int64_t waited) {
    QsClient *q = c->qs;
    if (!q) {
        q = qs_n_spare ? qs_spare[--qs_n_spare] : malloc(sizeof(QsClient));
        if (!q) return;
        q->head = q->count = q->lost = 0;
        q->unnamed.key = q->bound.key = 0;
        q->unnamed.entry = q->bound.entry = NULL;
        q->bound_params = 0;
        q->last_answer = q->wait_ns = 0;
        q->rows = 0;
        q->code[0] = 0;
        c->qs = q;
    }
    q->wait_ns += waited;
}

/* Unlinked (released, handed back): what is still in flight is no longer the engine's. */
static void qs_unlinked(ConnObject *c) {
    if (qs_n_spare < QS_SPARE_MAX) qs_spare[qs_n_spare++] = c->qs;
    else free(c->qs);
    c->qs = NULL;
}

QS_INLINE void qs_push(QsClient *q, QsRef ref, int64_t started, char kind, uint64_t params) {
    if (q->lost || q->count == QS_RING) {
        q->lost = 1; /* answers can no longer be matched: time nothing until quiet */
        return;
    }
    QsSlot *slot = &q->ring[(q->head + q->count) & (QS_RING - 1)];
    slot->key = ref.key;
    slot->entry = ref.entry;
    slot->gen = ref.gen;
    slot->started = started;
    slot->kind = kind;
    slot->params = params;
    q->count++;
}

/* The text of a named statement, from its ClientStatement (server_parse: 'P', length, the
 * server-side name, NUL, the text, NUL ...); NULL when not at hand. */
static const unsigned char *qs_named_text(ConnObject *c, PyObject *client_name, size_t *n) {
    if (!c->statements || !client_name || !PyDict_Check(c->statements)) return NULL;
    PyObject *stmt = PyDict_GetItemWithError(c->statements, client_name);
    if (!stmt) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyTuple_Check(stmt) || PyTuple_GET_SIZE(stmt) < 2) return NULL;
    PyObject *parse = PyTuple_GET_ITEM(stmt, 1);
    if (!PyBytes_Check(parse)) return NULL;
    const unsigned char *m = (const unsigned char *)PyBytes_AS_STRING(parse);
    size_t len = (size_t)PyBytes_GET_SIZE(parse);
    if (len < 6) return NULL;
    const unsigned char *name_end = memchr(m + 5, 0, len - 5);
    if (!name_end) return NULL;
    const unsigned char *sql = name_end + 1;
    const unsigned char *sql_end = memchr(sql, 0, len - (size_t)(sql - m));
    if (!sql_end) return NULL;
    *n = (size_t)(sql_end - sql);
    return sql;
}

/* The key and entry of a Bind of the named statement the engine renamed ``server_name``
 * (``client_name``: the client's name of it): from the pool's QsNames, or made there. The
 * entry takes the statement's text (a dict look-up) once per batch, when it has none yet. */
static QsRef qs_named_found(ConnObject *c, PoolObject *p, PyObject *server_name,
                            PyObject *client_name);

QS_INLINE QsRef qs_named(ConnObject *c, PoolObject *p, PyObject *server_name,
                         PyObject *client_name) {
    if (p->qs_names) {
        const QsNamed *slot =
            &p->qs_names->slots[((uintptr_t)server_name >> 4) & (QS_NAMES - 1)];
        if (slot->name == server_name && slot->params_id == c->params_id && slot->ref.entry &&
            slot->ref.gen == p->qs_gen)
            return slot->ref;
    }
    return qs_named_found(c, p, server_name, client_name);
}

/* (qs_named's way when its slot does not have the statement in this batch) */
static QsRef qs_named_found(ConnObject *c, PoolObject *p, PyObject *server_name,
                            PyObject *client_name) {
    QsRef none = {0, NULL, 0};
    if (!p->qs_names && !(p->qs_names = calloc(1, sizeof(QsNames)))) return none;
    QsNamed *slot = &p->qs_names->slots[((uintptr_t)server_name >> 4) & (QS_NAMES - 1)];
    if (slot->name != server_name) {
        Py_ssize_t len;
        const char *name = PyUnicode_Check(server_name)
                               ? PyUnicode_AsUTF8AndSize(server_name, &len) : NULL;
        if (!name) {
            PyErr_Clear();
            return none;
        }
        Py_INCREF(server_name);
        Py_XSETREF(slot->name, server_name); /* (a str: its dealloc runs no Python) */
        slot->ref.key = qs_hash((const unsigned char *)name, (size_t)len);
    }
    slot->params_id = c->params_id;
    QsEntry *e = qs_entry(p, slot->ref.key, c->params_id, NULL, 0);
    if (e && !e->text && e != p->qs->overflow) {
        size_t text_len = 0;
        const unsigned char *text = qs_named_text(c, client_name, &text_len);
        if (text) qs_entry(p, slot->ref.key, c->params_id, text, text_len);
    }
    slot->ref.entry = e;
    slot->ref.gen = p->qs_gen;
    return slot->ref;
}

/* A Query or an unnamed Parse sent (qs_sent): its text keyed. */
static void qs_sent_text(ConnObject *c, QsClient *q, PoolObject *p, unsigned char t,
                         const unsigned char *body, size_t n, int64_t *now) {
    switch (t) {
    case 'Q': {
        size_t len = n && body[n - 1] == 0 ? n - 1 : n;
        uint64_t params;
        QsRef ref;
        ref.key = qs_text_key(body, len, &params);
        ref.entry = qs_entry(p, ref.key, c->params_id, body, len);
        ref.gen = p->qs_gen;
        if (!ref.entry) return;
        if (!*now) *now = now_ns();
        qs_push(q, ref, *now, 'Q', params);
        return;
    }
    case 'P': { /* unnamed (the engine carries no named Parse) */
        if (n < 2) return;
        const unsigned char *sql = body + 1;
        const unsigned char *end = memchr(sql, 0, n - 1);
        if (!end) return;
        uint64_t params;
        q->unnamed.key = qs_text_key(sql, (size_t)(end - sql), &params);
        q->unnamed.entry = qs_entry(p, q->unnamed.key, c->params_id, sql, (size_t)(end - sql));
        q->unnamed.gen = p->qs_gen;
        return;
    }
    }
}

/* One client message the engine forwards (client_account): Query, Parse, Bind, Execute and
 * Sync move the statement being timed. ``server_name`` / ``client_name``: a Bind the engine
 * renamed (named statements). Inline: a Bind, Execute or Sync is a few stores. */
QS_INLINE void qs_sent(ConnObject *c, unsigned char t, const unsigned char *body, size_t n,
                       PyObject *server_name, PyObject *client_name, int64_t *now) {
    QsClient *q = c->qs;
    PoolObject *p = c->pool;
    if (!q || !p) return;
    switch (t) {
    case 'Q':
    case 'P':
        qs_sent_text(c, q, p, t, body, n, now);
        return;
    case 'B':
        /* The parameters, for N+1 counting (off: not hashed). */
        q->bound_params = p->burst_threshold > 0 ? qs_hash(body, n) : 0;
        q->bound = server_name ? qs_named(c, p, server_name, client_name) : q->unnamed;
        return;
    case 'E':
        if (!*now) *now = now_ns();
        qs_push(q, q->bound, *now, 'E', q->bound_params);
        return;
    case 'S': {
        QsRef none = {0, NULL, 0};
        qs_push(q, none, 0, 'S', 0);
        return;
    }
    }
}

/* The row count a CommandComplete tag ends with (``SELECT 5``, ``INSERT 0 3``), or 0. */
QS_INLINE long long qs_rows(const unsigned char *tag, size_t n) {
    const unsigned char *end = n && !tag[n - 1] ? tag + n - 1 : memchr(tag, 0, n);
    size_t len = end ? (size_t)(end - tag) : n;
    size_t i = len;
    long long rows = 0, unit = 1; /* read from the last digit back (one pass) */
    while (i > 0 && (unsigned)(tag[i - 1] - '0') < 10) {
        if (unit <= (1LL << 56)) rows += (tag[i - 1] - '0') * unit;
        unit = unit <= (1LL << 56) ? unit * 10 : unit;
        i--;
    }
    if (i == len || i == 0 || tag[i - 1] != ' ') return 0;
    return rows;
}

/* The SQLSTATE (field C) of an ErrorResponse of which ``n`` body bytes are at hand. */
static void qs_sqlstate(const unsigned char *body, size_t n, char code[6]) {
    size_t i = 0;
    while (i < n && body[i]) {
        unsigned char field = body[i++];
        const unsigned char *end = memchr(body + i, 0, n - i);
        if (!end) break;
        if (field == 'C') {
            size_t len = (size_t)(end - (body + i));
            if (len > 5) len = 5;
            memcpy(code, body + i, len);
            code[len] = 0;
            return;
        }
        i = (size_t)(end - body) + 1;
    }
    memcpy(code, "?????", 6);
}

/* One statement done: into the pool's table. */
static void qs_burst(ConnObject *c, uint64_t key, uint64_t params, int64_t now);

static void qs_record(ConnObject *c, const QsSlot *slot, int64_t now, long long rows,
                      const char *code) {
    PoolObject *p = c->pool;
    QsClient *q = c->qs;
    uint64_t key = slot->key;
    if (!key || !p || !p->qs_on) return;
    /* The entry found when it was sent, unless Python took the table since. */
    QsEntry *e = slot->entry && slot->gen == p->qs_gen
                     ? slot->entry : qs_entry(p, key, c->params_id, NULL, 0);
    if (!e) return;
    int64_t started = slot->started;
    if (q->last_answer > started) started = q->last_answer;
    int64_t took = now > started ? now - started : 0;
    e->calls++;
    e->rows += rows;
    e->total_ns += took;
    if (took > e->max_ns) e->max_ns = took;
    e->wait_ns += q->wait_ns;
    q->wait_ns = 0;
    e->buckets[qs_bucket(took)]++;
    if (code && code[0]) {
        int k = 0;
        while (k < QS_CODES && e->codes[k][0] && strcmp(e->codes[k], code)) k++;
        if (k == QS_CODES) {
            e->other_errors++;
        } else {
            if (!e->codes[k][0]) memcpy(e->codes[k], code, 6);
            e->code_counts[k]++;
        }
    }
    if (p->burst_threshold > 0) qs_burst(c, key, slot->params, now);
}

QS_INLINE void qs_pop(QsClient *q) {
    q->head = (q->head + 1) & (QS_RING - 1);
    q->count--;
    if (!q->count) q->lost = 0;
}

/* A server message ``t`` (``n`` of its body bytes at hand, ``whole``: all of them) for a
 * client with statements in flight: the answer to the one in front, maybe. */
static void qs_answer_error(ConnObject *c, const unsigned char *body, size_t n, int64_t now);

QS_INLINE void qs_answer(ConnObject *c, unsigned char t, const unsigned char *body, size_t n,
                         int whole, int64_t now) {
    QsClient *q = c->qs;
    if (!q) return;
    const QsSlot *front = &q->ring[q->head];
    char kind = q->count ? front->kind : 0;
    if (!now && kind == 'E') now = now_ns();
    switch (t) {
    case 'C':
        if (kind == 'Q') {
            if (whole) q->rows += qs_rows(body, n);
            return;
        }
        /* fall through */
    case 'I':
    case 's':
        if (kind != 'E') return;
        qs_record(c, front, now, t == 'C' && whole ? qs_rows(body, n) : 0, NULL);
        qs_pop(q);
        q->last_answer = now;
        return;
    case 'E':
        qs_answer_error(c, body, n, now);
        return;
    case 'Z':
        /* The Query it answers, or the Sync (and the Executes skipped after an error). */
        while (q->count) {
            const QsSlot *slot = &q->ring[q->head];
            char k = slot->kind;
            if (k == 'Q') qs_record(c, slot, now, q->rows, q->code);
            qs_pop(q);
            if (k != 'E') break;
        }
        q->rows = 0;
        q->code[0] = 0;
        q->last_answer = now;
        if (!q->count) q->lost = 0;
        return;
    }
}

/* An ErrorResponse (``n`` of its body bytes at hand) for a client with statements in flight. */
static void qs_answer_error(ConnObject *c, const unsigned char *body, size_t n, int64_t now) {
    QsClient *q = c->qs;
    const QsSlot *front = &q->ring[q->head];
    char kind = q->count ? front->kind : 0;
    char code[6];
    qs_sqlstate(body, n, code);
    if (!now) now = now_ns();
    if (kind == 'Q') {
        if (!q->code[0]) memcpy(q->code, code, 6);
    } else if (kind == 'E') {
        qs_record(c, front, now, 0, code);
        qs_pop(q);
        q->last_answer = now;
    }
}

/* The statements a linked client has in flight, for Python to time from here (eject_client):
 * ([(kind, key, started, params hash), ...], last answer, wait, rows, SQLSTATE) in the order
 * sent, times in seconds of CLOCK_MONOTONIC (Python's time.monotonic); None when nothing is
 * timed or the ring lost count (then Python skips the answers owed, as before). */
static PyObject *qs_inflight(ConnObject *c) {
    QsClient *q = c->qs;
    if (!q || q->lost) Py_RETURN_NONE;
    PyObject *entries = PyList_New((Py_ssize_t)q->count);
    if (!entries) return NULL;
    for (unsigned i = 0; i < q->count; i++) {
        const QsSlot *slot = &q->ring[(q->head + i) & (QS_RING - 1)];
        PyObject *item = Py_BuildValue("(CKdK)", slot->kind, (unsigned long long)slot->key,
                                       (double)slot->started / 1e9,
                                       (unsigned long long)slot->params);
        if (!item) {
            Py_DECREF(entries);
            return NULL;
        }
        PyList_SET_ITEM(entries, (Py_ssize_t)i, item);
    }
    return Py_BuildValue("(NddLs)", entries, (double)q->last_answer / 1e9,
                         (double)q->wait_ns / 1e9, q->rows, q->code);
}

/* -- N+1 at the wire ------------------------------------------------------------------------
 * A client's burst: its statements with less than the pool's ``burst_window`` between one and
 * the next (a request's loop, a transaction). Python tells the engine which query shape each
 * key is (FastPool.set_shapes: key -> a small shape id per fingerprint and sqlcommenter
 * origin, learnt from the batches), and the engine counts, per burst and shape (up to
 * QS_BURST_SLOTS shapes), the executions whose parameters differ from the one before. A key
 * whose shape the engine has not been told yet (its text came in the batch Python has not
 * taken: a new request's first loop) is counted by the key itself meanwhile, and becomes its
 * shape's count when the shape is known. When a count reaches ``burst_threshold`` it notes an
 * event for Python (take_bursts: shape, count, params id, final 0, key; shape 0 and the key
 * when counted by key: Python knows its shape by the time it takes the event, from the batch
 * it takes first); when the burst ends (the next statement after a gap, or the client
 * leaving the fast path) a count that reached it is noted again with its final count
 * (final 1). The burst is kept on the client (QsBurst, 104 bytes, made at its first timed
 * statement) between transactions. */
#define QS_BURST_SLOTS 4
#define QS_SHAPES 8192      /* keys whose shape the engine knows, per pool (a power of two) */
#define QS_SHAPES_FULL 6144 /* then the map starts again, and Python tells it anew */
#define QS_EVENTS 512       /* events per pool until Python takes them; more are dropped */

struct QsBurst {
    int64_t last;
    uint32_t shapes[QS_BURST_SLOTS]; /* 0: counted by keys[i] (0 too: a free slot) */
    uint32_t counts[QS_BURST_SLOTS];
    uint64_t keys[QS_BURST_SLOTS];
    uint64_t last_params[QS_BURST_SLOTS];
};

typedef struct {
    uint64_t key;
    uint32_t shape;
} QsShape;

struct QsShapeMap {
    QsShape slots[QS_SHAPES];
    int used;
};

typedef struct {
    uint32_t shape, count; /* shape 0: counted by ``key`` */
    long long params_id;
    int final;
    uint64_t key;
} QsEvent;

struct QsEvents {
    QsEvent items[QS_EVENTS];
    int n;
    long long dropped;
};

/* The shape Python gives a key that is no loop's (BEGIN, SET ...: wire_nplusone.NO_SHAPE):
 * no burst counts it. */
#define QS_NO_SHAPE 0xffffffffu

static uint32_t qs_shape_of(PoolObject *p, uint64_t key) {
    QsShapeMap *m = p->shapes;
    if (!m) return 0;
    size_t i = (size_t)(key ^ (key >> 31)) & (QS_SHAPES - 1);
    while (m->slots[i].key) {
        if (m->slots[i].key == key) return m->slots[i].shape;
        i = (i + 1) & (QS_SHAPES - 1);
    }
    return 0;
}

static void qs_event(ConnObject *c, uint32_t shape, uint64_t key, uint32_t count, int final) {
    PoolObject *p = c->pool;
    if (!p) return;
    if (!p->events) {
        p->events = calloc(1, sizeof(QsEvents));
        if (!p->events) return;
    }
    QsEvents *ev = p->events;
    if (ev->n == QS_EVENTS) {
        ev->dropped++;
        return;
    }
    QsEvent *e = &ev->items[ev->n++];
    e->shape = shape;
    e->key = shape ? 0 : key;
    e->count = count;
    e->params_id = c->params_id;
    e->final = final;
}

/* The burst is over: its loops' final counts. */
static void qs_burst_end(ConnObject *c) {
    QsBurst *b = c->burst;
    PoolObject *p = c->pool;
    if (!b) return;
    for (int i = 0; i < QS_BURST_SLOTS; i++) {
        if ((b->shapes[i] || b->keys[i]) && p && p->burst_threshold > 0 &&
            b->counts[i] >= (uint32_t)p->burst_threshold)
            qs_event(c, b->shapes[i], b->keys[i], b->counts[i], 1);
        b->shapes[i] = b->counts[i] = 0;
        b->keys[i] = 0;
    }
}

static void qs_burst_free(ConnObject *c) {
    if (!c->burst) return;
    qs_burst_end(c);
    free(c->burst);
    c->burst = NULL;
}

static void qs_burst(ConnObject *c, uint64_t key, uint64_t params, int64_t now) {
    PoolObject *p = c->pool;
    uint32_t shape = qs_shape_of(p, key); /* 0: not known yet, counted by the key */
    if (shape == QS_NO_SHAPE) return;
    QsBurst *b = c->burst;
    if (!b) {
        b = c->burst = calloc(1, sizeof(QsBurst));
        if (!b) return;
    } else if (now - b->last > p->burst_window) {
        qs_burst_end(c);
    }
    b->last = now;
    int free_slot = -1;
    for (int i = 0; i < QS_BURST_SLOTS; i++) {
        int by_key = !b->shapes[i] && b->keys[i] == key; /* this key, counted by itself */
        if ((shape && b->shapes[i] == shape) || by_key) {
            if (by_key && shape) { /* its shape came meanwhile: the count is the shape's */
                b->shapes[i] = shape;
                b->keys[i] = 0;
            }
            if (b->last_params[i] != params) {
                b->last_params[i] = params;
                if (++b->counts[i] == (uint32_t)p->burst_threshold)
                    qs_event(c, shape, key, b->counts[i], 0);
            }
            return;
        }
        if (!b->shapes[i] && !b->keys[i] && free_slot < 0) free_slot = i;
    }
    if (free_slot >= 0) {
        b->shapes[free_slot] = shape;
        b->keys[free_slot] = shape ? 0 : key;
        b->counts[free_slot] = 1;
        b->last_params[free_slot] = params;
    }
}

/* FastPool.set_shapes([(key, shape id), ...]) */
static PyObject *pool_set_shapes(PoolObject *p, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "set_shapes takes a sequence of (key, shape) pairs");
    if (!seq) return NULL;
    if (!p->shapes) {
        p->shapes = calloc(1, sizeof(QsShapeMap));
        if (!p->shapes) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
    }
    QsShapeMap *m = p->shapes;
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
        unsigned long long key;
        unsigned int shape;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "KI", &key, &shape)) {
            Py_DECREF(seq);
            return NULL;
        }
        if (!key) continue;
        if (m->used >= QS_SHAPES_FULL) {
            memset(m, 0, sizeof(QsShapeMap));
        }
        size_t i = (size_t)(key ^ (key >> 31)) & (QS_SHAPES - 1);
        while (m->slots[i].key && m->slots[i].key != key) i = (i + 1) & (QS_SHAPES - 1);
        if (!m->slots[i].key) m->used++;
        m->slots[i].key = key;
        m->slots[i].shape = shape;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* FastPool.take_bursts(): [(shape, count, params id, final, key)], then empty. */
static PyObject *pool_take_bursts(PoolObject *p, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out || !p->events) return out;
    QsEvents *ev = p->events;
    for (int i = 0; i < ev->n; i++) {
        QsEvent *e = &ev->items[i];
        PyObject *row = Py_BuildValue("(IILiK)", e->shape, e->count, e->params_id, e->final,
                                      (unsigned long long)e->key);
        if (!row || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(row);
    }
    ev->n = 0;
    return out;
}

static PyObject *pool_get_burst_window(PoolObject *p, void *unused) {
    return PyFloat_FromDouble((double)p->burst_window / 1e9);
}

static int pool_set_burst_window(PoolObject *p, PyObject *value, void *unused) {
    double v = value ? PyFloat_AsDouble(value) : -1.0;
    if (v == -1.0 && PyErr_Occurred()) return -1;
    p->burst_window = secs_to_ns(v);
    return 0;
}

/* FastPool.take_queries(): the batch as stats.QueryStats.fold_batch reads it. */
static PyObject *qs_entry_tuple(QsEntry *e) {
    PyObject *errors = PyList_New(0), *buckets = PyList_New(0), *text = NULL, *item;
    if (!errors || !buckets) goto fail;
    for (int k = 0; k < QS_CODES && e->codes[k][0]; k++) {
        item = Py_BuildValue("(sL)", e->codes[k], e->code_counts[k]);
        if (!item || PyList_Append(errors, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    if (e->other_errors) {
        item = Py_BuildValue("(sL)", "other", e->other_errors);
        if (!item || PyList_Append(errors, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    for (int b = 0; b <= QS_MAX_BUCKET; b++) {
        if (!e->buckets[b]) continue;
        item = Py_BuildValue("(iI)", b, (unsigned int)e->buckets[b]);
        if (!item || PyList_Append(buckets, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    text = e->text ? PyBytes_FromStringAndSize(e->text, (Py_ssize_t)e->text_len)
                   : Py_NewRef(Py_None);
    if (!text) goto fail;
    return Py_BuildValue("(KLNLNLLLNL)", (unsigned long long)e->key, e->params_id, text, e->calls,
                         errors, e->rows, (long long)e->total_ns, (long long)e->wait_ns,
                         buckets, (long long)e->max_ns);
fail:
    Py_XDECREF(errors);
    Py_XDECREF(buckets);
    return NULL;
}

static PyObject *pool_take_queries(PoolObject *p, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out || !p->qs) return out;
    QsTable *t = p->qs;
    for (int i = 0; i <= QS_SLOTS; i++) {
        QsEntry *e = i < QS_SLOTS ? t->slots[i] : t->overflow;
        if (!e || (!e->calls && !e->text)) continue;
        PyObject *row = qs_entry_tuple(e);
        if (!row || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(row);
    }
    qs_table_taken(p);
    return out;
}
