/*
 * storage_demo.c - a guided tour of broker_core's storage engine.
 *
 *   storage_demo <empty directory>        (`make demo` passes a fresh mktemp -d)
 *
 * It builds a store in <dir>/store and walks through, printing each step:
 *   1. open a store in SYNC flush mode;
 *   2. create topic "orders" with 4 queues;
 *   3. append 3 orders x 4 events (keys order-1..order-3, JSON bodies, a tag,
 *      a "traceparent" header), interleaved across keys;
 *   4. read every queue back: each key's events come back in order, on the
 *      one queue its key maps to;
 *   5. look one message up by its id;
 *   6. kill -9 a child process while it is appending, reopen (recovery runs)
 *      and check that every message the child had been told was saved is
 *      there, intact and in per-key order;
 *   7. append garbage to the newest log segment (a torn write), reopen, and
 *      check that the garbage was cut off and nothing else was lost.
 *
 * Every "[ok]" line is a check the program made; a failed check prints
 * "[FAILED]" and the program exits 1.  Exit 2 means the demo could not run
 * (bad arguments, fork/pipe failure).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "demo_util.h"
#include "broker/record.h"
#include "broker/status.h"
#include "broker/store.h"
#include "broker/uuid.h"

#define PATH_CAP 2048       /* longest store path this demo handles */

/* ---- checks: demo_check() and the rest are in demo_util.h -------------------- */

/* Copy a byte view into a NUL-terminated string (truncating). */
/* Options used for every open in this demo. */
static void demo_opts(brk_store_opts *o)
{
    brk_store_opts_init(o);
    o->flush_mode = BRK_FLUSH_SYNC;
    o->segment_bytes = 64u << 10;   /* 64 KiB: the kill test spans several
                                       segment files */
}

static brk_store *open_store(const char *dir)
{
    brk_store_opts o;
    demo_opts(&o);
    brk_store *s = NULL;
    char err[256];
    brk_status st = brk_store_open(&s, dir, &o, err, sizeof err);
    if (st != BRK_OK) {
        demo_check(false, "opening the store in %s: %s (%s)", dir,
              brk_status_name(st), err);
        return NULL;
    }
    return s;
}

/* ---- part 1: orders ---------------------------------------------------------- */

#define ORDERS 3
#define EVENTS 4
static const char *const k_events[EVENTS] = { "created", "paid", "packed",
                                              "shipped" };

typedef struct sent_event {
    int order, event;                 /* order-(order+1), k_events[event] */
    uint8_t id[BRK_UUID_LEN];
    uint16_t queue;
    uint64_t offset;
} sent_event;

static void order_key(int order, char *out, size_t cap)
{
    snprintf(out, cap, "order-%d", order + 1);
}

static void order_body(int order, int event, char *out, size_t cap)
{
    snprintf(out, cap, "{\"order\":\"order-%d\",\"event\":\"%s\"}", order + 1,
             k_events[event]);
}

static void order_trace(int order, int event, char *out, size_t cap)
{
    /* W3C trace context: one trace per order, one span per event. */
    snprintf(out, cap, "00-4bf92f3577b34da6a3ce929d0e0e47%02d-00f067aa0ba902%02d-01",
             order + 1, event + 1);
}

/* Append the 12 order events, interleaved across keys. */
static bool append_orders(brk_store *s, sent_event sent[ORDERS * EVENTS])
{
    bool all_ok = true;
    int n = 0;
    for (int ev = 0; ev < EVENTS; ev++) {
        for (int o = 0; o < ORDERS; o++, n++) {
            char key[32], body[96], trace[80], id[BRK_UUID_STR_LEN + 1];
            uint8_t props[128];
            size_t props_len = 0;
            order_key(o, key, sizeof key);
            order_body(o, ev, body, sizeof body);
            order_trace(o, ev, trace, sizeof trace);
            brk_prop hdr = { { "traceparent", strlen("traceparent") },
                             { trace, strlen(trace) } };
            brk_status st = brk_props_encode(&hdr, 1, props, sizeof props,
                                             &props_len);
            if (st != BRK_OK) {
                demo_check(false, "encoding the traceparent header: %s",
                      brk_status_name(st));
                return false;
            }
            brk_append_req req = {
                .topic = "orders",
                .queue = -1,                              /* choose by key */
                .key = { key, strlen(key) },
                .tag = { k_events[ev], strlen(k_events[ev]) },
                .props = { props, props_len },
                .body = { body, strlen(body) },
                .flags = BRK_RECF_BODY_JSON,
            };
            brk_append_res res;
            st = brk_store_append(s, &req, &res);
            if (st != BRK_OK) {
                demo_check_st(st, s, "appending an order event");
                return false;
            }
            sent[n] = (sent_event){ .order = o, .event = ev,
                                    .queue = res.queue,
                                    .offset = res.queue_offset };
            memcpy(sent[n].id, res.msg_id, BRK_UUID_LEN);
            brk_uuid_format(res.msg_id, id);
            printf("  %-8s %-8s -> queue %u, offset %" PRIu64 ", id %s\n", key,
                   k_events[ev], (unsigned)res.queue, res.queue_offset, id);
        }
    }
    return all_ok;
}

