/* The pooler's compiled fast path: socket I/O and transaction-pooling hand-over in C.
 *
 * An Engine owns an epoll set. The pooler's event loop waits on that set itself: asyncio's
 * descriptors are watched in it too (Engine.watch), and Engine.select serves the engine's
 * sockets in C until something of Python's is due (fastpath.EngineSelector). On a loop it did
 * not make, the loop watches the set's fd instead (add_reader -> Engine.run). Plain-TCP clients
 * are accepted here; after login, server sockets (and clients of other listeners) move from
 * asyncio transports into the engine; a Conn then serves as the protocol object's transport
 * (write, close, pause_reading ...).
 *
 * A Conn is SLOW or FAST. SLOW: every byte read goes to protocol.data_received(), as with any
 * asyncio transport; all pooling logic stays in Python. FAST (transaction and statement pools):
 * the engine itself reads message headers, forwards the bytes, lends an idle server of the
 * FastPool to a client whose request arrives, and takes it back at ReadyForQuery 'I' with
 * nothing outstanding. Python is not called at all on that path.
 *
 * Whatever the fast path does not handle (a named prepared statement, a query the hazard
 * pre-filter flags, Terminate, COPY, ParameterStatus, a lost connection ...) makes the engine
 * "eject" the client and its server back to Python at a message boundary: handler.ejected()
 * gets the pair, the protocol state (ReadyForQuery still owed, transaction status, timings) and
 * the bytes not yet forwarded, and Python carries on exactly as if it had handled everything.
 *
 * Rules kept here: a server is lent only at ReadyForQuery 'I' with nothing outstanding and no
 * client bytes mid-message (never dirty); a client is only ever linked to one server and a
 * server to one client; bytes are forwarded unchanged and in order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KIND_CLIENT 0
#define KIND_SERVER 1
#define KIND_LISTENER 2 /* a listening socket: new clients are accepted here, no uvloop transport */
#define KIND_HANDOFF 3  /* workers = N: the socket sibling workers hand clients in by */
#define ACCEPTS_PER_WAKE 64
#define MODE_SLOW 0
#define MODE_FAST 1
#define AT_NONE 0
#define AT_WAITING 1 /* client in its pool's wait queue */
#define AT_IDLE 2    /* server in its pool's idle list */

#define F_READ_PAUSED 0x01 /* Python asked pause_reading() */
#define F_CLOSED 0x02      /* fd closed */
#define F_CLOSING 0x04     /* close() asked: the fd closes once the write buffer is empty */
#define F_WRITE_PAUSED 0x08 /* protocol.pause_writing() was called */
#define F_THROTTLED 0x10   /* fast: peer cannot take more, reading stopped */
#define F_HOLD 0x20        /* server: give back to Python at release, never lend in C */
#define F_EJECT_WANTED 0x40 /* client: bytes the fast path will not carry, wait for quiet */
#define F_KEEPALIVE 0x80    /* listener: set SO_KEEPALIVE on the clients it accepts */
#define F_STARTUP 0x100     /* client of an engine listener: its startup packet not seen yet */
#define F_PHANTOM 0x200     /* client with no Python object yet: ``protocol`` is its listener's
                             * handler (see "engine logins") */
#define F_WELCOMED 0x400    /* phantom: logged in by a login route, welcome sent */
#define F_READ_AT_ACCEPT 0x800 /* listener with TCP_DEFER_ACCEPT: a client is accepted once
                                * its first packet is in, so it is read at once */
#define F_COUNTED 0x1000   /* client counted in this worker's share (see "balancing") */
#define F_SSL_ASKED 0x2000 /* client: its SSLRequest was answered (one is allowed) */
#define F_GSS_ASKED 0x4000 /* client: its GSSENCRequest was answered (one is allowed) */
#define F_FATAL_SEEN 0x8000 /* server: it sent its client a FATAL (or PANIC) error */
#define F_UNNAMED_PARSED 0x10000 /* client: the engine carried an unnamed Parse (or a simple
                                  * query, which drops the unnamed statement): Python's record
                                  * of it is out of date (take_unnamed_parsed) */
#define F_EJECT_STREAMED 0x20000 /* client: Python is wanted (its server's answers, or Python
                                  * asked) while the client streams a message: hand over at
                                  * its end */
#define F_ANSWERS_WAIT 0x40000   /* server: an answer of it needs Python, which waits for its
                                  * client's streamed message: it and the rest are held */
#define MAX_HELD_ANSWERS (1024 * 1024) /* a server's answers held so, at most */
#define MAX_WHOLE_ERROR 65536 /* a server error up to this size is read whole (FATAL?) */
#define SSL_REQUEST_CODE 80877103
#define GSSENC_REQUEST_CODE 80877104
#define MAX_STARTUP_LENGTH 10000 /* as wire/framing.py */

#define READ_CHUNK 65536
#define HIGH_WATER (256 * 1024)
#define LOW_WATER (64 * 1024)
#define MAX_FAST_MESSAGE (1024 * 1024)
/* A Bind longer than this that is not read whole yet is streamed to the client's server (see
 * "streaming"), up to PostgreSQL's own cap on a message (1 GB - 1). */
#define STREAM_OVER (64 * 1024)
#define MAX_STREAMED_MESSAGE 0x3fffffffu
#define WAITING_READ_CAP (64 * 1024)
#define N_BUCKETS 12
#define OWED_MAX 64

/* ReadyForQuery's one-byte status, the last message of every answer. */
#define EJECT_UNLINKED 0
#define EJECT_LINKED 1
#define EJECT_ATTACH 2 /* server chosen, parameters differ: Python runs attach() */
#define EJECT_WAITING 3

/* Seconds (any double a setting may hold: huge, infinite, NaN) as nanoseconds, clamped to
 * +-2^62 (about 146 years), so that no conversion to int64_t is undefined. */
#define NS_LIMIT ((int64_t)1 << 62)
static int64_t secs_to_ns(double s) {
    if (s != s) return 0; /* NaN */
    if (s >= (double)NS_LIMIT / 1e9) return NS_LIMIT;
    if (s <= -(double)NS_LIMIT / 1e9) return -NS_LIMIT;
    return (int64_t)(s * 1e9);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* -- byte buffers ------------------------------------------------------------------------ */
typedef struct {
    char *p;
    size_t start, end, cap;
} Buf;

static inline size_t buf_len(const Buf *b) { return b->end - b->start; }

/* Buffers of the first size given back by idle connections, for the next to take: a busy
 * connection empties and refills its buffers on every message, and malloc + free each time
 * showed in profiles. A few dozen are kept (engine sockets are served under the GIL). */
#define SPARE_SIZE 16384 /* what a fast-path read asks for */
#define SPARE_MAX 64
static char *spare_buffers[SPARE_MAX];
static int n_spare_buffers;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->start && b->start == b->end) b->start = b->end = 0;
    if (b->cap - b->end >= extra) return 0;
    if (!b->cap && extra <= SPARE_SIZE && n_spare_buffers) {
        b->p = spare_buffers[--n_spare_buffers];
        b->cap = SPARE_SIZE;
        return 0;
    }
    if (b->start) {
        memmove(b->p, b->p + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
        if (b->cap - b->end >= extra) return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->end < extra) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(Buf *b, const char *data, size_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->end, data, n);
    b->end += n;
    return 0;
}

static void buf_free(Buf *b) {
    if (b->cap == SPARE_SIZE && n_spare_buffers < SPARE_MAX)
        spare_buffers[n_spare_buffers++] = b->p;
    else
        PyMem_Free(b->p);
    b->p = NULL;
    b->start = b->end = b->cap = 0;
}

/* Idle connections keep no buffer: 10,000 mostly idle clients must stay small. */
static void buf_shrink(Buf *b) {
    if (b->start == b->end && b->cap) buf_free(b);
}

/* -- objects ----------------------------------------------------------------------------- */
typedef struct EngineObject EngineObject;
typedef struct PoolObject PoolObject;
typedef struct ConnObject ConnObject;
typedef struct Scram Scram;
typedef struct QsTable QsTable;   /* query statistics (see there) */
typedef struct QsClient QsClient;
typedef struct QsBurst QsBurst;
typedef struct QsShapeMap QsShapeMap;
typedef struct QsEvents QsEvents;

struct ConnObject {
    PyObject_HEAD
    EngineObject *engine;
    PyObject *protocol;
    PyObject *extra;
    int fd;
    int kind;
    int mode;
    int at;
    unsigned flags;
    uint32_t events;
    int registered;
    Buf rb, wb;
    ConnObject *peer;
    PoolObject *pool;
    ConnObject *prev, *next; /* wait queue or idle list */
    /* client protocol state while fast */
    int expected_rfq;
    int unsynced;
    char txn;
    int64_t query_started, xact_started, wait_started, last_activity, idle_in_txn_since;
    /* body bytes of the current message still to pass as they come: a server's (any
     * message), a client's (a large Bind it streams: see "streaming") */
    size_t skip;
    /* client queued for a server (AT_WAITING): bytes from rb.start that client_scan found
     * fast already (complete messages, no statement to rename), not scanned again; and
     * whether an unnamed Parse is among them (a Bind of it further on stays here) */
    size_t scan_ok;
    int scan_unnamed;
    long long params_id;
    int64_t expires;
    int64_t idle_since;
    /* client: the answers the server still owes for what the fast path forwarded, one letter
     * per request (Q S P B D E C), oldest first, so that Python's statement router can take
     * over mid-pipeline knowing exactly what comes back */
    char owed[OWED_MAX];
    int owed_start, owed_end;
    int owed_lost;  /* more than OWED_MAX outstanding: the record is incomplete */
    int owed_skip;  /* an error came back: the server ignores requests until the next Sync */
    /* named statements (see there): for each owed 'b' / 'd' (a Bind / Describe the engine
     * renamed), the client's name of its statement; allocated at the first such */
    PyObject **owed_names;
    /* client: its statement names, router.statements (name -> ClientStatement); server: the
     * statements prepared on it, server.prepared (OrderedDict, least recently used first).
     * Both Python's own objects, held while on the fast path; NULL: none (no router) */
    PyObject *statements;
    PyObject *prepared;
    Scram *scram;   /* client: a SCRAM-SHA-256 login the engine is running (scram_login) */
    /* phantom clients (F_PHANTOM): the login route followed, the cancel key given, when the
     * connection was accepted (monotonic ns), the engine's list of phantoms */
    PyObject *route;
    /* client of an engine listener: its address, made into peername/sockname only when
     * asked (get_extra_info), so that a phantom costs no Python objects for it */
    union {
        struct sockaddr sa;
        struct sockaddr_in in4;
        struct sockaddr_in6 in6;
    } peer_addr;
    uint32_t cancel_pid, cancel_key;
    long long client_id; /* phantom: its id in the logs (0: none given, logging off) */
    int64_t accepted;
    ConnObject *ph_prev, *ph_next;
    /* fast client holding part of a message (the engine's list of them, for
     * client_message_timeout: Engine.stalled) */
    ConnObject *pt_prev, *pt_next;
    int in_partial;
    /* read/write split (route_reads pools): ROUTE_WROTE, and when the last transaction so
     * marked ended (ReadyForQuery 'I', monotonic ns; 0: not ended in the engine) */
    int route_flags;
    int64_t route_ended;
    PyObject *weakreflist;
    /* TLS (_fastpath_tls.c): the session (an SSL*; NULL: plain), its TLS_* state, the errno
     * of its socket's last failed call, raw bytes this read event took */
    void *tls;
    unsigned tls_state;
    int tls_errno;
    size_t tls_raw_in;
    QsClient *qs; /* linked client, query_stats on: its statements in flight (see there) */
    QsBurst *burst; /* client: its current burst (see "N+1 at the wire") */
};

struct PoolObject {
    PyObject_HEAD
    EngineObject *engine;
    PyObject *handler;
    ConnObject *idle_head; /* most recently used first */
    ConnObject *wait_head, *wait_tail;
    long n_idle, n_waiting, n_linked;
    long n_phantoms; /* logged in by the engine alone along a route to this pool */
    int paused, statement_mode, assist, py_waiters;
    /* read/write split (proxy/routing.py): the engine serves only the transactions that
     * surely go to the primary (surely_primary), and counts them */
    int route_reads;
    long long routed_primary;
    /* server_check_delay: an idle server unused for longer is checked by Python before it is
     * lent again; negative: never */
    int64_t check_after;
    long long xact_count, query_count, errors, bytes_in, bytes_out, assignments, wait_count;
    int64_t xact_ns, query_ns, wait_ns;
    long long buckets[N_BUCKETS + 1];
    int64_t bounds[N_BUCKETS];
    int qs_on;   /* query_stats: time each statement (see "query statistics") */
    QsTable *qs; /* this batch's per-statement aggregates, made at the first */
    /* N+1 at the wire: executions of a shape per burst that make an event (0: off), the
     * longest gap within a burst, the shapes of keys, the events not yet taken */
    int burst_threshold;
    int64_t burst_window;
    QsShapeMap *shapes;
    QsEvents *events;
};

#define MAX_LOG_FDS 4

