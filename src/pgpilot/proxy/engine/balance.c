/* Balancing clients between workers (workers = N): each worker's client count in shared
 * memory, and a freshly accepted client handed, unread, to a less busy sibling over its
 * hand-off socket (SCM_RIGHTS); the hand-offs a sibling sends are taken in here. */

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
