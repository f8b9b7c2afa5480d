/* TLS inside the engine: the I/O layer io.c calls for an encrypted Conn.
 *
 * Included by _fastpath.c (one translation unit: the extension is one .so) after the Conn's
 * buffers and epoll helpers (sbuf.c) and before its reads and writes (io.c). Built with
 * OpenSSL when setup.py finds its headers (PGPILOT_TLS defined, libssl linked); without, the
 * stubs at the end keep every caller compiling and Python keeps its own TLS path (asyncio's
 * SSL transport).
 *
 * Design (docs/architecture.md, "TLS in the engine"): the engine owns a connection's TLS
 * session from the handshake on. An SSL* sits on the Conn with a BIO of our own whose
 *   - read callback is the socket's recv(): OpenSSL reads ahead (one recv takes all the
 *     socket has, up to its record buffer), and a read event stops asking the socket once it
 *     took TLS_READ_BUDGET bytes (TLS_DRAINED); every complete record read is decrypted in
 *     the same event (tls_recv drains SSL_read until WANT_READ), so OpenSSL never holds a
 *     whole record that epoll would not wake us for;
 *   - write callback is send() when nothing is queued, and otherwise (or for what the socket
 *     does not take) an append to the Conn's write buffer, which then holds ciphertext and is
 *     flushed by on_writable as for a plain socket. So SSL_write never blocks or asks to be
 *     retried (no WANT_WRITE and its same-buffer rule), write pressure counts ciphertext, and
 *     bytes leave in order whatever mixes them (records, alerts, close_notify, tickets).
 * Everything above this layer (startup, SCRAM, login routes, the fast path's scanner and
 * hand-overs) sees the decrypted bytes exactly as it sees a plain socket's, with the same caps.
 *
 * Python decides policy (which mode, what to answer to SSLRequest, what a failure means) and
 * builds nothing of OpenSSL: TLSContext is made from the same settings as Python's contexts
 * (tls.py); Conn.start_tls begins a handshake on a socket Python hands over (a server after
 * its 'S', or a client Python answered 'S'); the engine's own listener answers an SSLRequest
 * itself when Engine.client_tls is set. Renegotiation is refused (SSL_OP_NO_RENEGOTIATION),
 * TLS 1.2 is the least version, close_notify is sent on close() and taken as end of stream.
 */

#define TLS_HANDSHAKE 0x01 /* handshake under way: reads drive it */
#define TLS_DRAINED 0x02   /* this read event: the socket gave all it had (or the budget) */
#define TLS_FAILED 0x04    /* a fatal error: no close_notify, no more I/O */
#define TLS_NOTIFY 0x08    /* Python started it: protocol.tls_done() when the handshake ends */
#define TLS_EOF 0x10       /* close_notify (or the socket's end) seen */
#define TLS_VERIFIED 0x20  /* a peer certificate was asked for and verified */
#define TLS_READ_BUDGET 16384
#define TLS_RECORD_MAX 16384 /* the most plaintext one record carries */
#define TLS_SCRATCH (96 * 1024)

#ifdef PGPILOT_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* OpenSSL 1.1.1 spells a few things differently (3.0 is what the project builds on). */
#if OPENSSL_VERSION_NUMBER < 0x30000000L
#define SSL_get1_peer_certificate SSL_get_peer_certificate
#endif
#ifndef SSL_OP_IGNORE_UNEXPECTED_EOF
#define SSL_OP_IGNORE_UNEXPECTED_EOF 0 /* an EOF without close_notify: see tls_recv */
#endif

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
    int server_side; /* accepts clients (1) or connects to PostgreSQL (0) */
    int verify;      /* 0: none, 1: asked for, checked if sent, 2: required */
} TLSContextObject;

static PyTypeObject TLSContextType;
static BIO_METHOD *conn_bio_method;
static char *tls_scratch;

/* The newest OpenSSL error's reason, or ``fallback``. */
static const char *tls_reason(unsigned long err, const char *fallback) {
    const char *r = err ? ERR_reason_error_string(err) : NULL;
    return r ? r : fallback;
}