struct EngineObject {
    PyObject_HEAD
    int epfd;
    int running;          /* inside run(): events of this batch may still name closed conns */
    PyObject *graveyard;  /* conns closed during run(), freed when the batch is done */
    PyObject *error_handler; /* called with an exception a callback raised */
    PyObject *call_soon;
    long n_conns;
    /* balancing between workers (see there; Engine.balance): the shared counters (NULL: no
     * balancing, workers = 1), how many workers there are and which one this is, the
     * siblings' hand-off send ends by index (-1 for this one), the socket clients are handed
     * in by, the listener they are then served by, the clients counted here (F_COUNTED) */
    Py_buffer counters_view;
    int64_t *counters;
    int n_workers, me;
    int *handoff_fds;
    ConnObject *handoff_in, *handoff_listener;
    long counted;
    /* engine logins: startup packet -> route (dict, set by Python), the pooler's cancel keys
     * (dict (pid, key) -> client or phantom Conn), how cancel keys are made (the pid's fixed
     * and random bits, the key's fixed bits: peering's time to live), the phantoms */
    PyObject *routes, *cancel_keys;
    uint32_t pid_base, pid_mask, key_bits;
    long phantoms, phantom_cap;
    long phantoms_welcomed; /* of those, logged in (the rest are still logging in) */
    ConnObject *phantom_head;
    ConnObject *partial_head; /* fast clients that may hold part of a message */
    /* connection logging for phantoms (log_connections / log_disconnections): the pooler's
     * client ids (an iterator), the events not yet logged (a list), what logs them (called
     * soon after the first of a batch) */
    PyObject *client_ids, *log_events, *log_drain;
    int log_logins, log_leaves;
    /* ... or written by the engine itself (log_to), when the log is the CLI's plain files:
     * copies of their descriptors (owned), the text between a line's time and its message
     * (" <pid> INFO "), the lines of this batch (written when the batch is done), and the
     * time text of the last second a line was made in. */
    int log_fds[MAX_LOG_FDS], n_log_fds;
    char *log_head;
    size_t log_head_len;
    char *log_buf;
    size_t log_len, log_cap;
    time_t log_second;
    char log_time[40];
    long long log_dropped; /* lines a full log descriptor did not take (log_flush) */
    /* client TLS done by the engine (a TLSContext; NULL: an SSLRequest is answered 'N') */
    PyObject *client_tls;
    int client_tls_required; /* client_tls_sslmode require or stronger: no route in clear */
};

static PyTypeObject ConnType, PoolType, EngineType;

/* send() and recv() straight to the kernel. glibc's send and recv are thread cancellation
 * points: in a process with a second thread (Python's executor has one) each call switches
 * asynchronous cancellation on and off around the system call, which costs 20-40 ns a call
 * here (a few per transaction; about 1 % of the pooler's samples at 10 clients). The engine
 * never cancels a thread, so it calls the system calls itself. */
static inline ssize_t sock_send(int fd, const void *p, size_t n, int flags) {
    return (ssize_t)syscall(SYS_sendto, fd, p, n, flags, NULL, 0);
}

static inline ssize_t sock_recv(int fd, void *p, size_t n, int flags) {
    return (ssize_t)syscall(SYS_recvfrom, fd, p, n, flags, NULL, NULL);
}

/* Calls into Python's protocol and handler objects, counted: Engine.select() goes back to the
 * event loop after a batch that made any, since they may have scheduled work there. */
static unsigned long python_calls;
#define py_method(...) (python_calls++, PyObject_CallMethod(__VA_ARGS__))
static int claim(ConnObject *c);
static void route_welcome(ConnObject *c, PyObject *final);
#define py_call_soon(e, fn, arg) \
    (python_calls++, PyObject_CallFunctionObjArgs((e)->call_soon, (fn), (arg), NULL))

static void report_error(EngineObject *e) {
    /* An exception from a Python callback: log it through Python, never let it unwind C. */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    if (!type) return;
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb && exc) PyException_SetTraceback(exc, tb);
    if (e && e->error_handler && e->error_handler != Py_None && exc) {
        PyObject *r = PyObject_CallOneArg(e->error_handler, exc);
        if (!r) PyErr_WriteUnraisable(e->error_handler);
        Py_XDECREF(r);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(type, exc, tb);
        PyErr_WriteUnraisable(NULL);
    }
}

/* -- balancing: the shared counters ------------------------------------------------------ *
 * With workers = N each worker has a slot in a block of shared memory the supervisor made
 * (workers.Balance, whose layout this mirrors): eight 64-bit words, a cache line, so that a
 * worker counting its own clients does not slow down its siblings reading theirs. Other
 * processes read and write them at any time: every access is atomic. */
#define SLOT_WORDS 8
#define SLOT_CLIENTS 0  /* clients counted in this worker's share, handed to it included */
#define SLOT_ACCEPTING 1 /* 1: it takes hand-offs (it has an engine listener to serve them) */
#define SLOT_HANDED_OFF 2 /* clients it handed to a sibling, in all */
#define SLOT_HANDED_IN 3  /* clients a sibling handed to it, in all */
/* (word 4, the worker's pid, is written by the supervisor) */

static inline int64_t *counter(EngineObject *e, int worker, int word) {
    return e->counters + (size_t)worker * SLOT_WORDS + word;
}

static inline int64_t counter_get(EngineObject *e, int worker, int word) {
    return __atomic_load_n(counter(e, worker, word), __ATOMIC_RELAXED);
}

static inline void counter_add(EngineObject *e, int worker, int word, int64_t n) {
    __atomic_add_fetch(counter(e, worker, word), n, __ATOMIC_RELAXED);
}

static inline void counter_set(EngineObject *e, int worker, int word, int64_t v) {
    __atomic_store_n(counter(e, worker, word), v, __ATOMIC_RELAXED);
}

/* A client connection of this worker's share: counted until its fd closes. ``handed_in``: a
 * sibling handed it over and counted it for us already (hand_off). */
static void count_client(ConnObject *c, int handed_in) {
    EngineObject *e = c->engine;
    if (!e->counters) return;
    c->flags |= F_COUNTED;
    e->counted++;
    if (!handed_in) counter_add(e, e->me, SLOT_CLIENTS, 1);
}

static void uncount_client(ConnObject *c) {
    EngineObject *e = c->engine;
    c->flags &= ~F_COUNTED;
    e->counted--;
    if (e->counters) counter_add(e, e->me, SLOT_CLIENTS, -1);
}

/* -- epoll interest ---------------------------------------------------------------------- */
static int wants_read(ConnObject *c) {
    if (c->flags & (F_CLOSED | F_CLOSING | F_READ_PAUSED | F_THROTTLED)) return 0;
    if (c->mode == MODE_FAST) {
        /* Queued for a server: still read (a client that leaves is seen at once), so that
         * queueing costs no epoll_ctl each way; up to a cap, for one that pipelines on. */
        if (c->at == AT_WAITING) return buf_len(&c->rb) < WAITING_READ_CAP;
        /* Waiting for quiet to hand over: keep reading (a close must be seen), up to a cap. */
        if ((c->flags & F_EJECT_WANTED) && buf_len(&c->rb) > MAX_FAST_MESSAGE) return 0;
    } else if (c->kind == KIND_CLIENT && ((c->flags & (F_PHANTOM | F_STARTUP)) || c->scram) &&
               buf_len(&c->wb) > HIGH_WATER) {
        /* Answered by the engine alone (startup, SCRAM): a client that does not read its
         * answers is not read either, so its write buffer cannot grow without bound. */
        return 0;
    }
    return 1;
}

static void update_events(ConnObject *c) {
    if (c->flags & F_CLOSED) return;
    uint32_t ev = 0;
    if (wants_read(c)) ev |= EPOLLIN;
    if (buf_len(&c->wb)) ev |= EPOLLOUT;
    if (ev == c->events && c->registered) return;
    struct epoll_event e;
    e.events = ev;
    e.data.ptr = c;
    if (!c->registered) {
        if (epoll_ctl(c->engine->epfd, EPOLL_CTL_ADD, c->fd, &e) == 0) c->registered = 1;
    } else {
        epoll_ctl(c->engine->epfd, EPOLL_CTL_MOD, c->fd, &e);
    }
    c->events = ev;
}

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

/* The engine's own reference goes when the fd closes; during run() the conn is kept until
 * the batch ends, since a later event of the same epoll_wait may still point at it. */
static void drop_engine_ref(ConnObject *c) {
    EngineObject *e = c->engine;
    if (e->running && e->graveyard) {
        if (PyList_Append(e->graveyard, (PyObject *)c) < 0) PyErr_Clear();
    }
    Py_DECREF(c);
}

/* -- writing ----------------------------------------------------------------------------- */
static void conn_lost(ConnObject *c, PyObject *exc);
static void lost_errno(ConnObject *c, int err);
static int conn_send(ConnObject *c, const char *data, size_t n);

/* The TLS I/O layer (TLSContext, Conn.start_tls, and tls_* below): its own file. */
#include "_fastpath_tls.c"

static void write_pressure(ConnObject *c) {
    size_t pending = buf_len(&c->wb);
    if (c->mode == MODE_FAST) {
        ConnObject *peer = c->peer;
        if (peer && pending > HIGH_WATER && !(peer->flags & F_THROTTLED)) {
            peer->flags |= F_THROTTLED;
            update_events(peer);
        }
        return;
    }
    if (pending > HIGH_WATER && !(c->flags & (F_WRITE_PAUSED | F_PHANTOM))) {
        c->flags |= F_WRITE_PAUSED;
        PyObject *r = py_method(c->protocol, "pause_writing", NULL);
        if (!r) report_error(c->engine);
        Py_XDECREF(r);
    }
}

/* Send now what the socket takes; keep the rest. Returns -1 when the connection broke. */
static int conn_send(ConnObject *c, const char *data, size_t n) {
    if (c->flags & F_CLOSED) return 0;
    if (!n) return 0;
    if (tls_active(c)) {
        if (tls_send(c, data, n) < 0) return -1;
        write_pressure(c);
        return 0;
    }
    size_t sent = 0;
    if (!buf_len(&c->wb)) {
        ssize_t r = sock_send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
            r = 0;
        }
        sent = (size_t)r;
        if (sent == n) return 0;
    }
    if (buf_append(&c->wb, data + sent, n - sent) < 0) {
        PyErr_Clear();
        return -1;
    }
    update_events(c);
    write_pressure(c);
    return 0;
}

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
#define QS_SUB 8
#define QS_MAX_BUCKET (36 * QS_SUB)
#define QS_RING 32        /* statements in flight per client that are timed */
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
    uint64_t params; /* a hash of its parameters (of the text, for a Query) */
    char kind;       /* 'Q', 'E' (Execute), 'S' (Sync) */
} QsSlot;            /* one statement in flight: one cache line holds two */

struct QsClient {
    QsSlot ring[QS_RING];
    int head, count;
    int lost; /* more than QS_RING in flight: nothing more is timed until the ring drains */
    uint64_t unnamed_key, bound_key, bound_params;
    int64_t last_answer; /* when the last answer came: a pipelined statement starts there */
    int64_t wait_ns; /* waited for the server: for the next statement recorded */
    long long rows;  /* of the Query in front so far */
    char code[6];    /* the SQLSTATE of the Query in front, if it failed */
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

/* ``h`` followed by the ``n`` bytes at ``s`` (a run: its length is mixed in, so runs that
 * meet at another place hash apart). */
static uint64_t qs_run(uint64_t h, const unsigned char *s, size_t n) {
    size_t left = n;
    while (left >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = qs_mix(h, w);
        s += 8;
        left -= 8;
    }
    uint64_t w = 0;
    if (left) memcpy(&w, s, left);
    return qs_mix(h, w ^ ((uint64_t)n << 56));
}

static uint64_t qs_hash(const unsigned char *s, size_t n) {
    uint64_t h = qs_run(0xcbf29ce484222325ULL, s, n);
    return h ? h : 1;
}

/* What a byte is to qs_text_key: a byte of none of these classes is copied as it is. */
enum { QS_C_IDENT = 1, QS_C_DIGIT = 2, QS_C_QUOTE = 4, QS_C_DQUOTE = 8, QS_C_SLASH = 16 };
static unsigned char qs_class[256];

static void qs_classes_init(void) {
    for (int ch = 0; ch < 256; ch++) {
        unsigned char k = 0;
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' || ch == '$' ||
            ch >= 0x80)
            k |= QS_C_IDENT;
        if (ch >= '0' && ch <= '9') k |= QS_C_IDENT | QS_C_DIGIT;
        if (ch == '\'') k |= QS_C_QUOTE;
        if (ch == '"') k |= QS_C_DQUOTE;
        if (ch == '/') k |= QS_C_SLASH;
        qs_class[ch] = k;
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

/* The key of a statement text, the same for texts that differ only in their literal values
 * (a client that inlines them, psycopg2, Django ...): a string literal or a number outside an
 * identifier counts as "?", as does a run of 8 or more hex digits in a comment (a trace id in
 * a sqlcommenter comment); the rest (identifiers, $n, comments, quoted names) as it is. The
 * text is hashed in runs between those (qs_run), each literal as one marker.
 * ``*raw``: the hash of the text as it is (its parameters, for N+1 counting). A text whose
 * string literal does not end is keyed as it is. Python groups the keys by fingerprint. */
static uint64_t qs_text_key(const unsigned char *s, size_t n, uint64_t *raw) {
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i = 0, run = 0; /* the bytes from ``run`` to ``i`` go as they are */
    int after_ident = 0;
    *raw = qs_hash(s, n);
    while (i < n) {
        /* Eight bytes at a time while none of them is in '"' .. '9' (the quotes, '/', the
         * digits and some punctuation): most of a text, and all plain. */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (QS_HAS_BETWEEN(w, 0x21, 0x3a)) break;
            i += 8;
            after_ident = qs_class[s[i - 1]] & QS_C_IDENT;
        }
        if (i >= n) break;
        unsigned char k = qs_class[s[i]];
        if (!(k & (QS_C_DIGIT | QS_C_QUOTE | QS_C_DQUOTE | QS_C_SLASH)) ||
            ((k & QS_C_DIGIT) && after_ident)) {
            after_ident = k & QS_C_IDENT;
            i++;
            continue;
        }
        if (k & QS_C_SLASH) {
            if (i + 1 >= n || s[i + 1] != '*') {
                after_ident = 0;
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
                    i += hex;
                    piece = i;
                } else {
                    i += hex ? hex : 1;
                }
            }
            h = qs_run(h, s + piece, i - piece);
            run = i;
            after_ident = 0;
            continue;
        }
        if (k & QS_C_DQUOTE) { /* a quoted name, as it is */
            const unsigned char *close = memchr(s + i + 1, '"', n - i - 1);
            i = close ? (size_t)(close - s) + 1 : n;
            after_ident = 0;
            continue;
        }
        h = qs_run(h, s + run, i - run);
        if (k & QS_C_QUOTE) {
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
                h = *raw;
                return h;
            }
            i = j + 1;
        } else { /* a number */
            while (i < n && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.')) i++;
            if (i + 1 < n && (s[i] == 'e' || s[i] == 'E') &&
                ((s[i + 1] >= '0' && s[i + 1] <= '9') || s[i + 1] == '-' || s[i + 1] == '+')) {
                i += 2;
                while (i < n && s[i] >= '0' && s[i] <= '9') i++;
            }
        }
        h = qs_mix(h, QS_LITERAL);
        run = i;
        after_ident = 0;
    }
    h = qs_run(h, s + run, i - run);
    return h ? h : 1;
}