/* Does `r` hold exactly what was sent as `e`? */
static bool order_record_matches(const brk_record *r, const sent_event *e)
{
    char key[32], body[96], trace[80];
    order_key(e->order, key, sizeof key);
    order_body(e->order, e->event, body, sizeof body);
    order_trace(e->order, e->event, trace, sizeof trace);
    brk_bytes got_trace;
    return r->type == BRK_REC_MSG && r->flags == BRK_RECF_BODY_JSON
           && memcmp(r->msg_id, e->id, BRK_UUID_LEN) == 0
           && r->queue == e->queue && r->queue_offset == e->offset
           && demo_bytes_eq(r->topic, "orders") && demo_bytes_eq(r->key, key)
           && demo_bytes_eq(r->tag, k_events[e->event]) && demo_bytes_eq(r->body, body)
           && brk_props_get(r->props, "traceparent", &got_trace) == BRK_OK
           && demo_bytes_eq(got_trace, trace);
}

/* Read every queue of "orders"; check that each key's events come back in
 * order, all on the queue its key maps to, byte for byte as sent.  `verbose`
 * prints every record read. */
static void verify_orders(brk_store *s, const sent_event sent[ORDERS * EVENTS],
                          bool verbose)
{
    brk_topic_info info;
    if (!demo_check_st(brk_topic_get(s, "orders", &info), s, "topic \"orders\" is there"))
        return;
    int seen[ORDERS][EVENTS];          /* read order of each order's events */
    int nseen[ORDERS] = {0};
    int queue_of[ORDERS];
    bool one_queue[ORDERS], intact = true;
    size_t total = 0;
    for (int o = 0; o < ORDERS; o++) {
        queue_of[o] = -1;
        one_queue[o] = true;
    }
    for (uint16_t q = 0; q < info.queues; q++) {
        uint64_t from = 0;
        if (verbose)
            printf("  queue %u:", (unsigned)q);
        bool any = false;
        for (;;) {
            brk_batch *b = NULL;
            brk_status st = brk_store_read(s, "orders", q, from, 100, &b);
            if (st != BRK_OK) {
                demo_check_st(st, s, "reading a queue of \"orders\"");
                return;
            }
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            for (size_t i = 0; i < b->count; i++) {
                const brk_record *r = &b->recs[i];
                const sent_event *e = NULL;
                for (int k = 0; k < ORDERS * EVENTS; k++)
                    if (memcmp(sent[k].id, r->msg_id, BRK_UUID_LEN) == 0)
                        e = &sent[k];
                total++;
                any = true;
                char key[32], tag[32];
                demo_to_cstr(r->key, key, sizeof key);
                demo_to_cstr(r->tag, tag, sizeof tag);
                if (verbose)
                    printf("\n    offset %" PRIu64 ": %s %s", r->queue_offset,
                           key, tag);
                if (!e || !order_record_matches(r, e)) {
                    intact = false;
                    continue;
                }
                int o = e->order;
                if (queue_of[o] == -1)
                    queue_of[o] = q;
                else if (queue_of[o] != q)
                    one_queue[o] = false;
                if (nseen[o] < EVENTS)
                    seen[o][nseen[o]] = e->event;
                nseen[o]++;
            }
            from = b->next_offset;
            brk_batch_free(b);
        }
        if (verbose)
            printf("%s\n", any ? "" : " (empty: no key maps here)");
    }
    demo_check(intact && total == ORDERS * EVENTS,
          "all %d events read back, each with the id, key, tag, JSON body and "
          "traceparent header it was written with (%zu read)",
          ORDERS * EVENTS, total);
    for (int o = 0; o < ORDERS; o++) {
        char key[32];
        order_key(o, key, sizeof key);
        bool in_order = nseen[o] == EVENTS;
        for (int ev = 0; in_order && ev < EVENTS; ev++)
            in_order = seen[o][ev] == ev;
        uint16_t mapped = UINT16_MAX;
        brk_status st = brk_topic_queue_for_key(s, "orders", key, strlen(key),
                                                &mapped);
        demo_check(in_order && one_queue[o] && st == BRK_OK && mapped == queue_of[o],
              "%s: created, paid, packed, shipped came back in that order, "
              "all on queue %d, the queue its key maps to", key, queue_of[o]);
    }
}