static PyObject *tls_context_error(const char *what, const char *path) {
    unsigned long err = ERR_peek_last_error();
    PyErr_Format(PyExc_OSError, "%s%s%s: %s", what, path ? " " : "", path ? path : "",
                 tls_reason(err, "unknown error"));
    ERR_clear_error();
    return NULL;
}

/* TLSContext(server_side, cert_file, key_file, ca_file, verify): see the type's doc. */
static PyObject *tls_context_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int server_side, verify;
    const char *cert = NULL, *key = NULL, *ca = NULL;
    if (!PyArg_ParseTuple(args, "pzzzi", &server_side, &cert, &key, &ca, &verify)) return NULL;
    if (verify < 0 || verify > 2) return PyErr_Format(PyExc_ValueError, "verify: 0, 1 or 2");
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(server_side ? TLS_server_method() : TLS_client_method());
    if (!ctx) return tls_context_error("cannot make a TLS context", NULL);
    TLSContextObject *self = (TLSContextObject *)type->tp_alloc(type, 0);
    if (!self) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    self->ctx = ctx;
    self->server_side = server_side;
    self->verify = verify;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_read_ahead(ctx, 1);
    if (cert && key) {
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
            Py_DECREF(self);
            return tls_context_error("cannot load the certificate", cert);
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            Py_DECREF(self);
            return tls_context_error("cannot load the private key", key);
        }
    }
    if (verify) {
        if (ca) {
            if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
                Py_DECREF(self);
                return tls_context_error("cannot load the CA file", ca);
            }
            if (server_side) {
                STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca);
                if (names) SSL_CTX_set_client_CA_list(ctx, names);
            }
        } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
            Py_DECREF(self);
            return tls_context_error("cannot load the system's CA certificates", NULL);
        }
        int mode = SSL_VERIFY_PEER;
        if (server_side && verify == 2) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
        SSL_CTX_set_verify(ctx, mode, NULL);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    if (server_side) {
        /* Session resumption for clients that reconnect (tickets, and the id cache). The
         * context id is needed for a resumed session once certificates are asked for. */
        static const unsigned char sid[] = "pgpilot";
        SSL_CTX_set_session_id_context(ctx, sid, sizeof sid - 1);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        /* One TLS 1.3 ticket, not OpenSSL's two: libpq never resumes, and each ticket is
         * sealed and sent on every login (pgbench -C pays it per transaction). */
        SSL_CTX_set_num_tickets(ctx, 1);
    }
    ERR_clear_error();
    return (PyObject *)self;
}

static void tls_context_dealloc(TLSContextObject *self) {
    SSL_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *tls_context_get_server_side(TLSContextObject *self, void *unused) {
    return PyBool_FromLong(self->server_side);
}

static PyGetSetDef tls_context_getset[] = {
    {"server_side", (getter)tls_context_get_server_side, NULL, "Accepts clients?", NULL},
    {NULL}};

static PyTypeObject TLSContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgpilot.proxy._fastpath.TLSContext",
    .tp_basicsize = sizeof(TLSContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TLSContext(server_side, cert_file, key_file, ca_file, verify): OpenSSL settings "
              "for the engine's TLS sessions. verify 0: no peer certificate asked; 1: asked, "
              "checked against ca_file when sent; 2: required and checked (ca_file None: the "
              "system's roots). Raises OSError for an unusable file.",
    .tp_new = tls_context_new,
    .tp_dealloc = (destructor)tls_context_dealloc,
    .tp_getset = tls_context_getset,
};

/* -- the Conn's BIO ---------------------------------------------------------------------- */
static int conn_bio_write(BIO *b, const char *data, int len) {
    ConnObject *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (c->fd < 0 || (c->flags & F_CLOSED)) return len; /* nowhere to go: dropped */
    size_t n = (size_t)len, sent = 0;
    if (!buf_len(&c->wb)) {
        ssize_t r = sock_send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                c->tls_errno = errno;
                return -1;
            }
            r = 0;
        }
        sent = (size_t)r;
        if (sent == n) return len;
    }
    if (buf_append(&c->wb, data + sent, n - sent) < 0) {
        PyErr_Clear();
        c->tls_errno = ENOMEM;
        return -1;
    }
    update_events(c);
    return len;
}