/* The bucket of a duration, as stats.bucket_of: 0 under a microsecond, then QS_SUB per power
 * of two of microseconds. */
static int qs_bucket(int64_t ns) {
    double us = (double)ns / 1000.0;
    if (us < 1.0) return 0;
    int exponent;
    double mantissa = frexp(us, &exponent);
    int index = (exponent - 1) * QS_SUB + (int)((mantissa - 0.5) * 2 * QS_SUB) + 1;
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
        q->unnamed_key = q->bound_key = 0;
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

static void qs_push(ConnObject *c, uint64_t key, int64_t started, char kind, uint64_t params) {
    QsClient *q = c->qs;
    if (q->lost || q->count == QS_RING) {
        q->lost = 1; /* answers can no longer be matched: time nothing until quiet */
        return;
    }
    QsSlot *slot = &q->ring[(q->head + q->count) % QS_RING];
    slot->key = key;
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

/* One client message the engine forwards (client_account): Query, Parse, Bind, Execute and
 * Sync move the statement being timed. ``server_name`` / ``client_name``: a Bind the engine
 * renamed (named statements). */
static void qs_sent(ConnObject *c, unsigned char t, const unsigned char *body, size_t n,
                    PyObject *server_name, PyObject *client_name, int64_t *now) {
    QsClient *q = c->qs;
    PoolObject *p = c->pool;
    if (!q || !p) return;
    switch (t) {
    case 'Q': {
        size_t len = n && body[n - 1] == 0 ? n - 1 : n;
        uint64_t raw, key = qs_text_key(body, len, &raw);
        if (!qs_entry(p, key, c->params_id, body, len)) return;
        if (!*now) *now = now_ns();
        qs_push(c, key, *now, 'Q', raw);
        return;
    }
    case 'P': { /* unnamed (the engine carries no named Parse) */
        if (n < 2) return;
        const unsigned char *sql = body + 1;
        const unsigned char *end = memchr(sql, 0, n - 1);
        if (!end) return;
        uint64_t raw;
        q->unnamed_key = qs_text_key(sql, (size_t)(end - sql), &raw);
        qs_entry(p, q->unnamed_key, c->params_id, sql, (size_t)(end - sql));
        return;
    }
    case 'B':
        q->bound_params = qs_hash(body, n);
        if (server_name) {
            Py_ssize_t len;
            const char *name = PyUnicode_Check(server_name)
                                   ? PyUnicode_AsUTF8AndSize(server_name, &len) : NULL;
            if (!name) {
                PyErr_Clear();
                q->bound_key = 0;
                return;
            }
            q->bound_key = qs_hash((const unsigned char *)name, (size_t)len);
            /* The text (a dict lookup) only when this batch has no entry with it yet. */
            QsEntry *e = qs_entry(p, q->bound_key, c->params_id, NULL, 0);
            if (e && !e->text && e != p->qs->overflow) {
                size_t text_len = 0;
                const unsigned char *text = qs_named_text(c, client_name, &text_len);
                if (text) qs_entry(p, q->bound_key, c->params_id, text, text_len);
            }
        } else {
            q->bound_key = q->unnamed_key;
        }
        return;
    case 'E':
        if (!*now) *now = now_ns();
        qs_push(c, q->bound_key, *now, 'E', q->bound_params);
        return;
    case 'S':
        qs_push(c, 0, 0, 'S', 0);
        return;
    }
}

/* The row count a CommandComplete tag ends with (``SELECT 5``, ``INSERT 0 3``), or 0. */
static long long qs_rows(const unsigned char *tag, size_t n) {
    const unsigned char *end = memchr(tag, 0, n);
    size_t len = end ? (size_t)(end - tag) : n;
    size_t i = len;
    while (i > 0 && tag[i - 1] >= '0' && tag[i - 1] <= '9') i--;
    if (i == len || i == 0 || tag[i - 1] != ' ') return 0;
    long long rows = 0;
    for (; i < len && rows < (1LL << 56); i++) rows = rows * 10 + (tag[i] - '0');
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

static void qs_record(ConnObject *c, uint64_t key, int64_t started, int64_t now,
                      long long rows, const char *code, uint64_t params) {
    PoolObject *p = c->pool;
    QsClient *q = c->qs;
    if (!key || !p || !p->qs_on) return;
    QsEntry *e = qs_entry(p, key, c->params_id, NULL, 0);
    if (!e) return;
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
    if (p->burst_threshold > 0) qs_burst(c, key, params, now);
}

static void qs_pop(QsClient *q) {
    q->head = (q->head + 1) % QS_RING;
    q->count--;
    if (!q->count) q->lost = 0;
}

/* A server message ``t`` (``n`` of its body bytes at hand, ``whole``: all of them) for a
 * client with statements in flight: the answer to the one in front, maybe. */
static void qs_answer(ConnObject *c, unsigned char t, const unsigned char *body, size_t n,
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
        qs_record(c, front->key, front->started, now,
                  t == 'C' && whole ? qs_rows(body, n) : 0, NULL, front->params);
        qs_pop(q);
        q->last_answer = now;
        return;
    case 'E': {
        char code[6];
        qs_sqlstate(body, n, code);
        if (!now) now = now_ns();
        if (kind == 'Q') {
            if (!q->code[0]) memcpy(q->code, code, 6);
        } else if (kind == 'E') {
            qs_record(c, front->key, front->started, now, 0, code, front->params);
            qs_pop(q);
            q->last_answer = now;
        }
        return;
    }
    case 'Z':
        /* The Query it answers, or the Sync (and the Executes skipped after an error). */
        while (q->count) {
            const QsSlot *slot = &q->ring[q->head];
            char k = slot->kind;
            if (k == 'Q')
                qs_record(c, slot->key, slot->started, now, q->rows, q->code, slot->params);
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

/* The statements a linked client has in flight, for Python to time from here (eject_client):
 * ([(kind, key, started, params hash), ...], last answer, wait, rows, SQLSTATE) in the order
 * sent, times in seconds of CLOCK_MONOTONIC (Python's time.monotonic); None when nothing is
 * timed or the ring lost count (then Python skips the answers owed, as before). */
static PyObject *qs_inflight(ConnObject *c) {
    QsClient *q = c->qs;
    if (!q || q->lost) Py_RETURN_NONE;
    PyObject *entries = PyList_New(q->count);
    if (!entries) return NULL;
    for (int i = 0; i < q->count; i++) {
        const QsSlot *slot = &q->ring[(q->head + i) % QS_RING];
        PyObject *item = Py_BuildValue("(CKdK)", slot->kind, (unsigned long long)slot->key,
                                       (double)slot->started / 1e9,
                                       (unsigned long long)slot->params);
        if (!item) {
            Py_DECREF(entries);
            return NULL;
        }
        PyList_SET_ITEM(entries, i, item);
    }
    return Py_BuildValue("(NddLs)", entries, (double)q->last_answer / 1e9,
                         (double)q->wait_ns / 1e9, q->rows, q->code);
}

/* -- N+1 at the wire ------------------------------------------------------------------------
 * A client's burst: its statements with less than the pool's ``burst_window`` between one and
 * the next (a request's loop, a transaction). Python tells the engine which query shape each
 * key is (FastPool.set_shapes: key -> a small shape id per fingerprint and sqlcommenter
 * origin, learnt from the batches), and the engine counts, per burst and shape (up to
 * QS_BURST_SLOTS shapes), the executions whose parameters differ from the one before. When a
 * count reaches ``burst_threshold`` it notes an event for Python (take_bursts: shape, count,
 * params id, final 0); when the burst ends (the next statement after a gap, or the client
 * leaving the fast path) a shape that reached it is noted again with its final count
 * (final 1). The burst is kept on the client (QsBurst, 72 bytes, made at its first statement
 * of a known shape) between transactions. */
#define QS_BURST_SLOTS 4
#define QS_SHAPES 8192      /* keys whose shape the engine knows, per pool (a power of two) */
#define QS_SHAPES_FULL 6144 /* then the map starts again, and Python tells it anew */
#define QS_EVENTS 512       /* events per pool until Python takes them; more are dropped */

struct QsBurst {
    int64_t last;
    uint32_t shapes[QS_BURST_SLOTS];
    uint32_t counts[QS_BURST_SLOTS];
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
    uint32_t shape, count;
    long long params_id;
    int final;
} QsEvent;

struct QsEvents {
    QsEvent items[QS_EVENTS];
    int n;
    long long dropped;
};

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

static void qs_event(ConnObject *c, uint32_t shape, uint32_t count, int final) {
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
        if (b->shapes[i] && p && p->burst_threshold > 0 &&
            b->counts[i] >= (uint32_t)p->burst_threshold)
            qs_event(c, b->shapes[i], b->counts[i], 1);
        b->shapes[i] = b->counts[i] = 0;
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
    uint32_t shape = qs_shape_of(p, key);
    if (!shape) return;
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
        if (b->shapes[i] == shape) {
            if (b->last_params[i] != params) {
                b->last_params[i] = params;
                if (++b->counts[i] == (uint32_t)p->burst_threshold)
                    qs_event(c, shape, b->counts[i], 0);
            }
            return;
        }
        if (!b->shapes[i] && free_slot < 0) free_slot = i;
    }
    if (free_slot >= 0) {
        b->shapes[free_slot] = shape;
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

/* FastPool.take_bursts(): [(shape, count, params id, final)], then empty. */
static PyObject *pool_take_bursts(PoolObject *p, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out || !p->events) return out;
    QsEvents *ev = p->events;
    for (int i = 0; i < ev->n; i++) {
        QsEvent *e = &ev->items[i];
        PyObject *row = Py_BuildValue("(IILi)", e->shape, e->count, e->params_id, e->final);
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
    qs_table_clear(t);
    return out;
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

/* -- ejecting to Python ------------------------------------------------------------------ */
static PyObject *take_bytes(Buf *b) {
    PyObject *out = PyBytes_FromStringAndSize(b->p + b->start, (Py_ssize_t)buf_len(b));
    b->start = b->end = 0;
    buf_shrink(b);
    return out;
}

static double secs(int64_t ns) { return ns ? (double)ns / 1e9 : 0.0; }

/* The engine's list of fast clients holding part of a message: entered when a read leaves
 * bytes the fast path could not pass on yet, left when it is looked at and holds none (or
 * the connection leaves the fast path or closes). No reference is held: every way out of the
 * fast path and every close takes the connection off first. */
static void partial_remove(ConnObject *c) {
    if (!c->in_partial) return;
    EngineObject *e = c->engine;
    if (c->pt_prev) c->pt_prev->pt_next = c->pt_next; else e->partial_head = c->pt_next;
    if (c->pt_next) c->pt_next->pt_prev = c->pt_prev;
    c->pt_prev = c->pt_next = NULL;
    c->in_partial = 0;
}

/* Is ``c`` a fast client whose buffer holds a message it has not finished sending? (Bytes a
 * queued client or one waiting for quiet holds are complete messages: bounded by
 * query_wait_timeout and by its server's answers.) */
static int holds_partial(ConnObject *c) {
    return c->kind == KIND_CLIENT && c->mode == MODE_FAST && !(c->flags & (F_CLOSED | F_CLOSING)) &&
           (c->skip || (buf_len(&c->rb) && c->at != AT_WAITING && !(c->flags & F_EJECT_WANTED)));
}

static void partial_note(ConnObject *c) {
    if (!holds_partial(c)) {
        partial_remove(c);
        return;
    }
    if (c->in_partial) return;
    EngineObject *e = c->engine;
    c->pt_prev = NULL;
    c->pt_next = e->partial_head;
    if (e->partial_head) e->partial_head->pt_prev = c;
    e->partial_head = c;
    c->in_partial = 1;
}

static void qs_burst_free(ConnObject *c);

static void leave_fast(ConnObject *c) {
    qs_burst_free(c); /* before c->pool goes: its burst's last events are the pool's */
    partial_remove(c);
    queue_remove(c);
    Py_CLEAR(c->statements);
    Py_CLEAR(c->prepared);
    c->mode = MODE_SLOW;
    c->flags &= ~(F_THROTTLED | F_EJECT_WANTED | F_EJECT_STREAMED | F_ANSWERS_WAIT);
    c->skip = 0;
    PoolObject *p = c->pool;
    c->pool = NULL;
    Py_XDECREF(p);
}

static void fail_closed(ConnObject *c, ConnObject *s, const char *text);
static void fail_closed_code(ConnObject *c, ConnObject *s, const char *code, const char *text);
static void server_free(ConnObject *s);

/* Hand ``c`` (a client) and its server, if any, back to Python with their state. */
static void eject_client(ConnObject *c, ConnObject *server, int how) {
    PyObject *cb = NULL, *sb = NULL, *r = NULL;
    PoolObject *p = c->pool;
    if (!p) return;
    if (c->skip) {
        /* Mid-way through a Bind the client streams (see "streaming"): its server holds part
         * of a message and the client's next bytes are the rest of it, so neither can be
         * handed over: both are closed (claim() first, a phantom has no object yet). */
        if (claim(c) < 0) return;
        ConnObject *s = server ? server : c->peer;
        int server_gone = !s || (s->flags & (F_CLOSED | F_CLOSING));
        fail_closed_code(c, s, server_gone ? "08006" : "08P01",
                         server_gone ? "server closed the connection during a message"
                                     : "the connection cannot go on: a message was cut off "
                                       "while it was passed on to the server");
        return;
    }
    if (claim(c) < 0) {
        /* The client is gone (claim() dropped it). A server its caller took off the idle
         * list for it, not linked to it, goes back to the pool: to the next waiting client
         * or idle (a linked one was closed by claim(), as it may be mid-transaction). */
        if (server && server->mode == MODE_FAST && !server->peer && server->at == AT_NONE &&
            !(server->flags & (F_CLOSED | F_CLOSING))) {
            Py_INCREF(server);
            server_free(server);
            Py_DECREF(server);
        }
        return;
    }
    Py_INCREF(c);
    Py_INCREF(p);
    if (server) Py_INCREF(server);
    /* What it timed that is still in flight goes to Python, which times it to its answer. */
    PyObject *inflight = c->peer ? qs_inflight(c) : NULL;
    if (!inflight) {
        PyErr_Clear();
        inflight = Py_NewRef(Py_None);
    }
    if (c->peer) unlink_pair(c);
    int was_waiting = c->at == AT_WAITING;
    leave_fast(c);
    if (server && server->mode == MODE_FAST) leave_fast(server);
    if (was_waiting && how == EJECT_UNLINKED) how = EJECT_WAITING;
    cb = take_bytes(&c->rb);
    sb = server ? take_bytes(&server->rb) : PyBytes_FromStringAndSize(NULL, 0);
    PyObject *owed = cb && sb ? owed_record(c) : NULL;
    if (!owed) {
        report_error(c->engine);
        fail_closed(c, server, "pooler error: the connection could not be handed over");
        goto done;
    }
    /* c->txn is only ever I, T or E (server_pump refuses any other status). */
    char txn[2] = {c->txn == 'T' || c->txn == 'E' ? c->txn : 'I', 0};
    r = py_method(p->handler, "ejected", "OOiiisdddOOOOiO", c->protocol,
                            server ? server->protocol : Py_None, how, c->expected_rfq,
                            c->unsynced, txn, secs(c->query_started), secs(c->xact_started),
                            secs(c->idle_in_txn_since), cb, sb, PyTuple_GET_ITEM(owed, 0),
                            PyTuple_GET_ITEM(owed, 1),
                            server && (server->flags & F_FATAL_SEEN) ? 1 : 0, inflight);
    Py_DECREF(owed);
    if (!r) {
        /* Python could not take the pair over: neither is used again (fail closed). */
        report_error(c->engine);
        fail_closed(c, server, "pooler error: the connection could not be handed over");
        goto done;
    }
    c->expected_rfq = 0;
    c->unsynced = 0;
    c->query_started = c->xact_started = c->idle_in_txn_since = 0;
    owed_reset(c);
    update_events(c);
    if (server) update_events(server);
done:
    Py_XDECREF(inflight);
    Py_XDECREF(r);
    Py_XDECREF(cb);
    Py_XDECREF(sb);
    if (server) Py_DECREF(server);
    Py_DECREF(p);
    Py_DECREF(c);
}

/* A server the fast path cannot keep (held, too old, wanted by Python, unexpected bytes, due
 * for its health check). */
static void return_server(ConnObject *s) {
    PoolObject *p = s->pool;
    if (!p) return;
    Py_INCREF(s);
    Py_INCREF(p);
    leave_fast(s);
    PyObject *sb = take_bytes(&s->rb);
    PyObject *r = sb ? py_method(p->handler, "server_returned", "OOd", s->protocol, sb,
                                           secs(s->idle_since))
                     : NULL;
    if (!r) report_error(s->engine);
    Py_XDECREF(r);
    Py_XDECREF(sb);
    update_events(s);
    Py_DECREF(p);
    Py_DECREF(s);
}

/* -- failing closed ----------------------------------------------------------------------- *
 * When a server breaks the protocol (a ReadyForQuery status other than I/T/E, a length under
 * 4, a message type a server never sends mid-session) or a hand-back to Python fails, neither
 * connection of the pair can be trusted again: the server is closed (Python hears
 * connection_lost and replaces it), the client gets an ErrorResponse with a SQLSTATE and is
 * closed once it is written. Nothing of the pair is ever lent again. */
static void on_writable(ConnObject *c);
static void phantom_drop(ConnObject *c);
static void conn_close_fd(ConnObject *c);

/* A FATAL ErrorResponse to ``c`` (best effort: it is being closed anyway). */
static void send_fatal(ConnObject *c, const char *code, const char *text) {
    char msg[320];
    size_t tl = strnlen(text, 200), n = 5;
    n += (size_t)snprintf(msg + n, sizeof msg - n, "SFATAL%cVFATAL%cC%s%cM", 0, 0, code, 0);
    memcpy(msg + n, text, tl);
    n += tl;
    msg[n++] = 0;
    msg[n++] = 0;
    msg[0] = 'E';
    put_be32((unsigned char *)msg + 1, (uint32_t)(n - 1));
    if (conn_send(c, msg, n) < 0) c->wb.start = c->wb.end = 0;
}

/* Send the client a FATAL error and close it (once written); Python hears connection_lost. */
static void refuse_client(ConnObject *c, const char *code, const char *text) {
    if (c->flags & (F_CLOSED | F_CLOSING)) return;
    Py_INCREF(c);
    if (c->mode == MODE_FAST) leave_fast(c);
    owed_reset(c);
    c->expected_rfq = c->unsynced = 0;
    c->rb.start = c->rb.end = 0;
    buf_shrink(&c->rb);
    send_fatal(c, code, text);
    if (c->flags & F_PHANTOM) {
        phantom_drop(c);
    } else {
        c->flags |= F_CLOSING;
        if (!buf_len(&c->wb)) on_writable(c); else update_events(c);
    }
    Py_DECREF(c);
}

/* Close the pair (either may be NULL) as above; ``text`` is what the client is told. */
static void fail_closed(ConnObject *c, ConnObject *s, const char *text) {
    fail_closed_code(c, s, "08006", text);
}

/* The same, the client told ``code`` (a SQLSTATE). */
static void fail_closed_code(ConnObject *c, ConnObject *s, const char *code, const char *text) {
    if (c) Py_INCREF(c);
    if (s) Py_INCREF(s);
    if (c && c->peer) unlink_pair(c);
    if (s && s->peer) unlink_pair(s->peer);
    if (s && !(s->flags & F_CLOSED)) {
        if (s->mode == MODE_FAST) leave_fast(s);
        conn_close_fd(s);
        PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "s", text);
        PyObject *r = py_method(s->protocol, "connection_lost", "O", exc ? exc : Py_None);
        if (!r) report_error(s->engine);
        Py_XDECREF(r);
        Py_XDECREF(exc);
        PyErr_Clear();
        drop_engine_ref(s);
    }
    if (c) refuse_client(c, code, text);
    if (s) Py_DECREF(s);
    if (c) Py_DECREF(c);
}

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
                break;
            }
            pos += 6;
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
        owed_answer(c, t);
        pos += 5;
        s->skip = (size_t)len - 4;
    }
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

/* -- login: SCRAM-SHA-256 in the engine ------------------------------------------------------
 * The client side of a SCRAM login (RFC 5802 / 7677), as PostgreSQL's auth-scram.c and the
 * Python ScramAuth in auth.py parse it: no channel binding (flags n and y only), no
 * authorization identity, the user name inside SCRAM ignored, extensions refused in the first
 * message. Python decides who may log in and with which secret (scram_login); the engine runs
 * the two round trips and calls protocol.scram_passed(final_message, client_key, rest) or
 * protocol.scram_failed(kind, text); a malformed first message goes back to Python's parser
 * (protocol.scram_first_refused), which words the refusal. Hashing is the engine's own
 * (SHA-256 below): a login hashes a few hundred bytes. */
#define SCRAM_KEY_LEN 32
#define SCRAM_NONCE_BYTES 18 /* as PostgreSQL: base64 of 18 random bytes */
#define SASL_MAX_BODY 65536  /* as PostgreSQL's cap on SASL tokens */

struct Scram {
    int stage; /* 1: waiting for SASLInitialResponse, 2: for the SASLResponse */
    int valid; /* 0: the exchange runs to its end, then fails (unknown user, empty secret) */
    unsigned char stored_key[SCRAM_KEY_LEN], server_key[SCRAM_KEY_LEN];
    PyObject *salt_b64; /* bytes */
    long iterations;
    char gs2[4];
    PyObject *client_first_bare, *server_first, *nonce; /* bytes */
};

/* The strict base64 decoder, called as a C function: binascii.a2b_base64(strict_mode=True)
 * is what base64.b64decode(validate=True) runs for bytes (auth.py's call). */
static PyObject *py_b64decode;
static PyObject *kw_validate; /* {"strict_mode": True} */

/* SHA-256 and HMAC-SHA-256 for the SCRAM proof and signature: OpenSSL's when the engine is
 * built with it (PGPILOT_TLS), through objects made once at import and reused. OpenSSL 3
 * looks an algorithm up again on every one-shot call (EVP_Q_mac, EVP_Digest with a name),
 * which cost more than the hashing itself, about 12 % of the pooler's CPU per new connection
 * (perf, pgbench -C with SCRAM): the algorithms are fetched once (EVP_MD_fetch,
 * EVP_MAC_fetch) and one digest context and one HMAC context (its digest set once) are
 * re-initialised per use. These contexts are the process's, and safe so: each use runs from
 * init to final with the GIL held and no call that can run Python in between (every caller
 * below), so no other use can interleave. Keys leave no copy: the HMAC context is set to
 * the empty key after each use (its state is derived from the key); our own buffers are
 * wiped with OPENSSL_cleanse.
 * A build without OpenSSL's headers (setup.py without libssl-dev) keeps the engine's own
 * SHA-256 (FIPS 180-4) and HMAC (RFC 2104) below. Both are checked against hashlib and hmac
 * by tests/proxy/test_fastlogin.py. */
#ifdef PGPILOT_TLS
#include <openssl/crypto.h>
#include <openssl/evp.h>
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/core_names.h>
#include <openssl/params.h>
static EVP_MD *scram_md;          /* SHA-256, fetched once */
static EVP_MAC *scram_mac;        /* HMAC, fetched once */
static EVP_MAC_CTX *scram_mac_ctx; /* HMAC-SHA-256: its digest set once, a key per use */
#else
#include <openssl/hmac.h>
static const EVP_MD *scram_md;
static HMAC_CTX *scram_mac_ctx;
#endif
static EVP_MD_CTX *scram_md_ctx;

/* At import: the algorithms and the two contexts. -1 with an exception. */
static int scram_hash_init(void) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    scram_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    scram_mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    scram_mac_ctx = scram_mac ? EVP_MAC_CTX_new(scram_mac) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end()};
    if (scram_mac_ctx && !EVP_MAC_CTX_set_params(scram_mac_ctx, params)) {
        EVP_MAC_CTX_free(scram_mac_ctx);
        scram_mac_ctx = NULL;
    }
#else
    scram_md = EVP_sha256();
    scram_mac_ctx = HMAC_CTX_new();
#endif
    scram_md_ctx = EVP_MD_CTX_new();
    if (!scram_md || !scram_mac_ctx || !scram_md_ctx) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256 or HMAC for SCRAM");
        return -1;
    }
    return 0;
}

/* A failure inside OpenSSL (no memory) is told to the caller, which ends the login with an
 * internal error rather than judging the proof. */
/* SHA-256 of ``n`` bytes. 0, or -1 if OpenSSL failed (``out`` zeroed). */
static int sha256(const unsigned char *data, size_t n, unsigned char out[32]) {
    unsigned int got = 0;
    if (EVP_DigestInit_ex(scram_md_ctx, scram_md, NULL) &&
        EVP_DigestUpdate(scram_md_ctx, data, n) &&
        EVP_DigestFinal_ex(scram_md_ctx, out, &got) && got == 32)
        return 0;
    ERR_clear_error();
    memset(out, 0, 32);
    return -1;
}

/* HMAC-SHA-256 of ``n`` bytes under ``key``. 0, or -1 if OpenSSL failed (``out`` zeroed). */
static int hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *msg,
                       size_t n, unsigned char out[32]) {
    int ok;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    size_t got = 0;
    /* A zero-length key must still be a key (NULL would mean "keep the last one"). */
    static const unsigned char no_key[1];
    ok = EVP_MAC_init(scram_mac_ctx, key_len ? key : no_key, key_len, NULL) &&
         EVP_MAC_update(scram_mac_ctx, msg, n) &&
         EVP_MAC_final(scram_mac_ctx, out, &got, 32) && got == 32;
    /* The context keeps the padded key's hash states until its next init: that is a copy of
     * StoredKey or ServerKey, so it is replaced by the empty key's now. */
    EVP_MAC_init(scram_mac_ctx, no_key, 0, NULL);
#else
    unsigned int got = 0;
    ok = HMAC_Init_ex(scram_mac_ctx, key, (int)key_len, scram_md, NULL) &&
         HMAC_Update(scram_mac_ctx, msg, n) && HMAC_Final(scram_mac_ctx, out, &got) &&
         got == 32;
    HMAC_CTX_reset(scram_mac_ctx); /* cleanses the key's states (see above) */
#endif
    if (ok) return 0;
    ERR_clear_error();
    memset(out, 0, 32);
    return -1;
}