/* ---- part 2: kill -9 and recover ------------------------------------------- */

#define ACCOUNTS 8
#define CHILD_MAX_APPENDS 2000000u   /* safety stop; the parent kills long before */
#define KILL_AFTER_MS 200

/* What the child tells the parent after each acknowledged append.  Smaller
 * than PIPE_BUF, so each write() to the pipe is atomic. */
typedef struct ack {
    uint32_t account;                 /* key "account-<n>" */
    uint32_t seq;                     /* per-key sequence number, 0, 1, ... */
    uint16_t queue;
    uint64_t offset;
    uint8_t id[BRK_UUID_LEN];
} ack;

static void payment_key(uint32_t account, char *out, size_t cap)
{
    snprintf(out, cap, "account-%" PRIu32, account);
}

static void payment_body(uint32_t account, uint32_t seq, char *out, size_t cap)
{
    snprintf(out, cap, "{\"account\":\"account-%" PRIu32 "\",\"seq\":%" PRIu32
             ",\"amount_cents\":%" PRIu32 "}", account, seq,
             (account * 7919u + seq * 104729u) % 100000u);
}

/* The child: append keyed payments in SYNC mode until killed, reporting each
 * acknowledged append on `wfd`.  Never returns; never touches stdout. */
static void child_main(const char *dir, int wfd)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);     /* never outlive the demo */
    brk_store_opts o;
    demo_opts(&o);
    brk_store *s = NULL;
    if (brk_store_open(&s, dir, &o, NULL, 0) != BRK_OK)
        _exit(3);
    uint32_t seq[ACCOUNTS] = {0};
    uint64_t x = 88172645463325252ull;    /* xorshift64: which key is next */
    for (uint32_t i = 0; i < CHILD_MAX_APPENDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint32_t account = (uint32_t)(x % ACCOUNTS);
        char key[32], body[128];
        payment_key(account, key, sizeof key);
        payment_body(account, seq[account], body, sizeof body);
        brk_append_req req = {
            .topic = "payments",
            .queue = -1,
            .key = { key, strlen(key) },
            .tag = { "payment", 7 },
            .body = { body, strlen(body) },
            .flags = BRK_RECF_BODY_JSON,
        };
        brk_append_res res;
        if (brk_store_append(s, &req, &res) != BRK_OK)
            _exit(4);
        /* The append returned OK: the record is on disk.  Tell the parent. */
        ack a;
        memset(&a, 0, sizeof a);
        a.account = account;
        a.seq = seq[account];
        a.queue = res.queue;
        a.offset = res.queue_offset;
        memcpy(a.id, res.msg_id, BRK_UUID_LEN);
        if (write(wfd, &a, sizeof a) != (ssize_t)sizeof a)
            _exit(5);
        seq[account]++;
    }
    brk_store_close(s);
    _exit(0);
}

typedef struct ack_list {
    ack *v;
    size_t n, cap;
    size_t partial;                   /* bytes of an incomplete ack in buf */
    uint8_t buf[sizeof(ack)];
} ack_list;

/* Read what the pipe has; false at EOF (or on a read error). */
static bool read_acks(int fd, ack_list *l)
{
    uint8_t chunk[4096];
    ssize_t n = read(fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR)
        return true;
    if (n <= 0)
        return false;
    for (ssize_t i = 0; i < n; i++) {
        l->buf[l->partial++] = chunk[i];
        if (l->partial < sizeof(ack))
            continue;
        l->partial = 0;
        if (l->n == l->cap) {
            size_t nc = l->cap ? l->cap * 2 : 1024;
            ack *nv = realloc(l->v, nc * sizeof *nv);
            if (!nv)
                return false;
            l->v = nv;
            l->cap = nc;
        }
        memcpy(&l->v[l->n++], l->buf, sizeof(ack));
    }
    return true;
}

