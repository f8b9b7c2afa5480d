/* The pooler's compiled fast path (pgpilot.proxy._fastpath): the map of its files.
 *
 * An Engine owns an epoll set. The pooler's event loop waits on that set itself: asyncio's
 * descriptors are watched in it too (Engine.watch), and Engine.select serves the engine's
 * sockets in C until something of Python's is due (fastpath.EngineSelector). Plain-TCP clients
 * are accepted here; after login, server sockets (and clients of other listeners) move from
 * asyncio transports into the engine; a Conn then serves as the protocol object's transport.
 * A Conn is SLOW (every byte read goes to protocol.data_received(), all pooling logic in
 * Python) or FAST (transaction and statement pools: the engine reads message headers,
 * forwards the bytes, lends an idle server to a client whose request arrives and takes it back
 * at ReadyForQuery 'I' with nothing outstanding, with no Python at all). Whatever the fast path
 * does not handle is "ejected" back to Python at a message boundary with the exact protocol
 * state (engine/handback.c). docs/architecture.md, "The fast path", says what it does and why.
 *
 * This file is the extension's one translation unit: it includes the engine's files, one per
 * role (as PgBouncer's src/), in this order, and ends with the module itself. They are not
 * compiled apart: the hot path relies on static functions being inlined across them, and each
 * may use what the files before it define (engine/engine.h declares the few it calls ahead).
 * Each file opens with what it does; engine/engine.h states the rules all of them keep (who may
 * call Python and when, when buffers move, which role owns which fields).
 *
 *   engine/engine.h       the shared constants and types (Conn, FastPool, Engine), the rules
 *   engine/sbuf.c         byte buffers, raw send/recv, epoll interest
 *   engine/pycalls.c      calling Python: the counted call macros, reporting its exceptions
 *   engine/tls.c          TLS inside the engine: the I/O layer under an encrypted Conn
 *   engine/io.c           a Conn's reads and writes (plain or TLS), write pressure
 *   engine/proto.c        framing: the hazard pre-filter, what each message may be, the
 *                         answers owed, the StartupMessage
 *   engine/statements.c   named prepared statements: renaming Binds/Describes in C
 *   engine/querystats.c   per-statement timing (SHOW QUERIES) and N+1 bursts at the wire
 *   engine/pairing.c      a pool's wait queue and idle list; linking a client to a server
 *   engine/handback.c     ejecting a pair to Python, returning servers, failing closed
 *   engine/client.c       the client side: scanning, read/write split, streaming, the pump
 *   engine/server.c       the server side: the pump, releasing and lending servers
 *   engine/scram.c        SCRAM-SHA-256 logins run in the engine
 *   engine/logins.c       engine logins: login routes, phantom clients, their log lines
 *   engine/balance.c      balancing clients between workers (shared counters, hand-off)
 *   engine/accept.c       accepting clients, their first packets (SSLRequest, StartupMessage)
 *   engine/conn.c         the Conn type (the transport): closing, losing, Python's methods
 *   engine/pool.c         the FastPool type
 *   engine/engine.c       the Engine type: the event loop (run / select), Python's interface
 */
#include "engine/engine.h"
#include "engine/sbuf.c"
#include "engine/pycalls.c"
#include "engine/tls.c"
#include "engine/io.c"
#include "engine/proto.c"
#include "engine/statements.c"
#include "engine/querystats.c"
#include "engine/pairing.c"
#include "engine/handback.c"
#include "engine/client.c"
#include "engine/server.c"
#include "engine/scram.c"
#include "engine/logins.c"
#include "engine/balance.c"
#include "engine/accept.c"
#include "engine/conn.c"
#include "engine/pool.c"
#include "engine/engine.c"

/* -- the module -------------------------------------------------------------------------- */

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

/* _fastpath.bucket_of_ns(int) -> int: qs_bucket (tests: the engine's histogram buckets are
 * stats.bucket_of's). */
static PyObject *mod_bucket_of_ns(PyObject *mod, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(qs_bucket(ns));
}

/* _fastpath.text_key(bytes) -> (key, params): qs_text_key, for the Python path's cache. */
static PyObject *mod_text_key(PyObject *mod, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "text_key takes bytes");
        return NULL;
    }
    uint64_t params, key = qs_text_key((const unsigned char *)PyBytes_AS_STRING(arg),
                                       (size_t)PyBytes_GET_SIZE(arg), &params);
    return Py_BuildValue("(KK)", (unsigned long long)key, (unsigned long long)params);
}

static PyMethodDef module_methods[] = {
    {"text_key", mod_text_key, METH_O,
     "(key, parameters hash) of a statement text: the key is the same for texts that differ "
     "only in literal values, the parameters hash is of those values (query statistics)."},
    {"bucket_of_ns", mod_bucket_of_ns, METH_O,
     "The engine's histogram bucket of a duration in nanoseconds (for tests)."},
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