#define HMAC_MAX_KEY ((size_t)PY_SSIZE_T_MAX)
#define wipe OPENSSL_cleanse

#else /* no OpenSSL: the engine's own */

static int scram_hash_init(void) { return 0; }
#define HMAC_MAX_KEY ((size_t)64)
#define wipe explicit_bzero

typedef struct {
    uint32_t h[8];
    uint64_t length; /* bytes hashed so far */
    unsigned char block[64];
    size_t used;
} Sha256;

static const uint32_t SHA256_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static inline uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_compress(uint32_t h[8], const unsigned char *block) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) w[i] = be32(block + 4 * i);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) +
                      SHA256_K[i] + w[i];
        uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

static void sha256_init(Sha256 *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->length = 0;
    s->used = 0;
}

static void sha256_update(Sha256 *s, const unsigned char *data, size_t n) {
    s->length += n;
    if (s->used) {
        size_t take = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->block + s->used, data, take);
        s->used += take, data += take, n -= take;
        if (s->used < 64) return;
        sha256_compress(s->h, s->block);
        s->used = 0;
    }
    for (; n >= 64; data += 64, n -= 64) sha256_compress(s->h, data);
    memcpy(s->block, data, n);
    s->used = n;
}

static void sha256_final(Sha256 *s, unsigned char out[32]) {
    uint64_t bits = s->length * 8;
    s->block[s->used++] = 0x80;
    if (s->used > 56) {
        memset(s->block + s->used, 0, 64 - s->used);
        sha256_compress(s->h, s->block);
        s->used = 0;
    }
    memset(s->block + s->used, 0, 56 - s->used);
    for (int i = 0; i < 8; i++) s->block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_compress(s->h, s->block);
    for (int i = 0; i < 8; i++) put_be32(out + 4 * i, s->h[i]);
}

