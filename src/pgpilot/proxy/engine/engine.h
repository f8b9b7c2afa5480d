/* The engine's shared constants and types, and the rules every file of it keeps.
 *
 * Part of _fastpath.c's one translation unit (see its map of the files): included first, once.
 *
 * -- what the engine guarantees ------------------------------------------------------------
 * A server is lent only at ReadyForQuery 'I' with nothing outstanding and no client bytes
 * mid-message (never dirty); a client is only ever linked to one server and a server to one
 * client (c->peer and s->peer point at each other, or both are NULL); bytes are forwarded
 * unchanged and in order (but for the statement names engine/statements.c renames); a pair
 * that cannot be handed back to Python, or whose server breaks the protocol, is closed, never
 * used again (engine/handback.c, "failing closed").
 *
 * -- who may call Python, and when ---------------------------------------------------------
 * - Python's protocol and handler objects are called through py_method / py_call_soon only
 *   (engine/pycalls.c): they count the calls, and Engine.select goes back to the event loop
 *   after a batch that made any. An exception a call raises never unwinds C: report_error()
 *   hands it to the loop's error handler, and the caller carries on (or fails closed).
 * - Any other C-API call that can run Python code counts as a call too: making an object
 *   (the GC may run finalizers), dropping the last reference to an object with a destructor
 *   of Python's, a method call (OrderedDict.move_to_end), PyIter_Next. Python code may do
 *   anything to any Conn: write to it, close it, eject it, link or unlink it, dequeue it.
 * - The parse loops are pure C: client_scan's framing pass and server_pump's loop call nothing
 *   that can run Python while they hold a pointer into a buffer; work that needs Python
 *   (statement lookups, move_to_end, hand-backs) comes after the loop and reads the bytes again
 *   by offset. scram_pump copies a message out and moves rb.start past it before it answers.
 * - After any call that may have run Python, the caller assumes nothing it read before: it
 *   re-reads c->rb.p + c->rb.start, checks F_CLOSED / F_CLOSING, c->peer, c->mode, c->pool, and
 *   holds a reference (Py_INCREF) on every Conn and FastPool it still uses across the call (a
 *   callback may drop the last one).
 * - Process-wide scratch is used only between two calls that cannot run Python: the TLS
 *   decryption buffer (tls_scratch: copied into a bytes object before Python sees a byte), the
 *   SCRAM hash contexts (init to final), the spare-buffer and spare-ring pools. Nothing else
 *   is process-wide; a pump's renamed chunk (Renamed) lives on its stack.
 * - Python changes a client's statement map (statements) and a server's (prepared) only while
 *   the connection is off the fast path; the engine only reads them (and marks a statement
 *   used, once the bytes that used it are out).
 *
 * -- when buffers move -----------------------------------------------------------------------
 * A Buf is [start, end) of p. buf_reserve / buf_append may move the bytes to the front of p
 * (memmove) or move p itself (realloc), and take or give a spare block: after either, every
 * pointer into the buffer is stale; keep offsets from rb.start across them. buf_shrink /
 * buf_free / take_bytes give the memory back when the buffer is empty (idle connections keep
 * none). A read buffer grows only in io.c (read_buffered) and scram.c (conn_scram_feed); the pumps
 * (client.c, server.c, scram.c) consume it by moving rb.start forward (pass_on_as), and a
 * hand-back takes what is left (take_bytes). A write buffer grows only through conn_send (and
 * TLS's BIO, for ciphertext) and drains only in on_writable (or is dropped with the
 * connection: send_fatal, a closing socket's hang-up).
 *
 * -- which role owns which fields --------------------------------------------------------
 * Only the files named write a field; any may read it.
 *   sbuf.c, io.c     rb, wb, events, registered; F_READ_PAUSED, F_WRITE_PAUSED, F_THROTTLED
 *   tls.c            tls, tls_state, tls_errno, tls_raw_in
 *   pairing.c        at, prev, next, peer (link_pair / unlink_pair only), wait_started,
 *                    idle_since; a FastPool's idle_head, wait_head/tail, n_idle, n_waiting,
 *                    n_linked, and its wait statistics
 *   proto.c          owed, owed_start/end, owed_lost, owed_skip, owed_names
 *   statements.c     nothing of Python's: statements and prepared are read only (above)
 *   querystats.c     qs, burst; a FastPool's qs, shapes, events
 *   handback.c       mode back to SLOW (leave_fast), pt_prev/pt_next, in_partial and the
 *                    Engine's partial_head; a client's protocol state reset after a hand-back
 *   client.c         a client's expected_rfq, unsynced, query_started, xact_started,
 *                    idle_in_txn_since, skip, scan_ok, scan_unnamed, route_flags;
 *                    F_EJECT_WANTED, F_EJECT_STREAMED, F_UNNAMED_PARSED; bytes_in
 *   server.c         a server's skip; its client's txn, expected_rfq, query/xact timings and
 *                    route_ended at ReadyForQuery; F_FATAL_SEEN, F_ANSWERS_WAIT,
 *                    F_RESULT_PASSED (conn.c clears it as a server enters); the FastPool's
 *                    query, transaction, error and bytes_out counters
 *   scram.c          scram
 *   logins.c         route, cancel_pid, cancel_key, client_id, accepted, ph_prev/ph_next;
 *                    F_PHANTOM, F_WELCOMED; the Engine's phantom and log fields
 *   balance.c        F_COUNTED; the Engine's counters, handoff_* and counted
 *   accept.c         peer_addr; F_STARTUP, F_SSL_ASKED, F_GSS_ASKED
 *   conn.c           fd, kind, protocol, extra, F_CLOSED, F_CLOSING, F_HOLD; mode to FAST
 *                    (enter_fast_mode), pool, params_id, expires, statements, prepared (as
 *                    Python sets them)
 *   engine.c         the Engine's epoll set, running, graveyard, last_activity at a read
 * Python sets a FastPool's settings (paused, statement_mode, assist, py_waiters, route_reads,
 * check_after, qs_on, burst_threshold, burst_window) through pool.c's methods.
 */
