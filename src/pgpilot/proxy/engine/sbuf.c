/* Byte buffers (Buf) and the lowest layer of a Conn's socket: send/recv straight to the
 * kernel, and the epoll interest a Conn's state asks for (reading is stopped for a paused,
 * throttled or closing socket, and capped for a queued client or one waiting to be handed
 * back). The one file that knows how a buffer's memory is kept: spare blocks reused between
 * connections, none kept by an idle one. See engine.h, "when buffers move". */

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