static int sha256(const unsigned char *data, size_t n, unsigned char out[32]) {
    Sha256 s;
    sha256_init(&s);
    sha256_update(&s, data, n);
    sha256_final(&s, out);
    explicit_bzero(&s, sizeof s);
    return 0;
}

/* HMAC-SHA-256 of ``n`` bytes under a key of at most 64 bytes (SCRAM's are 32). */
static int hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *msg,
                        size_t n, unsigned char out[32]) {
    unsigned char pad[64], inner[32];
    Sha256 s;
    memset(pad, 0x36, sizeof pad);
    for (size_t i = 0; i < key_len; i++) pad[i] ^= key[i];
    sha256_init(&s);
    sha256_update(&s, pad, 64);
    sha256_update(&s, msg, n);
    sha256_final(&s, inner);
    for (size_t i = 0; i < 64; i++) pad[i] ^= 0x36 ^ 0x5c;
    sha256_init(&s);
    sha256_update(&s, pad, 64);
    sha256_update(&s, inner, 32);
    sha256_final(&s, out);
    /* The padded key and the inner hash are secrets too: not left on the stack. */
    explicit_bzero(pad, sizeof pad);
    explicit_bzero(inner, sizeof inner);
    explicit_bzero(&s, sizeof s);
    return 0;
}
#endif

/* The engine's SHA-256 and HMAC-SHA-256, for the tests. */
static PyObject *mod_hmac_sha256(PyObject *mod, PyObject *args) {
    Py_buffer key, msg;
    if (!PyArg_ParseTuple(args, "y*y*", &key, &msg)) return NULL;
    unsigned char out[32];
    if ((size_t)key.len > HMAC_MAX_KEY) {
        PyErr_SetString(PyExc_ValueError, "keys longer than a block are not supported");
    } else if (hmac_sha256(key.buf, (size_t)key.len, msg.buf, (size_t)msg.len, out) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "HMAC-SHA-256 failed");
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&msg);
    if (PyErr_Occurred()) return NULL;
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *mod_sha256(PyObject *mod, PyObject *arg) {
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    unsigned char out[32];
    int failed = sha256(data.buf, (size_t)data.len, out) < 0;
    PyBuffer_Release(&data);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "SHA-256 failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

/* base64 (RFC 4648, with padding) of ``n`` bytes, as a bytes object. */
static PyObject *b64encode(const unsigned char *data, size_t n) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((n + 2) / 3 * 4));
    if (!out) return NULL;
    char *o = PyBytes_AS_STRING(out);
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16 | (uint32_t)data[i + 1] << 8 | data[i + 2];
        *o++ = abc[v >> 18], *o++ = abc[(v >> 12) & 63], *o++ = abc[(v >> 6) & 63];
        *o++ = abc[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)data[i] << 16 | (i + 1 < n ? (uint32_t)data[i + 1] << 8 : 0);
        *o++ = abc[v >> 18], *o++ = abc[(v >> 12) & 63];
        *o++ = i + 1 < n ? abc[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    return out;
}

/* The engine's base64, for the tests. */
static PyObject *mod_b64encode(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = b64encode(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return r;
}

/* The concatenation of ``k`` byte strings, as a bytes object. */
static PyObject *join_bytes(int k, const char *const *parts, const size_t *lens) {
    size_t total = 0;
    for (int i = 0; i < k; i++) total += lens[i];
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    for (int i = 0; i < k; i++) {
        memcpy(p, parts[i], lens[i]);
        p += lens[i];
    }
    return out;
}

#define BYTES_PART(o) PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)

static void scram_free(ConnObject *c) {
    Scram *sc = c->scram;
    if (!sc) return;
    c->scram = NULL;
    Py_XDECREF(sc->salt_b64);
    Py_XDECREF(sc->client_first_bare);
    Py_XDECREF(sc->server_first);
    Py_XDECREF(sc->nonce);
    wipe(sc, sizeof *sc); /* StoredKey and ServerKey */
    PyMem_Free(sc);
}

static int is_scram_printable(const char *s, size_t n) {
    if (!n) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x21 || ch > 0x7e || ch == ',') return 0;
    }
    return 1;
}

/* An attribute "x=..." with x an ASCII letter (auth.py's _is_attr). */
static int is_attr(const char *s, size_t n) {
    return n >= 2 && s[1] == '=' &&
           ((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z'));
}

static int valid_utf8(const char *s, size_t n) {
    PyObject *u = PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "strict");
    if (!u) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(u);
    return 1;
}

/* How a login failed, for protocol.scram_failed(kind, text). */
#define SCRAM_WRONG 0     /* wrong proof, unknown user: 28P01 */
#define SCRAM_MALFORMED 1 /* 08P01, "protocol violation: " + text */
#define SCRAM_VERBATIM 2  /* 08P01, the text as it is */
#define SCRAM_INTERNAL 3  /* the engine could not go on (no memory, no randomness) */

/* Tell Python the login failed; the engine's part of it is over. ``text`` may be NULL
 * (SCRAM_WRONG: Python words it) or, if building it failed, an exception is pending. */
static void scram_failed_text(ConnObject *c, int kind, PyObject *text) {
    if (!text && PyErr_Occurred()) {
        report_error(c->engine);
        kind = SCRAM_INTERNAL;
    }
    scram_free(c);
    if (claim(c) < 0) return;
    Py_INCREF(c);
    PyObject *r = py_method(c->protocol, "scram_failed", "iO", kind,
                                      text ? text : Py_None);
    if (!r) report_error(c->engine);
    Py_XDECREF(r);
    Py_DECREF(c);
}

static void scram_failed(ConnObject *c, int kind, const char *message) {
    PyObject *text = message ? PyUnicode_FromString(message) : NULL;
    scram_failed_text(c, kind, text);
    Py_XDECREF(text);
}

/* A SASLInitialResponse the engine will not take: Python's own parser (auth.ScramAuth) reads
 * it again and says what is wrong, so both paths refuse it in the same words. */
static void scram_refuse_first(ConnObject *c, const char *body, size_t n) {
    scram_free(c);
    if (claim(c) < 0) return;
    Py_INCREF(c);
    PyObject *r = py_method(c->protocol, "scram_first_refused", "y#", body,
                                      (Py_ssize_t)n);
    if (!r) report_error(c->engine);
    Py_XDECREF(r);
    Py_DECREF(c);
}

static PyObject *auth_message(int code, const char *data, size_t n) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(9 + n));
    if (!out) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    uint32_t len = (uint32_t)(8 + n);
    p[0] = 'R';
    p[1] = len >> 24, p[2] = len >> 16, p[3] = len >> 8, p[4] = len;
    p[5] = 0, p[6] = 0, p[7] = 0, p[8] = (unsigned char)code;
    memcpy(p + 9, data, n);
    return out;
}

/* SASLInitialResponse: answer with server-first-message. 0, or -1 once failed (reported). */
static int scram_first(ConnObject *c, const char *body, size_t n) {
    Scram *sc = c->scram;
    const char *mech_end = memchr(body, 0, n);
    if (!mech_end || (size_t)(mech_end - body) + 5 > n) goto refuse;
    if (strcmp(body, "SCRAM-SHA-256") != 0) goto refuse;
    const unsigned char *lp = (const unsigned char *)mech_end + 1;
    int32_t dlen = (int32_t)be32(lp);
    const char *data = (const char *)lp + 4;
    size_t avail = n - (size_t)(data - body);
    if (dlen == -1) dlen = 0;
    if (dlen < 0 || (size_t)dlen != avail) goto refuse;
    size_t len = (size_t)dlen;
    if (!valid_utf8(data, len)) goto refuse;
    if (len && data[0] == 'p') goto refuse;
    if (len < 2 || (data[0] != 'n' && data[0] != 'y') || data[1] != ',') goto refuse;
    if (len >= 3 && data[2] == 'a') goto refuse;
    if (len < 3 || data[2] != ',') goto refuse;
    memcpy(sc->gs2, data, 3);
    sc->gs2[3] = 0;
    const char *bare = data + 3, *end = data + len;
    /* bare: n=<user>,r=<nonce>[,attr...] */
    const char *comma = memchr(bare, ',', (size_t)(end - bare));
    if (!comma || comma - bare < 2 || bare[0] != 'n' || bare[1] != '=') goto refuse;
    const char *r = comma + 1;
    const char *r_end = memchr(r, ',', (size_t)(end - r));
    if (!r_end) r_end = end;
    if (r_end - r >= 2 && r[0] == 'm' && r[1] == '=') goto refuse;
    if (r_end - r < 2 || r[0] != 'r' || r[1] != '=') goto refuse;
    if (!is_scram_printable(r + 2, (size_t)(r_end - r - 2))) goto refuse;
    for (const char *a = r_end; a < end;) {
        const char *start = a + 1, *stop = memchr(start, ',', (size_t)(end - start));
        if (!stop) stop = end;
        if (!is_attr(start, (size_t)(stop - start))) goto refuse;
        a = stop;
    }
    unsigned char random[SCRAM_NONCE_BYTES];
    size_t got = 0;
    while (got < sizeof random) {
        ssize_t k = getrandom(random + got, sizeof random - got, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            PyErr_SetFromErrno(PyExc_OSError);
            report_error(c->engine);
            scram_failed(c, SCRAM_INTERNAL, "no random bytes for the SCRAM nonce");
            return -1;
        }
        got += (size_t)k;
    }
    PyObject *server_nonce = b64encode(random, sizeof random);
    if (!server_nonce) goto error;
    sc->client_first_bare = PyBytes_FromStringAndSize(bare, end - bare);
    {
        const char *parts[] = {r + 2, PyBytes_AS_STRING(server_nonce)};
        size_t lens[] = {(size_t)(r_end - r - 2), (size_t)PyBytes_GET_SIZE(server_nonce)};
        sc->nonce = join_bytes(2, parts, lens);
    }
    Py_DECREF(server_nonce);
    if (!sc->client_first_bare || !sc->nonce) goto error;
    {
        char iters[32];
        int il = snprintf(iters, sizeof iters, "%ld", sc->iterations);
        const char *parts[] = {"r=", PyBytes_AS_STRING(sc->nonce), ",s=",
                               PyBytes_AS_STRING(sc->salt_b64), ",i=", iters};
        size_t lens[] = {2, (size_t)PyBytes_GET_SIZE(sc->nonce), 3,
                         (size_t)PyBytes_GET_SIZE(sc->salt_b64), 3, (size_t)il};
        sc->server_first = join_bytes(6, parts, lens);
    }
    if (!sc->server_first) goto error;
    PyObject *msg = auth_message(11, BYTES_PART(sc->server_first));
    if (!msg) goto error;
    sc->stage = 2;
    int sent = conn_send(c, PyBytes_AS_STRING(msg), (size_t)PyBytes_GET_SIZE(msg));
    Py_DECREF(msg);
    if (sent < 0) {
        lost_errno(c, errno);
        return -1;
    }
    return 0;
error:
    report_error(c->engine);
    scram_failed(c, SCRAM_INTERNAL, "SCRAM exchange failed");
    return -1;
refuse:
    scram_refuse_first(c, body, n);
    return -1;
}