static int conn_bio_read(BIO *b, char *out, int len) {
    ConnObject *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (c->fd < 0 || (c->tls_state & TLS_DRAINED)) {
        BIO_set_retry_read(b);
        return -1;
    }
    ssize_t r = sock_recv(c->fd, out, (size_t)len, MSG_DONTWAIT);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            c->tls_state |= TLS_DRAINED;
            BIO_set_retry_read(b);
            return -1;
        }
        c->tls_errno = errno;
        return -1;
    }
    if (r == 0) {
        c->tls_state |= TLS_EOF | TLS_DRAINED;
        return 0;
    }
    c->tls_raw_in += (size_t)r;
    if (r < len || c->tls_raw_in >= TLS_READ_BUDGET) c->tls_state |= TLS_DRAINED;
    return (int)r;
}

static long conn_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int conn_bio_create(BIO *b) {
    BIO_set_init(b, 1);
    return 1;
}

/* -- sessions ---------------------------------------------------------------------------- */
static int tls_active(ConnObject *c) { return c->tls != NULL; }

static void tls_free(ConnObject *c) {
    if (!c->tls) return;
    SSL_free((SSL *)c->tls); /* frees the BIO too */
    c->tls = NULL;
}

/* The connection closes: say so (close_notify) if the session is sound, then let it go. */
static void tls_close(ConnObject *c) {
    SSL *ssl = c->tls;
    if (!ssl) return;
    if (!(c->tls_state & (TLS_FAILED | TLS_HANDSHAKE)) && c->fd >= 0 && !(c->flags & F_CLOSED)) {
        ERR_clear_error();
        SSL_shutdown(ssl); /* one try: what the socket takes now, or nothing */
        ERR_clear_error();
    }
    tls_free(c);
}

/* Start a session on ``c`` (nothing encrypted read or written yet). ``server_side``: the
 * engine accepts (a client); else it connects (to PostgreSQL), with ``host`` for SNI (a name,
 * not an address, as libpq) and, when ``verify_host``, the name or address the server's
 * certificate must carry (verify-full). Returns -1 with a Python exception set. */
static int tls_begin(ConnObject *c, TLSContextObject *ctx, const char *host, int verify_host) {
    if (c->tls) {
        PyErr_SetString(PyExc_RuntimeError, "TLS is on already");
        return -1;
    }
    ERR_clear_error();
    SSL *ssl = SSL_new(ctx->ctx);
    BIO *bio = ssl ? BIO_new(conn_bio_method) : NULL;
    if (!bio) {
        if (ssl) SSL_free(ssl);
        tls_context_error("cannot start TLS", NULL);
        return -1;
    }
    BIO_set_data(bio, c);
    SSL_set_bio(ssl, bio, bio);
    if (!ctx->server_side && host && *host) {
        unsigned char addr[16];
        int is_ip = inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
        int ok = 1;
        if (!is_ip) ok = SSL_set_tlsext_host_name(ssl, host) == 1;
        if (ok && verify_host) {
            SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) == 1
                       : SSL_set1_host(ssl, host) == 1;
        }
        if (!ok) {
            SSL_free(ssl);
            tls_context_error("cannot set the server name", host);
            return -1;
        }
    }
    if (ctx->server_side) SSL_set_accept_state(ssl);
    else SSL_set_connect_state(ssl);
    c->tls = ssl;
    c->tls_state = TLS_HANDSHAKE | (ctx->verify ? TLS_VERIFIED : 0);
    c->tls_errno = 0;
    return 0;
}

/* The exception a failed session ends with: a ConnectionError whose attributes say what
 * failed (tls_reason; verify_code and verify_message for a refused certificate), so that
 * Python can name it as its ssl module would. */