typedef struct pay_rec {
    uint32_t account, seq;
    uint8_t id[BRK_UUID_LEN];
    bool intact;                      /* key, tag, flags and body as written */
} pay_rec;

/* Read every queue of "payments" and check it against what the child
 * acknowledged.  Prints its findings; *total gets the number of messages. */
static void verify_payments(brk_store *s, const ack_list *acks, size_t *total)
{
    *total = 0;
    brk_topic_info info;
    if (!demo_check_st(brk_topic_get(s, "payments", &info), s,
                  "topic \"payments\" is there"))
        return;
    pay_rec *recs[BRK_QUEUES_MAX] = {0};
    size_t nrecs[BRK_QUEUES_MAX] = {0};
    bool read_ok = true, dense = true;
    for (uint16_t q = 0; q < info.queues && read_ok; q++) {
        uint64_t min = 0, max = 0;
        if (brk_store_queue_range(s, "payments", q, &min, &max) != BRK_OK) {
            read_ok = false;
            break;
        }
        recs[q] = calloc(max ? max : 1, sizeof *recs[q]);
        if (!recs[q]) {
            read_ok = false;
            break;
        }
        uint64_t from = 0;
        while (read_ok) {
            brk_batch *b = NULL;
            brk_status st = brk_store_read(s, "payments", q, from, 1000, &b);
            if (st != BRK_OK) {
                demo_check_st(st, s, "reading a queue of \"payments\"");
                read_ok = false;
                break;
            }
            if (b->count == 0) {
                brk_batch_free(b);
                break;
            }
            for (size_t i = 0; i < b->count; i++) {
                const brk_record *r = &b->recs[i];
                if (r->queue_offset != nrecs[q] || nrecs[q] >= max) {
                    dense = false;
                    continue;
                }
                pay_rec *p = &recs[q][nrecs[q]++];
                memcpy(p->id, r->msg_id, BRK_UUID_LEN);
                char key[32], body[128], want[128];
                demo_to_cstr(r->key, key, sizeof key);
                demo_to_cstr(r->body, body, sizeof body);
                p->intact = sscanf(key, "account-%" SCNu32, &p->account) == 1
                            && sscanf(body, "{\"account\":\"account-%*u\",\"seq\":%"
                                      SCNu32, &p->seq) == 1
                            && p->account < ACCOUNTS;
                if (p->intact) {
                    payment_body(p->account, p->seq, want, sizeof want);
                    p->intact = demo_bytes_eq(r->body, want) && demo_bytes_eq(r->tag, "payment")
                                && r->flags == BRK_RECF_BODY_JSON
                                && r->queue == q;
                }
            }
            from = b->next_offset;
            brk_batch_free(b);
        }
        *total += nrecs[q];
    }
    if (!read_ok) {
        demo_check(false, "read every queue of \"payments\"");
        goto out;
    }

    /* Every acknowledged message is where the child was told it is. */
    size_t missing = 0, wrong = 0;
    for (size_t i = 0; i < acks->n; i++) {
        const ack *a = &acks->v[i];
        if (a->queue >= info.queues || a->offset >= nrecs[a->queue]) {
            if (missing++ < 5)
                printf("      missing: account-%" PRIu32 " seq %" PRIu32
                       " (queue %u offset %" PRIu64 ")\n", a->account, a->seq,
                       (unsigned)a->queue, a->offset);
            continue;
        }
        const pay_rec *p = &recs[a->queue][a->offset];
        if (!p->intact || p->account != a->account || p->seq != a->seq
            || memcmp(p->id, a->id, BRK_UUID_LEN) != 0) {
            if (wrong++ < 5)
                printf("      different: queue %u offset %" PRIu64 "\n",
                       (unsigned)a->queue, a->offset);
        }
    }
    demo_check(missing == 0 && wrong == 0 && dense,
          "all %zu acknowledged messages are present and intact: same id, "
          "queue, offset, key and body (%zu missing, %zu different)",
          acks->n, missing, wrong);

    /* Per-key order: each account's messages sit on one queue with
     * sequence numbers 0, 1, 2, ... in offset order. */
    uint32_t next_seq[ACCOUNTS] = {0}, max_acked[ACCOUNTS] = {0};
    int queue_of[ACCOUNTS];
    bool has_ack[ACCOUNTS] = {0}, order_ok = true, all_intact = true;
    for (int k = 0; k < ACCOUNTS; k++)
        queue_of[k] = -1;
    for (size_t i = 0; i < acks->n; i++) {
        const ack *a = &acks->v[i];
        if (!has_ack[a->account] || a->seq > max_acked[a->account])
            max_acked[a->account] = a->seq;
        has_ack[a->account] = true;
    }
    for (uint16_t q = 0; q < info.queues; q++) {
        for (size_t i = 0; i < nrecs[q]; i++) {
            const pay_rec *p = &recs[q][i];
            if (!p->intact) {
                all_intact = false;
                continue;
            }
            if (queue_of[p->account] == -1)
                queue_of[p->account] = q;
            if (queue_of[p->account] != q || p->seq != next_seq[p->account])
                order_ok = false;
            next_seq[p->account]++;
        }
    }
    for (int k = 0; k < ACCOUNTS; k++) {
        char key[32];
        uint16_t mapped = UINT16_MAX;
        payment_key((uint32_t)k, key, sizeof key);
        if (has_ack[k] && next_seq[k] <= max_acked[k])
            order_ok = false;
        if (queue_of[k] != -1
            && (brk_topic_queue_for_key(s, "payments", key, strlen(key), &mapped)
                    != BRK_OK
                || mapped != queue_of[k]))
            order_ok = false;
    }
    demo_check(order_ok && all_intact,
          "per-key order holds: each of the %d accounts is on one queue (the "
          "one its key maps to) with sequence numbers 0, 1, 2, ... and no gaps",
          ACCOUNTS);
out:
    for (uint16_t q = 0; q < BRK_QUEUES_MAX; q++)
        free(recs[q]);
}