/* SASLResponse (client-final-message): check the proof. Always ends the engine's part. */
static void scram_final(ConnObject *c, const char *data, size_t len) {
    Scram *sc = c->scram;
    PyObject *cbind = NULL, *authmsg = NULL, *proof = NULL, *key = NULL;
    PyObject *final = NULL, *sig_b64 = NULL, *r = NULL;
    /* Secrets on the stack: wiped at the end, whichever way it ends. */
    unsigned char client_sig[SCRAM_KEY_LEN], client_key[SCRAM_KEY_LEN], server_sig[SCRAM_KEY_LEN];
    unsigned char d[SCRAM_KEY_LEN];
    if (!valid_utf8(data, len)) {
        scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: invalid UTF-8");
        return;
    }
    const char *end = data + len;
    /* c=<b64(gs2)>,r=<nonce>[,attr...],p=<proof>: the proof last, nothing after it */
    cbind = b64encode((const unsigned char *)sc->gs2, 3);
    if (!cbind) goto error;
    const char *p0_end = memchr(data, ',', len);
    size_t cb_len = (size_t)PyBytes_GET_SIZE(cbind);
    if (!p0_end || (size_t)(p0_end - data) != cb_len + 2 || data[0] != 'c' || data[1] != '=' ||
        memcmp(data + 2, PyBytes_AS_STRING(cbind), cb_len) != 0) {
        scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: unexpected channel-binding attribute");
        goto done;
    }
    const char *p1 = p0_end + 1, *p1_end = memchr(p1, ',', (size_t)(end - p1));
    size_t nonce_len = (size_t)PyBytes_GET_SIZE(sc->nonce);
    if (!p1_end || (size_t)(p1_end - p1) != nonce_len + 2 || p1[0] != 'r' || p1[1] != '=' ||
        memcmp(p1 + 2, PyBytes_AS_STRING(sc->nonce), nonce_len) != 0) {
        scram_failed(c, SCRAM_MALFORMED, p1_end ? "malformed SCRAM message: nonce does not match"
                                  : "malformed SCRAM message: unexpected channel-binding "
                                    "attribute");
        goto done;
    }
    const char *proof_at = NULL, *without_proof_end = NULL;
    for (const char *a = p1_end; a < end;) {
        const char *start = a + 1, *stop = memchr(start, ',', (size_t)(end - start));
        if (!stop) stop = end;
        if (!is_attr(start, (size_t)(stop - start))) {
            scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: invalid attribute");
            goto done;
        }
        if (!proof_at && start[0] == 'p') {
            proof_at = start;
            without_proof_end = a;
        }
        a = stop;
    }
    if (!proof_at || memchr(proof_at, ',', (size_t)(end - proof_at))) {
        scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: proof expected as the last attribute");
        goto done;
    }
    PyObject *dargs = Py_BuildValue("(y#)", proof_at + 2, (Py_ssize_t)(end - proof_at - 2));
    proof = dargs ? PyObject_Call(py_b64decode, dargs, kw_validate) : NULL;
    Py_XDECREF(dargs);
    if (!proof) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) goto error;
        PyErr_Clear(); /* binascii.Error */
        scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: invalid proof encoding");
        goto done;
    }
    if (PyBytes_GET_SIZE(proof) != SCRAM_KEY_LEN) {
        scram_failed(c, SCRAM_MALFORMED, "malformed SCRAM message: invalid proof length");
        goto done;
    }
    {
        const char *parts[] = {PyBytes_AS_STRING(sc->client_first_bare), ",",
                               PyBytes_AS_STRING(sc->server_first), ",", data};
        size_t lens[] = {(size_t)PyBytes_GET_SIZE(sc->client_first_bare), 1,
                         (size_t)PyBytes_GET_SIZE(sc->server_first), 1,
                         (size_t)(without_proof_end - data)};
        authmsg = join_bytes(5, parts, lens);
    }
    if (!authmsg) goto error;
    const unsigned char *am = (const unsigned char *)PyBytes_AS_STRING(authmsg);
    size_t am_len = (size_t)PyBytes_GET_SIZE(authmsg);
    if (hmac_sha256(sc->stored_key, SCRAM_KEY_LEN, am, am_len, client_sig) < 0) goto failed;
    const unsigned char *pr = (const unsigned char *)PyBytes_AS_STRING(proof);
    for (int i = 0; i < SCRAM_KEY_LEN; i++) client_key[i] = pr[i] ^ client_sig[i];
    if (sha256(client_key, SCRAM_KEY_LEN, d) < 0) goto failed;
    /* Constant time, as hmac.compare_digest. */
    unsigned char diff = 0;
    for (int i = 0; i < SCRAM_KEY_LEN; i++) diff |= d[i] ^ sc->stored_key[i];
    if (diff || !sc->valid) {
        scram_failed(c, SCRAM_WRONG, NULL);
        goto done;
    }
    if (hmac_sha256(sc->server_key, SCRAM_KEY_LEN, am, am_len, server_sig) < 0) goto failed;
    sig_b64 = b64encode(server_sig, SCRAM_KEY_LEN);
    if (!sig_b64) goto error;
    {
        const char *parts[] = {"v=", PyBytes_AS_STRING(sig_b64)};
        size_t lens[] = {2, (size_t)PyBytes_GET_SIZE(sig_b64)};
        PyObject *v = join_bytes(2, parts, lens);
        final = v ? auth_message(12, BYTES_PART(v)) : NULL;
        Py_XDECREF(v);
    }
    if (!final) goto error;
    scram_free(c);
    if (c->flags & F_PHANTOM) {
        route_welcome(c, final);
        goto done;
    }
    /* What the client sent behind its last SASL message is its first query: Python keeps
     * it for after the welcome. */
    key = PyBytes_FromStringAndSize((const char *)client_key, SCRAM_KEY_LEN);
    PyObject *rest = key ? take_bytes(&c->rb) : NULL;
    r = rest ? py_method(c->protocol, "scram_passed", "OOO", final, key, rest) : NULL;
    Py_XDECREF(rest);
    if (!r) {
        /* The exchange is over (its state is freed): the client must not wait for an
         * answer nobody will send. */
        report_error(c->engine);
        refuse_client(c, "XX000", "pooler error: the login could not be completed");
    }
    goto done;
failed: /* inside OpenSSL (no memory): no verdict on the proof */
    scram_failed(c, SCRAM_INTERNAL, "SCRAM exchange failed");
    goto done;
error:
    report_error(c->engine);
    scram_failed(c, SCRAM_INTERNAL, "SCRAM exchange failed");
done:
    wipe(client_sig, sizeof client_sig);
    wipe(client_key, sizeof client_key);
    wipe(server_sig, sizeof server_sig);
    wipe(d, sizeof d);
    /* The proof and ClientKey objects are ours alone (made here, never shared): wiped too. */
    if (proof && Py_REFCNT(proof) == 1) wipe(PyBytes_AS_STRING(proof), PyBytes_GET_SIZE(proof));
    if (key && Py_REFCNT(key) == 1) wipe(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    Py_XDECREF(cbind);
    Py_XDECREF(authmsg);
    Py_XDECREF(proof);
    Py_XDECREF(key);
    Py_XDECREF(final);
    Py_XDECREF(sig_b64);
    Py_XDECREF(r);
}

/* Bytes of a client in a SCRAM login: whole password messages are answered here. */
static void scram_pump(ConnObject *c) {
    Py_INCREF(c);
    while (c->scram && !(c->flags & (F_CLOSED | F_CLOSING)) && buf_len(&c->rb) >= 5) {
        const unsigned char *p = (const unsigned char *)c->rb.p + c->rb.start;
        uint32_t len = be32(p + 1);
        /* Checked in the order, and told in the words, of Python's MessageReader. */
        if ((int32_t)len < 4 || len > SASL_MAX_BODY + 4) {
            PyObject *t = PyUnicode_FromOrdinal(p[0]);
            PyObject *text =
                !t ? NULL
                : (int32_t)len < 4
                    ? PyUnicode_FromFormat("invalid message length %d for message type %R",
                                           (int)(int32_t)len, t)
                    : PyUnicode_FromFormat("message type %R of %d bytes exceeds the limit of "
                                           "%d bytes", t, (int)(len - 4), SASL_MAX_BODY);
            Py_XDECREF(t);
            scram_failed_text(c, SCRAM_MALFORMED, text);
            Py_XDECREF(text);
            break;
        }
        if (p[0] != 'p') {
            scram_failed(c, SCRAM_VERBATIM, "expected a password message during authentication");
            break;
        }
        if (buf_len(&c->rb) < 1 + (size_t)len) break;
        size_t blen = len - 4;
        char *body = PyMem_Malloc(blen + 1);
        if (!body) {
            PyErr_NoMemory();
            report_error(c->engine);
            scram_failed(c, SCRAM_INTERNAL, "out of memory");
            break;
        }
        memcpy(body, p + 5, blen);
        body[blen] = 0;
        wipe((char *)p + 5, blen); /* the read buffer keeps no proof */
        c->rb.start += 1 + (size_t)len;
        if (c->scram->stage == 1)
            scram_first(c, body, blen);
        else
            scram_final(c, body, blen);
        wipe(body, blen);
        PyMem_Free(body);
    }
    /* Failed: the client is being closed; nothing it sent after matters. */
    if (!c->scram && (c->flags & (F_CLOSED | F_CLOSING))) {
        c->rb.start = c->rb.end = 0;
        buf_shrink(&c->rb);
    }
    Py_DECREF(c);
}

/* Bytes of the exchange that reached Python first (sent behind the StartupMessage, which
 * Python read): the engine takes them as if read from the socket. */
static PyObject *conn_scram_feed(ConnObject *c, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    int ok = c->scram && !(c->flags & (F_CLOSED | F_CLOSING));
    int appended = ok && buf_append(&c->rb, view.buf, (size_t)view.len) == 0;
    PyBuffer_Release(&view);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "no SCRAM exchange under way on this connection");
        return NULL;
    }
    if (!appended) return NULL;
    scram_pump(c);
    Py_RETURN_NONE;
}

/* Start the engine's SCRAM exchange for client ``c``: the AuthenticationSASL message to send,
 * or NULL with an exception. */
static PyObject *scram_start(ConnObject *c, const void *stored, Py_ssize_t stored_len,
                             const void *server, Py_ssize_t server_len, PyObject *salt_b64,
                             long iterations, int valid) {
    if (stored_len != SCRAM_KEY_LEN || server_len != SCRAM_KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "SCRAM keys are 32 bytes");
        return NULL;
    }
    if (c->kind != KIND_CLIENT || c->mode != MODE_SLOW || c->scram) {
        PyErr_SetString(PyExc_RuntimeError, "not a client connection waiting for its login");
        return NULL;
    }
    Scram *sc = PyMem_Calloc(1, sizeof(Scram));
    if (!sc) return PyErr_NoMemory();
    sc->stage = 1;
    sc->valid = valid;
    memcpy(sc->stored_key, stored, SCRAM_KEY_LEN);
    memcpy(sc->server_key, server, SCRAM_KEY_LEN);
    sc->salt_b64 = Py_NewRef(salt_b64);
    sc->iterations = iterations;
    c->scram = sc;
    static const char mechanisms[] = "SCRAM-SHA-256\0";
    return auth_message(10, mechanisms, sizeof mechanisms); /* the list ends with an empty name */
}

/* Answer a client's SCRAM login in the engine (see above); returns the AuthenticationSASL
 * message for Python to send. */
static PyObject *conn_scram_login(ConnObject *c, PyObject *args) {
    Py_buffer stored, server;
    PyObject *salt_b64;
    long iterations;
    int valid;
    if (!PyArg_ParseTuple(args, "y*y*O!lp", &stored, &server, &PyBytes_Type, &salt_b64,
                          &iterations, &valid))
        return NULL;
    PyObject *out = scram_start(c, stored.buf, stored.len, server.buf, server.len, salt_b64,
                                iterations, valid);
    PyBuffer_Release(&stored);
    PyBuffer_Release(&server);
    return out;
}

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

/* -- reading ----------------------------------------------------------------------------- */
static void conn_close_fd(ConnObject *c) {
    if (c->flags & F_CLOSED) return;
    tls_close(c);
    partial_remove(c);
    c->flags |= F_CLOSED;
    if (c->registered) {
        epoll_ctl(c->engine->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        c->registered = 0;
    }
    close(c->fd);
    c->fd = -1;
    buf_free(&c->rb);
    buf_free(&c->wb);
    scram_free(c);
    c->engine->n_conns--;
    if (c->flags & F_COUNTED) uncount_client(c);
    /* Siblings hand no more clients to a worker that serves none on the engine. */
    if (c == c->engine->handoff_listener && c->engine->counters)
        counter_set(c->engine, c->engine->me, SLOT_ACCEPTING, 0);
}

/* The connection broke or the peer closed it: Python is told, as by an asyncio transport. */
static void conn_lost(ConnObject *c, PyObject *exc) {
    if (c->flags & F_CLOSED) return;
    if (c->flags & F_PHANTOM) {
        /* A phantom that leaves between transactions (the usual way: Terminate) is gone
         * without Python; one that leaves a server mid-transaction is claimed first, so that
         * Python takes the server back as for any client. */
        if (!c->peer) {
            phantom_drop(c);
            return;
        }
        if (claim(c) < 0) return;
    }
    Py_INCREF(c);
    if (c->mode == MODE_FAST) {
        if (c->kind == KIND_CLIENT) {
            eject_client(c, c->peer, c->peer ? EJECT_LINKED : EJECT_UNLINKED);
        } else if (c->peer) {
            eject_client(c->peer, c, EJECT_LINKED);
        } else {
            /* An idle server: no bytes to pass on; Python gets it back, then hears it died. */
            PoolObject *p = c->pool;
            Py_INCREF(p);
            leave_fast(c);
            PyObject *r = py_method(p->handler, "server_returned", "Oy#d", c->protocol,
                                              "", (Py_ssize_t)0, 0.0);
            if (!r) report_error(c->engine);
            Py_XDECREF(r);
            Py_DECREF(p);
        }
    }
    if (!(c->flags & F_CLOSED)) {
        conn_close_fd(c);
        PyObject *r = py_method(c->protocol, "connection_lost", "O",
                                          exc ? exc : Py_None);
        if (!r) report_error(c->engine);
        Py_XDECREF(r);
        drop_engine_ref(c);
    }
    Py_DECREF(c);
}

static void lost_errno(ConnObject *c, int err) {
    PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "is", err, strerror(err));
    if (!exc) PyErr_Clear();
    conn_lost(c, exc);
    Py_XDECREF(exc);
}

static ConnObject *new_conn(EngineObject *e, int fd, PyObject *protocol, PyObject *extra,
                            int kind);

/* An IP address's host text and port; 0 (and nothing set) for any other family. */
static int host_and_port(const struct sockaddr *a, char host[INET6_ADDRSTRLEN], int *port) {
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)a;
        if (!inet_ntop(AF_INET, &in->sin_addr, host, INET6_ADDRSTRLEN)) host[0] = 0;
        *port = ntohs(in->sin_port);
        return 1;
    }
    if (a->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
        if (!inet_ntop(AF_INET6, &in6->sin6_addr, host, INET6_ADDRSTRLEN)) host[0] = 0;
        *port = ntohs(in6->sin6_port);
        return 1;
    }
    return 0;
}

/* An address as asyncio gives it: (host, port) for IPv4, (host, port, flowinfo, scope_id) for
 * IPv6, "" for a unix socket. */
static PyObject *address_tuple(const struct sockaddr *a) {
    char host[INET6_ADDRSTRLEN];
    int port;
    if (!host_and_port(a, host, &port)) return PyUnicode_FromString("");
    if (a->sa_family == AF_INET) return Py_BuildValue("(si)", host, port);
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
    return Py_BuildValue("(siII)", host, port, (unsigned)ntohl(in6->sin6_flowinfo),
                         (unsigned)in6->sin6_scope_id);
}

static void keep_address(ConnObject *c, const struct sockaddr_storage *peer) {
    if (peer->ss_family == AF_INET)
        memcpy(&c->peer_addr.in4, peer, sizeof c->peer_addr.in4);
    else if (peer->ss_family == AF_INET6)
        memcpy(&c->peer_addr.in6, peer, sizeof c->peer_addr.in6);
}