static PyObject *tls_exception(ConnObject *c, unsigned long err, int syscall_errno) {
    SSL *ssl = c->tls;
    long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    const char *reason = tls_reason(err, syscall_errno ? strerror(syscall_errno)
                                                       : "connection closed during TLS");
    const char *vmsg = verify != X509_V_OK ? X509_verify_cert_error_string(verify) : "";
    PyObject *exc;
    if (verify != X509_V_OK && (c->tls_state & TLS_HANDSHAKE))
        exc = PyObject_CallFunction(PyExc_ConnectionError, "is", EPROTO, vmsg);
    else
        exc = PyObject_CallFunction(PyExc_ConnectionError, "is",
                                    syscall_errno ? syscall_errno : EPROTO, reason);
    if (!exc) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *r = PyUnicode_FromString(reason);
    PyObject *code = PyLong_FromLong((c->tls_state & TLS_HANDSHAKE) ? verify : 0);
    PyObject *msg = PyUnicode_FromString((c->tls_state & TLS_HANDSHAKE) ? vmsg : "");
    if (!r || !code || !msg || PyObject_SetAttrString(exc, "tls_reason", r) < 0 ||
        PyObject_SetAttrString(exc, "verify_code", code) < 0 ||
        PyObject_SetAttrString(exc, "verify_message", msg) < 0)
        PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(code);
    Py_XDECREF(msg);
    return exc;
}

/* A fatal error: the connection is lost with it (Python hears why). */
static void tls_lost(ConnObject *c, unsigned long err, int syscall_errno) {
    PyObject *exc = tls_exception(c, err, syscall_errno);
    c->tls_state |= TLS_FAILED;
    ERR_clear_error();
    conn_lost(c, exc);
    Py_XDECREF(exc);
}

static void on_readable(ConnObject *c);

/* Drive the handshake (a read event, or its start). On success Python is told if it asked
 * (protocol.tls_done(None)) and whatever came behind the handshake is read at once. */