#ifndef PGPILOT_ENGINE_H
#define PGPILOT_ENGINE_H

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
#define F_RESULT_PASSED 0x80000  /* server: a result of its client's request in flight (a
                                  * CommandComplete, ErrorResponse or EmptyQueryResponse) went
                                  * to the client since its last ReadyForQuery: if the server
                                  * is lost now, the close alone tells the client, as directly
                                  * (an error of the pooler's would be a second result) */
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
typedef struct QsNames QsNames;

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
    /* TLS (tls.c): the session (an SSL*; NULL: plain), its TLS_* state, the errno
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
    uint32_t qs_gen; /* bumped when the table is taken: entries found before are gone */
    QsNames *qs_names; /* the keys of named statements (see there) */
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

/* -- forward declarations ----------------------------------------------------------------- *
 * Functions a file earlier in the include order calls (each is defined in the file named). */
static void conn_lost(ConnObject *c, PyObject *exc);                      /* conn.c */
static void lost_errno(ConnObject *c, int err);                           /* conn.c */
static void conn_close_fd(ConnObject *c);                                 /* conn.c */
static void drop_engine_ref(ConnObject *c);                               /* conn.c */
static ConnObject *new_conn(EngineObject *e, int fd, PyObject *protocol, PyObject *extra,
                            int kind);                                    /* engine.c */
static void keep_address(ConnObject *c, const struct sockaddr_storage *peer); /* conn.c */
static void on_readable(ConnObject *c);                                   /* engine.c */
static int conn_send(ConnObject *c, const char *data, size_t n);          /* io.c */
static void accept_one(ConnObject *l, int fd, const struct sockaddr_storage *peer,
                       int handed_in);                                    /* accept.c */

#endif /* PGPILOT_ENGINE_H */
