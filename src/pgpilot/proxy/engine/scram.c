/* SCRAM-SHA-256 logins run by the engine: both round trips, the proof check and the server
 * signature, against a secret Python chose (scram_login) or a login route's (logins.c). The
 * hashing is OpenSSL's when built with it, else the engine's own SHA-256 and HMAC. Keys and
 * proofs are wiped after use. */

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