/* Look the last acknowledged message up by id. */
static void lookup_last_ack(brk_store *s, const ack_list *acks)
{
    if (acks->n == 0)
        return;
    const ack *a = &acks->v[acks->n - 1];
    char id[BRK_UUID_STR_LEN + 1];
    brk_uuid_format(a->id, id);
    brk_batch *b = NULL;
    brk_status st = brk_store_lookup(s, a->id, &b);
    bool ok = st == BRK_OK && b->count == 1 && b->recs[0].queue == a->queue
              && b->recs[0].queue_offset == a->offset;
    demo_check(ok, "the last acknowledged message (%s) is found by its id on "
          "queue %u offset %" PRIu64, id, (unsigned)a->queue, a->offset);
    brk_batch_free(b);
}

/* While the child holds the store, opening it here must be refused. */
static void probe_lock(const char *dir)
{
    brk_store_opts o;
    demo_opts(&o);
    o.no_background = true;
    brk_store *other = NULL;
    brk_status st = brk_store_open(&other, dir, &o, NULL, 0);
    demo_check(st == BRK_LOCKED, "while the child is writing, opening the same "
          "store from this process is refused: %s", brk_status_name(st));
    brk_store_close(other);
}

/* Fork the appender, kill -9 it KILL_AFTER_MS after its first ack.  Returns
 * false if the child could not be started. */
static bool run_and_kill_child(const char *dir, ack_list *acks)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        perror("pipe2");
        return false;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        close(fds[0]);
        close(fds[1]);
        return false;
    }
    if (pid == 0) {
        close(fds[0]);
        child_main(dir, fds[1]);
    }
    close(fds[1]);
    printf("  Started child process %d; it appends payments to \"payments\" "
           "(keys account-0..account-%d) as fast as it can.\n",
           (int)pid, ACCOUNTS - 1);

    int64_t start = demo_mono_ms(), kill_at = start + 10000;  /* if it never acks */
    bool first = false, killed = false, eof = false;
    int64_t killed_ms = 0;
    while (!eof) {
        int64_t now = demo_mono_ms();
        if (!first && acks->n > 0) {
            first = true;
            kill_at = now + KILL_AFTER_MS;
            probe_lock(dir);
        }
        if (!killed && now >= kill_at) {
            kill(pid, SIGKILL);
            killed = true;
            killed_ms = now - start;
        }
        struct pollfd p = { .fd = fds[0], .events = POLLIN };
        int timeout = killed ? 1000 : (int)(kill_at - now);
        int pr = poll(&p, 1, timeout < 0 ? 0 : timeout);
        if (pr > 0)
            eof = !read_acks(fds[0], acks);
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    bool by_kill = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    demo_check(killed && by_kill,
          "the child was killed with SIGKILL %" PRId64 " ms after it started, "
          "while appending (it had not exited on its own)", killed_ms);
    if (!by_kill && WIFEXITED(status))
        printf("      (the child exited with status %d first)\n",
               WEXITSTATUS(status));
    demo_check(acks->n > 0, "before dying it was told \"saved\" (append returned "
          "OK in SYNC mode) for %zu messages, and reported each one to us "
          "through a pipe", acks->n);
    return true;
}