static void tls_handshake_step(ConnObject *c) {
    SSL *ssl = c->tls;
    c->tls_state &= ~TLS_DRAINED;
    c->tls_raw_in = 0;
    ERR_clear_error();
    int r = SSL_do_handshake(ssl);
    if (r != 1) {
        int err = SSL_get_error(ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
        unsigned long e = ERR_peek_last_error();
        int sys = err == SSL_ERROR_SYSCALL ? c->tls_errno : 0;
        if (!e && !sys && (c->tls_state & TLS_EOF)) sys = ECONNRESET;
        tls_lost(c, e, sys);
        return;
    }
    c->tls_state &= ~TLS_HANDSHAKE;
    if (c->tls_state & TLS_VERIFIED) {
        X509 *peer = SSL_get1_peer_certificate(ssl);
        if (!peer || SSL_get_verify_result(ssl) != X509_V_OK) c->tls_state &= ~TLS_VERIFIED;
        X509_free(peer);
    }
    if (c->tls_state & TLS_NOTIFY) {
        c->tls_state &= ~TLS_NOTIFY;
        Py_INCREF(c);
        PyObject *res = py_method(c->protocol, "tls_done", NULL);
        if (!res) {
            report_error(c->engine);
            conn_lost(c, NULL);
        }
        Py_XDECREF(res);
        Py_DECREF(c);
        if (c->flags & F_CLOSED) return;
    }
    /* Records that came with the handshake's last flight are in OpenSSL's buffer already. */
    if (wants_read(c)) on_readable(c);
}

/* Decrypt what this read event brings into ``out`` (room for TLS_SCRATCH bytes): the bytes
 * (> 0); 0 at the end of the stream (close_notify, or the socket's end); -1 with errno EAGAIN
 * when no application data came (a ticket, a partial record); -1 after a fatal error, which
 * was already reported (the connection is lost). */
static ssize_t tls_recv(ConnObject *c, char *out) {
    SSL *ssl = c->tls;
    if (c->tls_state & TLS_EOF && !SSL_has_pending(ssl)) return 0;
    c->tls_state &= ~TLS_DRAINED;
    c->tls_raw_in = 0;
    size_t total = 0;
    for (;;) {
        if (TLS_SCRATCH - total < TLS_RECORD_MAX) break; /* cannot happen: see the budget */
        ERR_clear_error();
        int r = SSL_read(ssl, out + total, (int)(TLS_SCRATCH - total));
        if (r > 0) {
            total += (size_t)r;
            continue;
        }
        int err = SSL_get_error(ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) break;
        if (err == SSL_ERROR_ZERO_RETURN) {
            c->tls_state |= TLS_EOF;
            if (total) return (ssize_t)total;
            return 0;
        }
        unsigned long e = ERR_peek_last_error();
        int sys = err == SSL_ERROR_SYSCALL ? c->tls_errno : 0;
        if (!e && !sys) { /* the socket ended with no close_notify: an end all the same */
            c->tls_state |= TLS_EOF;
            return total ? (ssize_t)total : 0;
        }
        tls_lost(c, e, sys);
        errno = EPROTO;
        return -1;
    }
    if (total) return (ssize_t)total;
    if (c->tls_state & TLS_EOF) return 0;
    errno = EAGAIN;
    return -1;
}

/* Encrypt and send (or queue) ``n`` bytes: 0, or -1 with errno when the connection broke. */
static int tls_send(ConnObject *c, const char *data, size_t n) {
    SSL *ssl = c->tls;
    if (c->tls_state & TLS_FAILED) {
        errno = EPIPE;
        return -1;
    }
    while (n) {
        int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
        ERR_clear_error();
        c->tls_errno = 0;
        int r = SSL_write(ssl, data, chunk);
        if (r <= 0) {
            int err = SSL_get_error(ssl, r);
            c->tls_state |= TLS_FAILED;
            ERR_clear_error();
            errno = err == SSL_ERROR_SYSCALL && c->tls_errno ? c->tls_errno : EPIPE;
            return -1;
        }
        data += r;
        n -= (size_t)r;
    }
    return 0;
}

/* get_extra_info("peercert") of a TLS Conn: as ssl.SSLSocket.getpeercert() gives the subject
 * (((name, value),), ...), for a certificate that was asked for and verified; else None. */
static PyObject *tls_peercert(ConnObject *c) {
    if (!c->tls || !(c->tls_state & TLS_VERIFIED) || (c->tls_state & TLS_HANDSHAKE))
        Py_RETURN_NONE;
    X509 *cert = SSL_get1_peer_certificate((SSL *)c->tls);
    if (!cert) Py_RETURN_NONE;
    X509_NAME *name = X509_get_subject_name(cert);
    int n = name ? X509_NAME_entry_count(name) : 0;
    PyObject *subject = PyTuple_New(n);
    for (int i = 0; subject && i < n; i++) {
        X509_NAME_ENTRY *entry = X509_NAME_get_entry(name, i);
        int nid = OBJ_obj2nid(X509_NAME_ENTRY_get_object(entry));
        const char *key = nid != NID_undef ? OBJ_nid2ln(nid) : "unknown";
        unsigned char *utf8 = NULL;
        int len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(entry));
        PyObject *rdn = len >= 0 ? Py_BuildValue("((ss#))", key, utf8, (Py_ssize_t)len) : NULL;
        OPENSSL_free(utf8);
        if (!rdn) {
            Py_CLEAR(subject);
            break;
        }
        PyTuple_SET_ITEM(subject, i, rdn);
    }
    X509_free(cert);
    if (!subject) return NULL;
    PyObject *d = Py_BuildValue("{sN}", "subject", subject);
    return d;
}

/* Conn.tls_info: "version/cipher" of an established session, as SHOW CLIENTS prints it. */
static PyObject *conn_get_tls_info(ConnObject *c, void *unused) {
    if (!c->tls || (c->tls_state & TLS_HANDSHAKE)) return PyUnicode_FromString("");
    SSL *ssl = c->tls;
    const char *cipher = SSL_get_cipher_name(ssl);
    return PyUnicode_FromFormat("%s/%s", SSL_get_version(ssl), cipher ? cipher : "");
}