static void on_readable(ConnObject *c);
static int hand_off(EngineObject *e, int fd, const struct sockaddr_storage *peer);

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

/* -- balancing between workers ----------------------------------------------------------- *
 * With workers = N every worker listens on the port (SO_REUSEPORT) and the kernel picks one by
 * a hash of the connection's addresses, which can leave one worker with 60 % of the clients
 * and its half of the pool with the longer queue. So a worker that accepts a TCP client while
 * it holds more than BALANCE_SLACK clients more than its least busy sibling passes the socket
 * on, as it is (nothing read from it yet), to that sibling over its hand-off socket (an
 * AF_UNIX datagram socketpair, SCM_RIGHTS); the sibling serves it as if its own listener had
 * accepted it. Each worker's share is counted in the shared counters above: a client is
 * counted from its accept (or hand-off) until its fd closes, the sender counting a handed
 * client for its receiver at once, so that a burst of connections does not all go to the
 * same sibling before it has taken any in. A handed client is handed on again only by a
 * receiver that stopped serving clients meanwhile (its listener closed: a reload, a
 * shutdown), to a sibling that still takes hand-offs; a hand-off that fails for any reason
 * (the sibling's queue is full, it is gone) leaves the client with the worker that has it. Only clients of engine listeners are balanced:
 * the unix socket and asyncio's listeners (client TLS, fast_path off) are not. */
#define BALANCE_SLACK 1
#define HANDOFF_PAYLOAD "pgpilot:client" /* the data of a hand-off datagram: one client */
#define HANDOFF_MAX_FDS 8 /* room for a few, to close what a stray datagram carries */

/* The accepting sibling with the fewest clients, if it has fewer than ``below``; else -1. */
static int least_busy_sibling(EngineObject *e, int64_t below) {
    int target = -1;
    for (int i = 0; i < e->n_workers; i++) {
        if (i == e->me || e->handoff_fds[i] < 0 || !counter_get(e, i, SLOT_ACCEPTING)) continue;
        int64_t clients = counter_get(e, i, SLOT_CLIENTS);
        if (clients < below) {
            below = clients;
            target = i;
        }
    }
    return target;
}

/* Send the client ``fd`` to sibling ``to`` over its hand-off socket, counted in its share
 * from now: 1 if it went (our copy is closed), 0 if not (the sibling's queue is full, it is
 * gone). Never blocks. */
static int send_client(EngineObject *e, int fd, int to) {
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = HANDOFF_PAYLOAD, .iov_len = sizeof HANDOFF_PAYLOAD - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    counter_add(e, to, SLOT_CLIENTS, 1); /* before it can arrive: its receiver never counts it */
    ssize_t sent;
    do {
        sent = sendmsg(e->handoff_fds[to], &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        counter_add(e, to, SLOT_CLIENTS, -1);
        return 0;
    }
    counter_add(e, e->me, SLOT_HANDED_OFF, 1);
    close(fd);
    return 1;
}

/* Hand the new client ``fd`` to a sibling if this worker holds too many: 1 if it went, 0 if
 * it stays here. */
static int hand_off(EngineObject *e, int fd, const struct sockaddr_storage *peer) {
    if (peer->ss_family != AF_INET && peer->ss_family != AF_INET6) return 0;
    int to = least_busy_sibling(e, counter_get(e, e->me, SLOT_CLIENTS) - BALANCE_SLACK);
    return to >= 0 && send_client(e, fd, to);
}

/* A client a sibling handed over: served as if the hand-off listener had accepted it, or,
 * with none open (shutting down, client TLS turned on), closed. */
static void take_in(EngineObject *e, int fd) {
    ConnObject *l = e->handoff_listener;
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    memset(&peer, 0, sizeof peer);
    if (getpeername(fd, (struct sockaddr *)&peer, &len) < 0 ||
        (peer.ss_family != AF_INET && peer.ss_family != AF_INET6)) {
        close(fd);
        counter_add(e, e->me, SLOT_CLIENTS, -1);
        return;
    }
    if (!l || (l->flags & F_CLOSED)) {
        /* Handed over while this worker stopped serving clients: on to a sibling that still
         * does (it cannot come back: this worker takes no hand-offs now), else closed. */
        int to = least_busy_sibling(e, INT64_MAX);
        if (to < 0 || !send_client(e, fd, to)) close(fd);
        counter_add(e, e->me, SLOT_CLIENTS, -1);
        return;
    }
    counter_add(e, e->me, SLOT_HANDED_IN, 1);
    Py_INCREF(l);
    accept_one(l, fd, &peer, 1);
    Py_DECREF(l);
}

/* The hand-off socket is readable: take in every client waiting there. A hand-off is
 * HANDOFF_PAYLOAD with exactly one descriptor. Anything else is dropped, with whatever
 * descriptors came (closed): a stray datagram, or a hand-off whose descriptor was lost
 * (control data truncated, out of descriptors) or came with others, which is then uncounted
 * (its sender counted one client for this worker). */
static void handoff_receive(ConnObject *r) {
    EngineObject *e = r->engine;
    for (int round = 0; round < ACCEPTS_PER_WAKE && !(r->flags & F_CLOSED); round++) {
        char data[sizeof HANDOFF_PAYLOAD];
        union {
            struct cmsghdr header;
            char space[CMSG_SPACE(HANDOFF_MAX_FDS * sizeof(int))];
        } control;
        struct iovec iov = {.iov_base = data, .iov_len = sizeof data};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
        ssize_t n = recvmsg(r->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            /* Not expected of a socketpair: stop taking clients rather than spin on it. */
            PyErr_SetFromErrno(PyExc_OSError);
            report_error(e);
            counter_set(e, e->me, SLOT_ACCEPTING, 0);
            conn_close_fd(r);
            drop_engine_ref(r);
            return;
        }
        int fds[HANDOFF_MAX_FDS], n_fds = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
            if (cm->cmsg_len < CMSG_LEN(0)) continue;
            size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k && n_fds < HANDOFF_MAX_FDS; i++)
                memcpy(&fds[n_fds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
        }
        int ours = n == (ssize_t)(sizeof HANDOFF_PAYLOAD - 1) && !(msg.msg_flags & MSG_TRUNC) &&
                   memcmp(data, HANDOFF_PAYLOAD, sizeof HANDOFF_PAYLOAD - 1) == 0;
        if (ours && n_fds == 1 && !(msg.msg_flags & MSG_CTRUNC)) {
            take_in(e, fds[0]);
            continue;
        }
        for (int i = 0; i < n_fds; i++) close(fds[i]);
        if (ours) counter_add(e, e->me, SLOT_CLIENTS, -1);
    }
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

/* Read what the socket has into the connection's buffer (room for ``want`` more bytes):
 * 1 if bytes came, 0 if none yet or the connection is gone (Python was told). */
static int read_buffered(ConnObject *c, size_t want) {
    if (buf_reserve(&c->rb, want) < 0) {
        PyErr_Clear();
        conn_lost(c, NULL);
        return 0;
    }
    if (tls_active(c)) {
        ssize_t n = tls_recv(c, tls_scratch);
        if (n < 0) return 0; /* nothing yet, or lost (Python was told) */
        if (n == 0) {
            conn_lost(c, NULL);
            return 0;
        }
        if (buf_append(&c->rb, tls_scratch, (size_t)n) < 0) {
            PyErr_Clear();
            conn_lost(c, NULL);
            return 0;
        }
        return 1;
    }
    ssize_t n = sock_recv(c->fd, c->rb.p + c->rb.end, c->rb.cap - c->rb.end, MSG_DONTWAIT);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost_errno(c, errno);
        return 0;
    }
    if (n == 0) {
        conn_lost(c, NULL);
        return 0;
    }
    c->rb.end += (size_t)n;
    return 1;
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
            /* Engine.client_tls set: 'S', and the handshake follows (_fastpath_tls.c). */
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

static void on_writable(ConnObject *c) {
    Buf *b = &c->wb;
    while (buf_len(b)) {
        ssize_t r = sock_send(c->fd, b->p + b->start, buf_len(b), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            lost_errno(c, errno);
            return;
        }
        b->start += (size_t)r;
    }
    size_t pending = buf_len(b);
    if (!pending) {
        b->start = b->end = 0;
        buf_shrink(b);
    }
    if (c->flags & F_CLOSING) {
        if (!pending) {
            conn_close_fd(c);
            if (c->engine->call_soon) {
                PyObject *lost = PyObject_GetAttrString(c->protocol, "connection_lost");
                PyObject *r = lost ? py_call_soon(c->engine, lost, Py_None) : NULL;
                if (!r) report_error(c->engine);
                Py_XDECREF(r);
                Py_XDECREF(lost);
            }
            drop_engine_ref(c);
        }
        return;
    }
    if (pending <= LOW_WATER) {
        if (c->mode == MODE_FAST) {
            ConnObject *peer = c->peer;
            if (peer && (peer->flags & F_THROTTLED)) {
                peer->flags &= ~F_THROTTLED;
                update_events(peer);
            }
        } else if (c->flags & F_WRITE_PAUSED) {
            c->flags &= ~F_WRITE_PAUSED;
            PyObject *r = py_method(c->protocol, "resume_writing", NULL);
            if (!r) report_error(c->engine);
            Py_XDECREF(r);
        }
    }
    update_events(c);
}

/* ==================================================================== Conn (the transport) */
static int conn_traverse(ConnObject *c, visitproc visit, void *arg) {
    Py_VISIT(c->protocol);
    Py_VISIT(c->extra);
    Py_VISIT(c->route);
    Py_VISIT(c->statements);
    Py_VISIT(c->prepared);
    return 0;
}

static int conn_clear(ConnObject *c) {
    Py_CLEAR(c->protocol);
    Py_CLEAR(c->extra);
    Py_CLEAR(c->route);
    Py_CLEAR(c->statements);
    Py_CLEAR(c->prepared);
    return 0;
}

static void conn_dealloc(ConnObject *c) {
    PyObject_GC_UnTrack(c);
    if (c->weakreflist) PyObject_ClearWeakRefs((PyObject *)c);
    partial_remove(c);
    if (!(c->flags & F_CLOSED) && c->fd >= 0) {
        if (c->registered) epoll_ctl(c->engine->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->engine->n_conns--;
        if (c->flags & F_COUNTED) uncount_client(c);
    }
    tls_free(c);
    buf_free(&c->rb);
    buf_free(&c->wb);
    scram_free(c);
    owed_reset(c);
    PyMem_Free(c->owed_names);
    free(c->qs);
    free(c->burst);
    conn_clear(c);
    Py_XDECREF(c->pool);
    Py_XDECREF(c->engine);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Python touches a fast connection (writes, closes, pauses): it takes the pair back first. */
static void make_slow(ConnObject *c) {
    if (c->mode != MODE_FAST) return;
    if (c->kind == KIND_CLIENT) {
        eject_client(c, c->peer, c->peer ? EJECT_LINKED : EJECT_UNLINKED);
    } else if (c->peer) {
        eject_client(c->peer, c, EJECT_LINKED);
    } else {
        return_server(c);
    }
}

static PyObject *conn_write(ConnObject *c, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (c->flags & (F_CLOSED | F_CLOSING)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    make_slow(c);
    int r = conn_send(c, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (r < 0) {
        /* As asyncio: the break is reported through connection_lost, soon. */
        int err = errno;
        c->flags |= F_CLOSING;
        buf_free(&c->wb);
        conn_close_fd(c);
        PyObject *exc = PyObject_CallFunction(PyExc_ConnectionError, "is", err, strerror(err));
        PyObject *lost = PyObject_GetAttrString(c->protocol, "connection_lost");
        if (lost && exc && c->engine->call_soon) {
            PyObject *rr = py_call_soon(c->engine, lost, exc);
            Py_XDECREF(rr);
        }
        Py_XDECREF(lost);
        Py_XDECREF(exc);
        PyErr_Clear();
        drop_engine_ref(c);
    }
    Py_RETURN_NONE;
}

/* close(): the fd closes once the write buffer is out; abort(): now, dropping it. */
static PyObject *conn_shut(ConnObject *c, int drop_unsent) {
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_NONE;
    make_slow(c);
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_NONE;
    c->flags |= F_CLOSING;
    if (drop_unsent) c->wb.start = c->wb.end = 0;
    if (!buf_len(&c->wb)) {
        on_writable(c);
    } else {
        update_events(c);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_close(ConnObject *c, PyObject *unused) { return conn_shut(c, 0); }

static PyObject *conn_abort(ConnObject *c, PyObject *unused) { return conn_shut(c, 1); }

static PyObject *conn_pause_reading(ConnObject *c, PyObject *unused) {
    make_slow(c);
    c->flags |= F_READ_PAUSED;
    update_events(c);
    Py_RETURN_NONE;
}

static PyObject *conn_resume_reading(ConnObject *c, PyObject *unused) {
    c->flags &= ~F_READ_PAUSED;
    update_events(c);
    Py_RETURN_NONE;
}

static PyObject *conn_is_closing(ConnObject *c, PyObject *unused) {
    return PyBool_FromLong((c->flags & (F_CLOSED | F_CLOSING)) != 0);
}

static PyObject *conn_is_reading(ConnObject *c, PyObject *unused) {
    return PyBool_FromLong(wants_read(c));
}

static PyObject *conn_get_write_buffer_size(ConnObject *c, PyObject *unused) {
    return PyLong_FromSize_t(buf_len(&c->wb));
}

static PyObject *conn_get_extra_info(ConnObject *c, PyObject *args) {
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &name, &dflt)) return NULL;
    if (c->extra) {
        PyObject *v = PyDict_GetItemWithError(c->extra, name);
        if (v) return Py_NewRef(v);
        if (PyErr_Occurred()) return NULL;
    }
    if (c->tls && PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "peercert") == 0)
        return tls_peercert(c);
    if (!c->extra && c->peer_addr.sa.sa_family != AF_UNSPEC && PyUnicode_Check(name)) {
        /* An engine listener's client: its addresses, made now. */
        if (PyUnicode_CompareWithASCIIString(name, "peername") == 0)
            return address_tuple(&c->peer_addr.sa);
        if (PyUnicode_CompareWithASCIIString(name, "sockname") == 0 && c->fd >= 0) {
            struct sockaddr_storage local;
            socklen_t llen = sizeof local;
            if (getsockname(c->fd, (struct sockaddr *)&local, &llen) == 0)
                return address_tuple((struct sockaddr *)&local);
        }
    }
    return Py_NewRef(dflt);
}

/* Enter the fast path: a client of ``pool`` (its parameters' id), or a server given to it. */
static PyObject *conn_set_fast(ConnObject *c, PyObject *args) {
    PoolObject *p;
    long long params_id;
    double expires = 0;
    PyObject *names = Py_None;
    if (!PyArg_ParseTuple(args, "O!L|dO", &PoolType, &p, &params_id, &expires, &names))
        return NULL;
    if (names != Py_None && !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "statements must be a dict or None");
        return NULL;
    }
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_FALSE;
    if (c->mode == MODE_FAST) {
        PyErr_SetString(PyExc_RuntimeError, "connection is already on the fast path");
        return NULL;
    }
    if (c->kind == KIND_SERVER) {
        if (names != Py_None) Py_XSETREF(c->prepared, Py_NewRef(names));
    } else {
        /* None: the client's statements are not renamed (max_prepared_statements = 0), and
         * a map from an earlier stay must not rename them either. */
        Py_XSETREF(c->statements, names == Py_None ? NULL : Py_NewRef(names));
    }
    enter_fast_mode(c, p, params_id, expires);
    Py_RETURN_TRUE;
}

/* set_statements(statements): a client's statement map from now on, on the fast path or off
 * it (None: its named statements go to Python, which passes them unrenamed). For a change
 * of max_prepared_statements at a reload. */
static PyObject *conn_set_statements(ConnObject *c, PyObject *names) {
    if (names != Py_None && !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "statements must be a dict or None");
        return NULL;
    }
    if (c->kind == KIND_SERVER) {
        PyErr_SetString(PyExc_TypeError, "set_statements is for client connections");
        return NULL;
    }
    Py_XSETREF(c->statements, names == Py_None ? NULL : Py_NewRef(names));
    Py_RETURN_NONE;
}

static void enter_fast_mode(ConnObject *c, PoolObject *p, long long params_id, double expires) {
    c->mode = MODE_FAST;
    c->pool = (PoolObject *)Py_NewRef(p);
    c->params_id = params_id;
    c->flags &= ~(F_READ_PAUSED | F_HOLD);
    c->expected_rfq = 0;
    c->unsynced = 0;
    c->txn = 'I';
    c->skip = 0;
    owed_reset(c);
    c->expires = expires > 0 ? secs_to_ns(expires) : 0;
    if (c->kind == KIND_SERVER) {
        server_free(c);
    } else {
        c->last_activity = now_ns();
        update_events(c);
        if (buf_len(&c->rb)) {
            Py_INCREF(c);
            client_pump(c);
            partial_note(c);
            Py_DECREF(c);
        }
    }
}

/* claim(): the client's Python object, made now if it is a phantom (None if that failed). */
static PyObject *conn_claim(ConnObject *c, PyObject *unused) {
    if (claim(c) < 0) Py_RETURN_NONE;
    return Py_NewRef(c->protocol);
}

/* Python reads (and clears) F_UNNAMED_PARSED before it rewrites a client's request. */
static PyObject *conn_take_unnamed_parsed(ConnObject *c, PyObject *unused) {
    int was = (c->flags & F_UNNAMED_PARSED) != 0;
    c->flags &= ~F_UNNAMED_PARSED;
    return PyBool_FromLong(was);
}

/* Python wants the pair back now (a timeout, an admin command, a cancel). */
static PyObject *conn_eject(ConnObject *c, PyObject *unused) {
    ConnObject *client = c->kind == KIND_CLIENT ? c : c->peer;
    if (c->mode == MODE_FAST && client && client->skip) {
        /* Mid-way through a Bind the client streams (see "streaming"): the pair cannot be
         * handed over now, so it goes to Python when the Bind is through (a SHOW or a
         * /metrics scrape must not cut the client off). */
        client->flags |= F_EJECT_STREAMED;
        Py_RETURN_FALSE;
    }
    int was = c->mode == MODE_FAST;
    make_slow(c);
    return PyBool_FromLong(was);
}

static PyObject *conn_set_hold(ConnObject *c, PyObject *arg) {
    if (PyObject_IsTrue(arg)) c->flags |= F_HOLD; else c->flags &= ~F_HOLD;
    Py_RETURN_NONE;
}

static PyObject *conn_set_read_at_accept(ConnObject *c, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    if (c->kind != KIND_LISTENER) {
        PyErr_SetString(PyExc_TypeError, "set_read_at_accept: not a listener");
        return NULL;
    }
    if (on) c->flags |= F_READ_AT_ACCEPT; else c->flags &= ~F_READ_AT_ACCEPT;
    Py_RETURN_NONE;
}

static PyObject *conn_get_fast(ConnObject *c, void *unused) {
    return PyBool_FromLong(c->mode == MODE_FAST);
}

static PyObject *conn_get_peer(ConnObject *c, void *unused) {
    if (c->peer && claim(c->peer) < 0) Py_RETURN_NONE;
    if (c->peer && c->peer->protocol) return Py_NewRef(c->peer->protocol);
    Py_RETURN_NONE;
}

static PyObject *conn_get_state(ConnObject *c, void *unused) {
    /* (linked, waiting, expected_rfq, txn status, query_started, idle_in_txn_since,
     *  last_activity, wait_started), times in time.monotonic() seconds */
    char txn[2] = {c->txn ? c->txn : 'I', 0};
    return Py_BuildValue("(iiisdddd)", c->peer != NULL, c->at == AT_WAITING, c->expected_rfq,
                         txn, secs(c->query_started), secs(c->idle_in_txn_since),
                         secs(c->last_activity), secs(c->wait_started));
}

/* set_protocol(protocol): as asyncio's transports (a server after its TLS handshake). */
static PyObject *conn_set_protocol(ConnObject *c, PyObject *protocol) {
    Py_XSETREF(c->protocol, Py_NewRef(protocol));
    Py_RETURN_NONE;
}

static PyObject *conn_get_protocol(ConnObject *c, PyObject *unused) {
    return Py_NewRef(c->protocol ? c->protocol : Py_None);
}

static PyObject *conn_get_tls(ConnObject *c, void *unused) {
    return PyBool_FromLong(c->tls != NULL && !(c->tls_state & TLS_HANDSHAKE));
}

static PyMethodDef conn_methods[] = {
    {"set_protocol", (PyCFunction)conn_set_protocol, METH_O, "Change the protocol object."},
    {"get_protocol", (PyCFunction)conn_get_protocol, METH_NOARGS, NULL},
    {"start_tls", (PyCFunction)conn_start_tls, METH_VARARGS,
     "start_tls(context, host=None, verify_host=False): begin a TLS handshake on this fresh "
     "socket (the engine's TLS: _fastpath_tls.c); protocol.tls_done() follows, or "
     "connection_lost(exc) with exc.tls_reason / verify_code / verify_message."},
    {"claim", (PyCFunction)conn_claim, METH_NOARGS,
     "The client's protocol object, made now if the engine logged it in alone."},
    {"write", (PyCFunction)conn_write, METH_O, "Send bytes (as asyncio.Transport.write)."},
    {"close", (PyCFunction)conn_close, METH_NOARGS, "Close once written out."},
    {"abort", (PyCFunction)conn_abort, METH_NOARGS, "Close now, dropping unsent bytes."},
    {"pause_reading", (PyCFunction)conn_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)conn_resume_reading, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)conn_is_closing, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)conn_is_reading, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)conn_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)conn_get_extra_info, METH_VARARGS, NULL},
    {"set_fast", (PyCFunction)conn_set_fast, METH_VARARGS,
     "set_fast(pool, params_id, expires=0, statements=None): enter the fast path; "
     "statements: a client's router.statements, a server's prepared (named statements)."},
    {"set_statements", (PyCFunction)conn_set_statements, METH_O,
     "set_statements(statements): a client's router.statements from now on (None: no "
     "renaming; its named statements go to Python)."},
    {"eject", (PyCFunction)conn_eject, METH_NOARGS,
     "Take the connection back from the fast path: True if it was on it. False also for a pair\n"
     "mid-way through a streamed Bind, which comes back when the Bind is through."},
    {"take_unnamed_parsed", (PyCFunction)conn_take_unnamed_parsed, METH_NOARGS,
     "Did the engine carry an unnamed Parse or a simple query since last asked (so Python's "
     "record of the client's unnamed statement is out of date)?"},
    {"scram_login", (PyCFunction)conn_scram_login, METH_VARARGS,
     "scram_login(stored_key, server_key, salt_b64, iterations, valid) -> bytes: run this "
     "client's SCRAM-SHA-256 exchange in the engine; returns the AuthenticationSASL message."},
    {"scram_feed", (PyCFunction)conn_scram_feed, METH_O,
     "scram_feed(data): bytes of the SCRAM exchange that reached Python first."},
    {"set_read_at_accept", (PyCFunction)conn_set_read_at_accept, METH_O,
     "Listener: read a client as soon as it is accepted (TCP_DEFER_ACCEPT is on)."},
    {"set_hold", (PyCFunction)conn_set_hold, METH_O,
     "A held server goes back to Python when released instead of being lent again."},
    {NULL}};