/* ---- part 3: torn tail ------------------------------------------------------- */

/* The newest segment file in <dir>/log: the highest 20-digit name. */
static bool newest_segment(const char *store_dir, char *out, size_t cap)
{
    char logdir[PATH_CAP + 8];
    snprintf(logdir, sizeof logdir, "%s/log", store_dir);
    DIR *d = opendir(logdir);
    if (!d)
        return false;
    char best[32] = "";
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strlen(e->d_name) == 20 && strspn(e->d_name, "0123456789") == 20
            && strcmp(e->d_name, best) > 0) {
            memcpy(best, e->d_name, 20);
            best[20] = '\0';
        }
    }
    closedir(d);
    if (!best[0])
        return false;
    snprintf(out, cap, "%s/%s", logdir, best);
    return true;
}

static long long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s <empty directory>\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strlen(argv[1]) > PATH_CAP - 16) {
        fprintf(stderr, "%s: directory name too long\n", argv[0]);
        return 2;
    }
    char dir[PATH_CAP];
    snprintf(dir, sizeof dir, "%s/store", argv[1]);
    sent_event sent[ORDERS * EVENTS];
    ack_list acks = {0};
    brk_store_stats stats;
    brk_store *s = NULL;

    printf("outboxd storage engine demo (broker_core)\n");

    demo_heading("1. Open a store");
    printf("  A store is one directory. Opening %s in SYNC mode: an append\n"
           "  returns only after its record is on disk (fdatasync).\n", dir);
    if ((s = open_store(dir)) == NULL)
        goto done;
    brk_store_get_stats(s, &stats);
    demo_check(stats.log_end == 0, "the store is open and empty (log end at byte 0)");

    demo_heading("2. Create a topic");
    printf("  A topic is split into queues. Messages with the same key always go\n"
           "  to the same queue, so they stay in order.\n");
    brk_topic_info info;
    if (!demo_check_st(brk_topic_create(s, "orders", 4), s,
                  "created topic \"orders\" with 4 queues"))
        goto done;
    demo_check(brk_topic_get(s, "orders", &info) == BRK_OK && info.queues == 4
          && info.writable == 4 && info.messages == 0,
          "the store reports 4 queues, all writable, 0 messages");

    demo_heading("3. Append 12 events");
    printf("  3 orders x 4 events (created, paid, packed, shipped), interleaved.\n"
           "  key = order id, tag = event name, body = JSON, header = traceparent.\n"
           "  Each append returns the message id and where it landed:\n");
    if (!append_orders(s, sent))
        goto done;
    demo_check(brk_topic_get(s, "orders", &info) == BRK_OK && info.messages == 12,
          "the topic now holds 12 messages");

    demo_heading("4. Read every queue back");
    verify_orders(s, sent, true);

    demo_heading("5. Look a message up by its id");
    {
        const sent_event *e = &sent[1 * ORDERS + 1];    /* order-2 paid */
        char id[BRK_UUID_STR_LEN + 1], body[96];
        brk_uuid_format(e->id, id);
        printf("  Looking up %s (order-2 paid).\n", id);
        brk_batch *b = NULL;
        brk_status st = brk_store_lookup(s, e->id, &b);
        if (demo_check_st(st, s, "brk_store_lookup found it")) {
            demo_to_cstr(b->recs[0].body, body, sizeof body);
            demo_check(b->count == 1 && order_record_matches(&b->recs[0], e),
                  "it is order-2 paid on queue %u offset %" PRIu64 ", body %s",
                  (unsigned)b->recs[0].queue, b->recs[0].queue_offset, body);
        }
        brk_batch_free(b);
        uint8_t unknown[BRK_UUID_LEN] = {0};
        st = brk_store_lookup(s, unknown, &b);
        demo_check(st == BRK_NOTFOUND, "an id that was never written gives NOTFOUND");
        brk_batch_free(b);
    }

    demo_heading("6. Kill -9 a writer, then recover");
    if (!demo_check_st(brk_topic_create(s, "payments", 4), s,
                  "created topic \"payments\" with 4 queues for the writer"))
        goto done;
    printf("  Closing the store: only one process may have a store open (a\n"
           "  lock file enforces it), and the child process below opens it.\n");
    demo_check_st(brk_store_close(s), NULL, "store closed");
    s = NULL;
    if (!run_and_kill_child(dir, &acks)) {
        free(acks.v);
        return 2;
    }
    printf("  Reopening the store. Recovery scans the log written since the last\n"
           "  checkpoint, cuts off any torn tail and rebuilds the indexes.\n");
    if ((s = open_store(dir)) == NULL)
        goto done;
    brk_store_get_stats(s, &stats);
    printf("  Recovery stats: recovered_records = %" PRIu64 " (records\n"
           "  re-indexed from the log), truncated_bytes = %" PRIu64 " (bytes of\n"
           "  torn tail cut off), segments = %" PRIu64 ".\n",
           stats.recovered_records, stats.truncated_bytes, stats.segments);
    size_t total = 0;
    verify_payments(s, &acks, &total);
    if (total >= acks.n)
        demo_check(true, "the log holds %zu payments: the %zu acknowledged ones "
              "plus %zu the child wrote but was killed before reporting "
              "(allowed: it never said they were saved)",
              total, acks.n, total - acks.n);
    else
        demo_check(false, "the log holds only %zu payments, fewer than the %zu "
              "acknowledged", total, acks.n);
    lookup_last_ack(s, &acks);
    verify_orders(s, sent, false);

    demo_heading("7. A torn tail");
    {
        brk_topic_info orders_before, pay_before;
        brk_topic_get(s, "orders", &orders_before);
        brk_topic_get(s, "payments", &pay_before);
        demo_check_st(brk_store_close(s), NULL, "store closed cleanly");
        s = NULL;
        char seg[PATH_CAP + 64];
        if (!demo_check(newest_segment(dir, seg, sizeof seg),
                   "found the newest log segment file"))
            goto done;
        long long size_before = file_size(seg);
        static const char garbage[] = "half-written record!";
        const size_t glen = sizeof garbage - 1;
        int fd = open(seg, O_WRONLY | O_APPEND | O_CLOEXEC);
        bool wrote = fd >= 0 && write(fd, garbage, glen) == (ssize_t)glen
                     && fsync(fd) == 0;
        if (fd >= 0)
            close(fd);
        printf("  A crash in the middle of a write leaves part of a record at the\n"
               "  end of the log. Simulating it: appending %zu garbage bytes to\n"
               "  %s (%lld bytes).\n", glen, seg, size_before);
        if (!demo_check(wrote && file_size(seg) == size_before + (long long)glen,
                   "the segment grew from %lld to %lld bytes", size_before,
                   file_size(seg)))
            goto done;
        if ((s = open_store(dir)) == NULL)
            goto done;
        brk_store_get_stats(s, &stats);
        printf("  Reopened: truncated_bytes = %" PRIu64 ".\n",
               stats.truncated_bytes);
        demo_check(stats.truncated_bytes == glen,
              "recovery cut off exactly the %zu garbage bytes", glen);
        demo_check(file_size(seg) == size_before,
              "the segment is back to %lld bytes", size_before);
        brk_topic_info orders_after, pay_after;
        demo_check(brk_topic_get(s, "orders", &orders_after) == BRK_OK
              && brk_topic_get(s, "payments", &pay_after) == BRK_OK
              && orders_after.messages == orders_before.messages
              && pay_after.messages == pay_before.messages,
              "message counts are unchanged: %" PRIu64 " orders events, %"
              PRIu64 " payments", orders_before.messages, pay_before.messages);
        verify_orders(s, sent, false);
        verify_payments(s, &acks, &total);
        lookup_last_ack(s, &acks);
    }

done:
    if (s)
        demo_check_st(brk_store_close(s), NULL, "store closed");
    free(acks.v);
    return demo_verdict(". Every acknowledged message survived "
                        "kill -9 and a torn tail, in order.");
}