/* Conn.start_tls(context, host=None, verify_host=False): begin a handshake on this socket
 * (Python already exchanged SSLRequest and 'S'); protocol.tls_done() is called once it is
 * done, or connection_lost(exc) if it fails (exc.verify_message: why a certificate was
 * refused). */
static PyObject *conn_start_tls(ConnObject *c, PyObject *args) {
    TLSContextObject *ctx;
    const char *host = NULL;
    int verify_host = 0;
    if (!PyArg_ParseTuple(args, "O!|zp", &TLSContextType, &ctx, &host, &verify_host))
        return NULL;
    if (c->flags & (F_CLOSED | F_CLOSING)) Py_RETURN_FALSE;
    if (c->mode == MODE_FAST || c->kind == KIND_LISTENER || c->kind == KIND_HANDOFF ||
        buf_len(&c->rb)) {
        PyErr_SetString(PyExc_RuntimeError, "TLS starts only on a fresh connection");
        return NULL;
    }
    if (tls_begin(c, ctx, host, verify_host) < 0) return NULL;
    c->tls_state |= TLS_NOTIFY;
    Py_INCREF(c);
    if (!ctx->server_side) tls_handshake_step(c); /* the ClientHello goes now */
    update_events(c);
    Py_DECREF(c);
    Py_RETURN_TRUE;
}

/* The engine listener's answer to a client's SSLRequest when Engine.client_tls is set. */
static int tls_accept_client(ConnObject *c) {
    PyObject *ctx = c->engine->client_tls;
    if (!ctx) return 0;
    if (conn_send(c, "S", 1) < 0) {
        lost_errno(c, errno);
        return 1;
    }
    if (tls_begin(c, (TLSContextObject *)ctx, NULL, 0) < 0) {
        report_error(c->engine);
        conn_lost(c, NULL);
    }
    return 1;
}

static int tls_module_init(PyObject *m) {
    conn_bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "pgpilot conn");
    if (!conn_bio_method || !BIO_meth_set_write(conn_bio_method, conn_bio_write) ||
        !BIO_meth_set_read(conn_bio_method, conn_bio_read) ||
        !BIO_meth_set_ctrl(conn_bio_method, conn_bio_ctrl) ||
        !BIO_meth_set_create(conn_bio_method, conn_bio_create)) {
        PyErr_SetString(PyExc_ImportError, "cannot make the engine's TLS BIO");
        return -1;
    }
    tls_scratch = PyMem_Malloc(TLS_SCRATCH);
    if (!tls_scratch) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyType_Ready(&TLSContextType) < 0) return -1;
    if (PyModule_AddObjectRef(m, "TLSContext", (PyObject *)&TLSContextType) < 0) return -1;
    return PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION));
}

#define TLS_TYPE_CHECK(o) PyObject_TypeCheck((o), &TLSContextType)

#else /* no OpenSSL headers at build time: TLS stays with Python (tls.py) */

static int tls_active(ConnObject *c) { return 0; }
static void tls_free(ConnObject *c) {}
static void tls_close(ConnObject *c) {}
static void tls_handshake_step(ConnObject *c) {}
static ssize_t tls_recv(ConnObject *c, char *out) {
    errno = ENOTSUP;
    return -1;
}
static int tls_send(ConnObject *c, const char *data, size_t n) {
    errno = ENOTSUP;
    return -1;
}
static PyObject *tls_peercert(ConnObject *c) { Py_RETURN_NONE; }
static PyObject *conn_get_tls_info(ConnObject *c, void *unused) { return PyUnicode_FromString(""); }
static PyObject *conn_start_tls(ConnObject *c, PyObject *args) {
    PyErr_SetString(PyExc_NotImplementedError, "built without OpenSSL");
    return NULL;
}
static int tls_accept_client(ConnObject *c) { return 0; }
static int tls_module_init(PyObject *m) { return 0; }
static char tls_scratch[1];
#define TLS_TYPE_CHECK(o) 0

#endif