static PyObject *conn_get_route_flags(ConnObject *c, void *unused) {
    return PyLong_FromLong(c->route_flags);
}

static int conn_set_route_flags(ConnObject *c, PyObject *value, void *unused) {
    long v = value ? PyLong_AsLong(value) : -1;
    if (v == -1 && (!value || PyErr_Occurred())) {
        if (!value) PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    c->route_flags = (int)(v & ROUTE_WROTE);
    if (!c->route_flags) c->route_ended = 0;
    return 0;
}

static PyObject *conn_get_route_ended(ConnObject *c, void *unused) {
    return PyFloat_FromDouble(c->route_ended / 1e9);
}

static PyGetSetDef conn_getset[] = {
    {"fast", (getter)conn_get_fast, NULL, "On the fast path?", NULL},
    {"route_flags", (getter)conn_get_route_flags, (setter)conn_set_route_flags,
     "Read/write split: 1 = the engine sent a transaction of it to the primary (0 clears).",
     NULL},
    {"route_ended", (getter)conn_get_route_ended, NULL,
     "When the last such transaction ended in the engine (time.monotonic(); 0: not there).",
     NULL},
    {"peer", (getter)conn_get_peer, NULL, "The linked connection's protocol, if linked in C.",
     NULL},
    {"fast_state", (getter)conn_get_state, NULL, "The fast path's view of a client.", NULL},
    {"tls", (getter)conn_get_tls, NULL, "Encrypted by the engine (handshake done)?", NULL},
    {"tls_info", (getter)conn_get_tls_info, NULL, "'version/cipher' of its TLS, or ''.", NULL},
    {NULL}};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgpilot.proxy._fastpath.Conn",
    .tp_basicsize = sizeof(ConnObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A socket owned by the engine; the transport of a client or server protocol.",
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_methods = conn_methods,
    .tp_getset = conn_getset,
    .tp_weaklistoffset = offsetof(ConnObject, weakreflist),
};

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
    if (p->qs) qs_table_clear(p->qs);
    free(p->qs);
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

static PyObject *mod_needs_python(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    int r = sql_needs_python(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(r);
}

static PyObject *mod_scanned_bytes(PyObject *mod, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(scanned_total);
}

/* _fastpath.text_key(bytes) -> (key, raw): qs_text_key, for the Python path's cache. */
static PyObject *mod_text_key(PyObject *mod, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "text_key takes bytes");
        return NULL;
    }
    uint64_t raw, key = qs_text_key((const unsigned char *)PyBytes_AS_STRING(arg),
                                    (size_t)PyBytes_GET_SIZE(arg), &raw);
    return Py_BuildValue("(KK)", (unsigned long long)key, (unsigned long long)raw);
}

static PyMethodDef module_methods[] = {
    {"text_key", mod_text_key, METH_O,
     "(key, raw hash) of a statement text: the key is the same for texts that differ only in "
     "literal values (query statistics)."},
    {"scanned_bytes", mod_scanned_bytes, METH_NOARGS,
     "Bytes of complete client messages the fast path's scanner examined, in all (tests)."},
    {"sql_needs_python", mod_needs_python, METH_O,
     "The fast path's pre-filter: does this SQL text have to go through Python?"},
    {"b64encode", mod_b64encode, METH_O, "The engine's base64 (for tests)."},
    {"sha256", mod_sha256, METH_O, "The engine's SHA-256 (for tests)."},
    {"hmac_sha256", mod_hmac_sha256, METH_VARARGS,
     "hmac_sha256(key, msg): the engine's HMAC-SHA-256, key of at most 64 bytes (for tests)."},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath",
                                    "The pooler's compiled fast path (see _fastpath.c).", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
    qs_classes_init();
    if (PyType_Ready(&ConnType) < 0 || PyType_Ready(&PoolType) < 0 ||
        PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *binascii_mod = PyImport_ImportModule("binascii");
    py_b64decode = binascii_mod ? PyObject_GetAttrString(binascii_mod, "a2b_base64") : NULL;
    Py_XDECREF(binascii_mod);
    if (!py_b64decode) return NULL;
    kw_validate = Py_BuildValue("{sO}", "strict_mode", Py_True);
    if (!kw_validate) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObjectRef(m, "Conn", (PyObject *)&ConnType) < 0 ||
        PyModule_AddObjectRef(m, "FastPool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "EJECT_UNLINKED", EJECT_UNLINKED);
    PyModule_AddIntConstant(m, "EJECT_LINKED", EJECT_LINKED);
    PyModule_AddIntConstant(m, "EJECT_ATTACH", EJECT_ATTACH);
    PyModule_AddIntConstant(m, "EJECT_WAITING", EJECT_WAITING);
    if (tls_module_init(m) < 0 || scram_hash_init() < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
