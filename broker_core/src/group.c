/*
 * group.c - consumer groups over a brk_store (see broker/group.h).
 *
 * A group is memory plus three kinds of topics in the store: the topics it
 * subscribes to (never written by this module), its retry topic(s) and its
 * dead-letter topic.  Progress lives in memory and in one state file.
 *
 * The code is split by responsibility: this file holds the registry
 * (open/close), configuration (brk_group_put), tag filters, groups,
 * members and subscriptions; group_recv.c receiving, settling, retries,
 * dead letters, replay and lag; group_state.c the state file and the
 * retention cursors; group_wait.c waiters, long polling, the store
 * listener and the background thread; group_priv.h the structures and
 * the lock order.
 *
 * CONSUMER STATE
 * ==============
 * Registry (brk_groups) -> group -> member -> per subscription -> per queue.
 *
 *   group       name, config, subscriptions (topic + tag filter), members,
 *               dlq replay offset, a receipt generation counter.
 *   member      clustering groups have exactly one, named "" (the whole
 *               group); broadcast groups one per member name, created by the
 *               member's first receive.  A member owns its in-flight
 *               counters (the flow-control bound applies per member, which
 *               for clustering is per group), its retry topic and a rotating
 *               queue index for receive.
 *   qstate      per (member, subscription, queue), for the topic's queues
 *               ("main") and, non-FIFO, the subscription's 18 retry queues:
 *                 committed  lowest queue offset not settled
 *                 next       lowest offset never handed out (>= committed)
 *                 fl[]       deliveries in flight, sorted by offset
 *                 sp[]       settled ranges [lo, hi) above committed
 *               Every offset in [committed, next) is either in fl or in sp;
 *               committed absorbs sp ranges as it reaches them.
 *
 * A receive (or wait) names a topic: an unknown group is created
 * (clustering, defaults, no filter) and a known group that does not
 * consume the topic yet gets a subscription to it (no filter), as topics
 * are created on first use.  Subscriptions are never removed.
 *
 * "Settled" means acked, skipped by the tag filter, dead-lettered, or (non-
 * FIFO) copied into the retry topic.  A filter is a set of tags; consume-
 * queue entries whose tag_hash is not in the set are skipped without
 * reading the record, a matching hash is confirmed on the record itself
 * (hash collisions are skipped too).
 *
 * STATE MACHINE OF A DELIVERED MESSAGE (per member)
 * =================================================
 *
 *          receive: count 1 (a retry copy: its "count" + 1), new gen
 *   NEW -----------------------------------------------------> OUT(c)
 *
 *   OUT(c) --ack (receipt gen matches)---------------------> SETTLED
 *   OUT(c) --change_invisibility--> OUT(c), new visible_at, same receipt
 *   OUT(c) --nack, or visible_at passed:
 *              c >= max_deliveries: dead letter appended --> SETTLED
 *              non-FIFO: retry copy appended ------------> SETTLED
 *                 (the copy is a NEW message of a retry queue, not
 *                  delivered before failure time + delay)
 *              FIFO: -----------------------------------> WAIT(c)
 *                 (keeps blocking its queue until failure time + delay)
 *   WAIT(c) --receive once due: count c+1, new gen--------> OUT(c+1)
 *   OUT(c) --the append of the copy failed---------------> OUT(c), due
 *                                                 again FAIL_BACKOFF_MS later
 *
 * delay = the nack's delay_ms rounded up to a level (at most 2 h), else
 * brk_group_retry_delay_ms(c).  The failure time is now for a nack and
 * visible_at for an expiry, however late the tick notices it.
 *
 * Expiry is found by brk_groups_tick (the background thread) at the
 * group's timer, and by a receive for the member, which handles its own
 * expired deliveries first.  An ack that comes after visible_at but before
 * the expiry was handled is still accepted (the receipt is still current).
 * A receipt is stale (BRK_CONFLICT) once its message is settled,
 * redelivered (new gen) or moved to WAIT, and after a restart (epoch).
 *
 * RECEIPTS
 * ========
 *   "<epoch>.<sub>.<member>.<kind>.<queue>.<offset>.<gen>"
 *   epoch   16 lower-case hex digits, random per brk_groups_open
 *   sub     subscription index in the group (decimal)
 *   member  member index in the group (decimal; 0 for clustering)
 *   kind    'm' a queue of the subscribed topic, 'r' a retry queue
 *   queue   queue id in that topic (retry: sub * 18 + level - 1)
 *   offset  queue offset (u64)
 *   gen     the group's delivery generation (u64, unique per delivery)
 * At most 16+1+2+1+10+1+1+1+4+1+20+1+20 = 79 characters.
 *
 * RETRY TOPICS (non-FIFO)
 * =======================
 * "__retry.<group>" (clustering) or "__retry.<group>.<member>" (broadcast).
 * 18 queues per subscription: queue sub*18 + (level-1) holds retries whose
 * delay is level's (brk_delay_level_ms), so every queue is in due order and
 * only its head needs looking at.  (With one subscription this is "queue i
 * = level i+1"; more subscriptions grow the topic by 18 queues each, so a
 * receive for one topic never sees another topic's retries; hence at most
 * BRK_QUEUES_MAX/18 = 56 subscriptions per group.)  Names that would
 * collide ("__retry.a.b" for group "a" member "b" and group "a.b") are
 * refused with BRK_CONFLICT when the second one is created.
 *
 * A retry copy: same msg_id, key, tag, body, flags and born_ms; props are
 * the user's pairs followed by these system pairs (values little-endian):
 *   "\x1fotopic"     original topic
 *   "\x1foqueue"     u16, original queue
 *   "\x1fooffset"    u64, original queue offset
 *   "\x1fcount"      u32, deliveries so far (the copy's first delivery has
 *                    count + 1)
 *   "\x1fnotbefore"  i64, wall ms; the queue's head is not delivered before
 *   "\x1freason"     the last nack reason, <= 1024 bytes (optional)
 * A retry of a retry keeps otopic/oqueue/ooffset.  The copy is appended
 * (allow_internal) before the original is settled; in SYNC mode the copies
 * of one expiry round are appended with defer_sync and made durable by one
 * brk_store_flush before any original is settled.
 *
 * DEAD LETTERS
 * ============
 * "__dlq.<group>", 1 queue.  The message (same msg_id, key, tag, body,
 * flags, born_ms) with its user props (system pairs and earlier
 * "outboxd-dlq-*" pairs dropped) plus these user-visible headers, values
 * in decimal text:
 *   outboxd-dlq-topic       original topic
 *   outboxd-dlq-queue       original queue
 *   outboxd-dlq-offset      original queue offset
 *   outboxd-dlq-deliveries  deliveries made
 *   outboxd-dlq-reason      last reason (nack's, "invisibility timed out",
 *                           or the retry copy's), when there is one
 *   outboxd-dlq-group       the group
 *   outboxd-dlq-member      broadcast member (broadcast groups only)
 * Replay appends a dead letter back to outboxd-dlq-topic (queue by key, same
 * msg_id, the outboxd-dlq-* headers dropped) and moves the group's replay
 * offset past it.  Dead letters are not held against retention.  In a
 * broadcast group a replayed message goes to every member again.
 *
 * STATE FILE "state.groups": the format is written out at the top of
 * group_state.c.
 *
 * PERSISTENCE, RETENTION AND THE DUPLICATE BOUND
 * ==============================================
 * Progress is memory first: an ack changes the qstate and marks the
 * registry dirty (an atomic counter).  The file is rewritten whole when
 * something changed: by the tick every persist_interval_ms, at close,
 * synchronously by brk_group_put and by every ack/nack of a group with
 * persist_every_ack.  After each save every
 * (member, subscription) moves its retention cursor
 * "grp:<group>:<topic>[:<member>]" to the lowest log offset of the entries
 * at its committed offsets (main and retry queues); a fully consumed queue
 * counts as the durable end read before the save.  Cursors are registered
 * again at open, before the first retention run if the groups are opened
 * right after the store.  Close leaves them registered (they die with the
 * store; registering again returns the same one), so a store that stays
 * open after brk_groups_close keeps what the groups have not consumed.
 *
 * After a restart consumption resumes at the saved committed offsets: in-
 * flight deliveries are simply delivered again (delivery counts start at 1
 * for main-queue messages; retry copies carry theirs).  What a crash can
 * deliver twice, per member and queue:
 *   - messages acked (or skipped) since the last save: at most
 *     persist_interval_ms worth (none with persist_every_ack, whose ack
 *     returns after the save);
 *   - every message in flight at the crash (it was never acked);
 *   - a message nacked or expired since the last save: its retry copy (or
 *     dead letter) is in the log but the original is not committed, so both
 *     come back;
 *   - dead letters replayed since the replay offset was last saved (it is
 *     saved at the end of each replay call).
 * Nothing acked-and-saved is redelivered (committed plus the spans are
 * saved) and nothing is lost: a message is settled in memory only after its
 * copy (retry or dead letter) is stored, and every save flushes the log
 * (brk_store_flush) before it writes the file, so in ASYNC mode too no
 * saved settle is without its copy after a power loss.  An ack of a persist_every_ack
 * group whose save fails returns the store's error (IO, FAILED, ...) with
 * the ack applied in memory; whether the save reached the disk is unknown
 * (the store is failed from then on), so after a crash that message may or
 * may not come back - like any write whose outcome is unknown.
 *
 * LAG
 * ===
 * A row per main queue (max, committed, lag = max - committed, deliveries
 * in flight or waiting (FIFO), store time of the message at committed),
 * then a totals row per (subscription, member): sums of the rows, plus the
 * deliveries in flight from the retry queues, plus, as lag, the messages
 * waiting in the retry queues (they are not acked either; committed_offset
 * of the totals row is max - lag), and the dead-letter topic's count.
 *
 * LONG POLLING
 * ============
 * Waiters {id, group, topic, member, deadline, fn, ctx} are kept in a hash
 * of topic buckets and a hash of ids, their deadlines in a timer heap (lazy
 * cancel).  The store listener's `appended` wakes one waiter per (group,
 * member) of the topic when the record is visible (ASYNC mode, or below
 * the durable end in SYNC mode); otherwise the topic is remembered with its
 * highest pending log offset and woken when `durable` passes it.  One, not
 * all: a receive that fills its batch wakes the next waiter of its group
 * (grp_receive_chained), so a burst reaches as many consumers as it needs
 * without waking a thousand parked polls per message.  A woken waiter that
 * never receives (its client vanished) delays the others by at most their
 * own deadline.  Retry and FIFO due times and
 * invisibility expiries are group timers (a second heap, one live entry per
 * group: armed[group idx], later entries of a group are redundant); at a
 * group timer the tick handles expiries, wakes the waiters of every
 * (member, subscription) that has work, and arms the group's next due
 * time.  A callback runs with no lock of this module
 * held (taken out of the lists under wmu, called, then freed under wmu);
 * when the store runs the listener on a thread that holds a group lock
 * (its own retry or dead-letter append, or a flush, may lead a group
 * commit), the taken waiters are parked in a thread-local list and fired
 * once that lock is dropped.  brk_group_wait_cancel on a running callback
 * waits for it (wdone).  An append wakes every waiter of its topic (all
 * members of a broadcast group must hear it; for clustering groups this is
 * a herd when thousands wait on one topic: each receives, one wins).
 * brk_group_wait registers before it looks for work, so an append between
 * the look and the registration cannot be missed.  Idle waiters cost no
 * CPU: the background thread sleeps until the earliest timer (with the
 * system clock exactly; with another clock at most 200 ms, since a test
 * clock moves without telling anyone) or, with nothing timed, until
 * signalled.  brk_group_receive_wait parks such a waiter whose callback
 * signals the caller's condition variable; the store clock decides its
 * deadline and a CLOCK_MONOTONIC timeout of wait_ms bounds the sleep too.
 * has_work applies room() to the next entry, as the receive does, so a
 * member at its byte bound sleeps; a receive or has_work refused by room()
 * sets member.blocked, and the next ack or nack of that member then looks
 * at every one of its subscriptions and wakes those with work.
 *
 * CLOSE
 * =====
 * Every public call counts itself in G->busy (call_enter/call_leave, under
 * wmu) and refuses with BRK_CLOSED once G->closing is set;
 * brk_group_wait checks the flag again where it registers.  Close sets it,
 * joins the thread, removes the listener (which waits for calls in
 * flight), fires every waiter (brk_group_receive_wait callers wake, see
 * the flag and return BRK_CLOSED), waits until busy and nwaiters are 0,
 * saves, and frees.  brk_group_wait_cancel counts itself even while
 * closing: its caller frees the callback's context once it returns.
 *
 * MEMORY
 * ======
 * Per delivery in flight a 48-byte flight; per (member, subscription,
 * queue) a qstate (~64 bytes) plus its settled spans (16 bytes each, only
 * while acks run ahead of an older open message); per waiter ~320 bytes
 * and a 16-byte heap entry.  Nothing per message that is not in flight.
 *
 * LOCKS: the lock order is at the top of group_priv.h.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "group_priv.h"

/* ---- small helpers ---------------------------------------------------------------- */

/* Every public call runs between call_enter and call_leave, so close can
 * wait for the calls in progress before it frees anything.  false: close
 * began, the call must return BRK_CLOSED.  `always` counts the call even
 * then (brk_group_wait_cancel: its caller may free the callback's context
 * once it returns, so it must keep working until close is done). */
bool grp_call_enter(brk_groups *G, bool always)
{
    pthread_mutex_lock(&G->wmu);
    bool ok = always || !G->closing;
    if (ok)
        G->busy++;
    pthread_mutex_unlock(&G->wmu);
    return ok;
}

void grp_call_leave(brk_groups *G)
{
    pthread_mutex_lock(&G->wmu);
    if (--G->busy == 0 && G->closing)
        pthread_cond_broadcast(&G->idle);
    pthread_mutex_unlock(&G->wmu);
}

bool grp_is_closing(brk_groups *G)
{
    pthread_mutex_lock(&G->wmu);
    bool c = G->closing;
    pthread_mutex_unlock(&G->wmu);
    return c;
}

int64_t grp_now_ms(brk_groups *G)
{
    return G->clock->now_ms(G->clock->ctx);
}

void grp_set_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (!errbuf || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

static bool name_chars_ok(const char *s, size_t max)
{
    if (!s)
        return false;
    size_t n = strnlen(s, max + 1);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

bool grp_group_name_ok(const char *s)
{
    return name_chars_ok(s, BRK_GROUP_MAX) && !(s[0] == '_' && s[1] == '_');
}

bool grp_member_name_ok(const char *s)
{
    return name_chars_ok(s, BRK_MEMBER_MAX);
}

bool grp_topic_ok(const char *t)
{
    if (!t)
        return false;
    size_t n = strnlen(t, BRK_TOPIC_MAX + 1);
    return n > 0 && n <= BRK_TOPIC_MAX && t[0] != '.'
           && brk_topic_name_valid(t, n, false);
}

uint32_t grp_str_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* ---- delays ---------------------------------------------------------------------- */

int64_t brk_group_retry_delay_ms(uint32_t n)
{
    if (n < 1)
        n = 1;
    uint32_t level = n >= LEVELS - 2 ? LEVELS : n + 2;
    return brk_delay_level_ms((int)level);
}

/* The smallest level whose delay is >= ms (at most the last). */
int grp_level_for(int64_t ms)
{
    for (int l = 1; l < LEVELS; l++)
        if (brk_delay_level_ms(l) >= ms)
            return l;
    return LEVELS;
}

void brk_groups_opts_init(brk_groups_opts *o)
{
    memset(o, 0, sizeof *o);
    o->persist_interval_ms = 1000;
    o->default_invisible_ms = 30000;
}

void brk_group_config_init(brk_group_config *c)
{
    memset(c, 0, sizeof *c);
    c->max_deliveries = BRK_MAX_DELIVERIES_DEFAULT;
    c->max_inflight = 1000;
    c->max_inflight_bytes = 100u << 20;
}

bool grp_config_ok(const brk_group_config *c)
{
    return c->max_deliveries >= 1 && c->max_deliveries <= MAX_DELIVERIES_MAX
           && c->max_inflight >= 1 && c->max_inflight <= INFLIGHT_MAX
           && c->max_inflight_bytes >= 1
           && c->max_inflight_bytes <= INFLIGHT_BYTES_MAX;
}

/* ---- tag filters ------------------------------------------------------------------ */

void grp_filter_free(filter *f)
{
    free(f->hash);
    free(f->tag);
    free(f->len);
    free(f->buf);
    free(f->text);
    memset(f, 0, sizeof *f);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t';
}

/* Parse NULL, "*" or "a || b || c".  BRK_INVAL for an empty part, a part
 * with '|' or over BRK_TAG_MAX, or text over BRK_FILTER_MAX. */
brk_status grp_filter_parse(const char *text, filter *out)
{
    memset(out, 0, sizeof *out);
    filter f;
    memset(&f, 0, sizeof f);
    if (!text)
        text = "*";
    size_t tl = strnlen(text, BRK_FILTER_MAX + 1);
    if (tl > BRK_FILTER_MAX)
        return BRK_INVAL;
    f.text = strdup(text);
    f.buf = malloc(tl + 1);
    size_t maxparts = tl / 2 + 1;
    f.hash = malloc(maxparts * sizeof *f.hash);
    f.tag = malloc(maxparts * sizeof *f.tag);
    f.len = malloc(maxparts * sizeof *f.len);
    if (!f.text || !f.buf || !f.hash || !f.tag || !f.len) {
        grp_filter_free(&f);
        return BRK_NOMEM;
    }
    size_t bpos = 0;
    const char *p = text, *end = text + tl;
    for (;;) {
        const char *sep = strstr(p, "||");
        const char *pe = sep ? sep : end;
        const char *a = p, *b = pe;
        while (a < b && is_space(*a))
            a++;
        while (b > a && is_space(b[-1]))
            b--;
        size_t n = (size_t)(b - a);
        if (n == 0 || n > BRK_TAG_MAX || memchr(a, '|', n)) {
            grp_filter_free(&f);
            return BRK_INVAL;
        }
        if (n == 1 && *a == '*') {
            f.all = true;
        } else {
            memcpy(f.buf + bpos, a, n);
            f.buf[bpos + n] = 0;
            f.tag[f.n] = f.buf + bpos;
            f.len[f.n] = (uint16_t)n;
            f.hash[f.n] = brk_tag_hash(a, n);
            f.n++;
            bpos += n + 1;
        }
        if (!sep)
            break;
        p = sep + 2;
    }
    *out = f;
    return BRK_OK;
}

bool grp_filter_hash_ok(const filter *f, uint64_t h)
{
    if (f->all)
        return true;
    for (uint32_t i = 0; i < f->n; i++)
        if (f->hash[i] == h)
            return true;
    return false;
}

bool grp_filter_tag_ok(const filter *f, brk_bytes tag)
{
    if (f->all)
        return true;
    for (uint32_t i = 0; i < f->n; i++)
        if (f->len[i] == tag.len && memcmp(f->tag[i], tag.ptr, tag.len) == 0)
            return true;
    return false;
}

/* ---- registry --------------------------------------------------------------------- */

/* Free m; with G, also unregister its retention cursors (a member that is
 * gone for good).  At close G is NULL: the cursors stay registered, holding
 * what the group has not consumed, for as long as the store is open. */
static void member_free(brk_groups *G, member *m)
{
    if (!m)
        return;
    for (uint32_t k = 0; k < m->nss; k++) {
        substate *ss = &m->ss[k];
        for (uint32_t i = 0; i < ss->nmq; i++)
            grp_q_free(&ss->mq[i]);
        for (uint32_t i = 0; i < ss->nrq; i++)
            grp_q_free(&ss->rq[i]);
        free(ss->mq);
        free(ss->rq);
        if (ss->has_cursor && G)
            brk_store_cursor_unregister(G->s, ss->cursor);
    }
    free(m->ss);
    free(m);
}

void grp_group_free(brk_groups *G, group *g)
{
    if (!g)
        return;
    for (uint32_t i = 0; i < g->nmembers; i++)
        member_free(G, g->members[i]);
    free(g->members);
    for (uint32_t k = 0; k < g->nsubs; k++)
        grp_filter_free(&g->subs[k].f);
    free(g->subs);
    pthread_mutex_destroy(&g->mu);
    pthread_mutex_destroy(&g->replay_mu);
    free(g);
}

group *grp_find_group_locked(brk_groups *G, const char *name)
{
    for (uint32_t i = 0; i < G->ngroups; i++)
        if (strcmp(G->groups[i]->name, name) == 0)
            return G->groups[i];
    return NULL;
}

group *grp_find_group(brk_groups *G, const char *name)
{
    pthread_mutex_lock(&G->reg_mu);
    group *g = grp_find_group_locked(G, name);
    pthread_mutex_unlock(&G->reg_mu);
    return g;
}

/* Reserve a retry-topic name; BRK_CONFLICT when taken.  reg_mu held. */
static brk_status rname_add_locked(brk_groups *G, const char *name)
{
    for (size_t i = 0; i < G->nrnames; i++)
        if (strcmp(G->rnames[i], name) == 0)
            return BRK_CONFLICT;
    if (G->nrnames == G->crnames) {
        size_t nc = G->crnames ? G->crnames * 2 : 16;
        char **nr = realloc(G->rnames, nc * sizeof *nr);
        if (!nr)
            return BRK_NOMEM;
        G->rnames = nr;
        G->crnames = nc;
    }
    char *c = strdup(name);
    if (!c)
        return BRK_NOMEM;
    G->rnames[G->nrnames++] = c;
    return BRK_OK;
}

member *grp_member_new(const group *g, const char *name, uint32_t idx)
{
    member *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    snprintf(m->name, sizeof m->name, "%s", name);
    if (name[0])
        snprintf(m->retry_topic, sizeof m->retry_topic, "__retry.%s.%s",
                 g->name, name);
    else
        snprintf(m->retry_topic, sizeof m->retry_topic, "__retry.%s",
                 g->name);
    m->idx = idx;
    m->min_vis = INT64_MAX;
    return m;
}

void grp_note_vis(member *m, int64_t v)
{
    if (v < m->min_vis)
        m->min_vis = v;
}

brk_status grp_members_push(group *g, member *m)
{
    member **nm = realloc(g->members, (g->nmembers + 1) * sizeof *nm);
    if (!nm)
        return BRK_NOMEM;
    g->members = nm;
    g->members[g->nmembers++] = m;
    return BRK_OK;
}

/* Add a subscription (g->mu held or g unpublished). */
brk_status grp_sub_add(group *g, const char *topic, filter *f, uint32_t *k)
{
    if (g->nsubs >= SUBS_MAX)
        return BRK_LIMIT;
    subscr *ns = realloc(g->subs, (g->nsubs + 1) * sizeof *ns);
    if (!ns)
        return BRK_NOMEM;
    g->subs = ns;
    subscr *s = &g->subs[g->nsubs];
    memset(s, 0, sizeof *s);
    snprintf(s->topic, sizeof s->topic, "%s", topic);
    s->f = *f;
    memset(f, 0, sizeof *f);
    *k = g->nsubs++;
    return BRK_OK;
}

int64_t grp_sub_find(const group *g, const char *topic)
{
    for (uint32_t k = 0; k < g->nsubs; k++)
        if (strcmp(g->subs[k].topic, topic) == 0)
            return k;
    return -1;
}

/* A new group, not yet in the registry. */
brk_status grp_group_new(const char *name, const brk_group_config *cfg,
                         group **out)
{
    group *g = calloc(1, sizeof *g);
    if (!g)
        return BRK_NOMEM;
    snprintf(g->name, sizeof g->name, "%s", name);
    snprintf(g->dlq_topic, sizeof g->dlq_topic, "__dlq.%s", name);
    pthread_mutex_init(&g->mu, NULL);
    pthread_mutex_init(&g->replay_mu, NULL);
    if (cfg)
        g->cfg = *cfg;
    else
        brk_group_config_init(&g->cfg);
    if (!g->cfg.broadcast) {
        member *m = grp_member_new(g, "", 0);
        if (!m || grp_members_push(g, m) != BRK_OK) {
            free(m);
            grp_group_free(NULL, g);
            return BRK_NOMEM;
        }
    }
    *out = g;
    return BRK_OK;
}

/* Publish a new group (reg_mu held): reserve its retry name, give it a
 * timer slot. */
brk_status grp_group_publish_locked(brk_groups *G, group *g)
{
    char rn[BRK_TOPIC_MAX + 1];
    snprintf(rn, sizeof rn, "__retry.%s", g->name);
    if (G->ngroups == G->cgroups) {
        uint32_t nc = G->cgroups ? G->cgroups * 2 : 16;
        group **ng = realloc(G->groups, nc * sizeof *ng);
        if (!ng)
            return BRK_NOMEM;
        G->groups = ng;
        G->cgroups = nc;
    }
    pthread_mutex_lock(&G->wmu);
    brk_status st = BRK_OK;
    if (G->narmed <= G->ngroups) {
        int64_t *na = realloc(G->armed, (G->ngroups + 1) * sizeof *na);
        if (!na)
            st = BRK_NOMEM;
        else {
            G->armed = na;
            G->narmed = G->ngroups + 1;
        }
    }
    if (st == BRK_OK)
        G->armed[G->ngroups] = INT64_MAX;
    pthread_mutex_unlock(&G->wmu);
    if (st != BRK_OK)
        return st;
    if ((st = rname_add_locked(G, rn)) != BRK_OK)
        return st;
    for (uint32_t i = 0; i < g->nmembers; i++)
        if (g->members[i]->name[0]
            && (st = rname_add_locked(G, g->members[i]->retry_topic)) != BRK_OK)
            return st;
    g->idx = G->ngroups;
    G->groups[G->ngroups++] = g;
    return BRK_OK;
}

/* The member of a receive (g->mu held): clustering's one, or the broadcast
 * member by name, created if new. */
brk_status grp_member_get(brk_groups *G, group *g, const char *name,
                          member **out, bool create)
{
    if (!g->cfg.broadcast) {
        *out = g->nmembers ? g->members[0] : NULL;
        return *out ? BRK_OK : BRK_NOTFOUND;
    }
    for (uint32_t i = 0; i < g->nmembers; i++)
        if (strcmp(g->members[i]->name, name) == 0) {
            *out = g->members[i];
            return BRK_OK;
        }
    if (!create)
        return BRK_NOTFOUND;
    member *m = grp_member_new(g, name, g->nmembers);
    if (!m)
        return BRK_NOMEM;
    pthread_mutex_lock(&G->reg_mu);
    brk_status st = rname_add_locked(G, m->retry_topic);
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && (st = grp_members_push(g, m)) != BRK_OK) {
        /* The reserved name stays reserved: harmless. */
    }
    if (st != BRK_OK) {
        free(m);
        return st;
    }
    g->progress = true;
    grp_mark_dirty(G);
    *out = m;
    return BRK_OK;
}

/* Bring m's state for subscription k up to date with the topics: new
 * queues of the subscribed topic start at their first readable offset,
 * retry queues exist once the retry topic has them.  g->mu held. */
brk_status grp_ss_ensure(brk_groups *G, group *g, member *m, uint32_t k,
                         substate **out)
{
    if (m->nss < g->nsubs) {
        substate *ns = realloc(m->ss, g->nsubs * sizeof *ns);
        if (!ns)
            return BRK_NOMEM;
        memset(ns + m->nss, 0, (g->nsubs - m->nss) * sizeof *ns);
        m->ss = ns;
        m->nss = g->nsubs;
    }
    substate *ss = &m->ss[k];
    const char *topic = g->subs[k].topic;
    if (!ss->has_cursor) {
        char cname[BRK_GROUP_MAX + BRK_TOPIC_MAX + BRK_MEMBER_MAX + 8];
        snprintf(cname, sizeof cname, "grp:%s:%s%s%s", g->name, topic,
                 m->name[0] ? ":" : "", m->name);
        if (brk_store_cursor_register(G->s, cname, &ss->cursor) == BRK_OK)
            ss->has_cursor = true;
    }
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_OK && ti.queues > ss->nmq) {
        qstate *nq = realloc(ss->mq, ti.queues * sizeof *nq);
        if (!nq)
            return BRK_NOMEM;
        ss->mq = nq;
        for (uint32_t i = ss->nmq; i < ti.queues; i++) {
            uint64_t mn = 0, mx = 0;
            (void)brk_store_queue_range(G->s, topic, (uint16_t)i, &mn, &mx);
            grp_q_init(&ss->mq[i], mn);
        }
        ss->nmq = ti.queues;
    } else if (st != BRK_OK && st != BRK_NOTFOUND) {
        return st;
    }
    if (!g->cfg.fifo && ss->nrq == 0) {
        if (m->retry_nq < (k + 1) * LEVELS
            && brk_topic_get(G->s, m->retry_topic, &ti) == BRK_OK)
            m->retry_nq = ti.queues;
        if (m->retry_nq >= (k + 1) * LEVELS) {
            qstate *rq = calloc(LEVELS, sizeof *rq);
            if (!rq)
                return BRK_NOMEM;
            for (uint32_t i = 0; i < LEVELS; i++) {
                uint64_t mn = 0, mx = 0;
                (void)brk_store_queue_range(G->s, m->retry_topic,
                                            (uint16_t)(k * LEVELS + i), &mn,
                                            &mx);
                grp_q_init(&rq[i], mn);
            }
            ss->rq = rq;
            ss->nrq = LEVELS;
        }
    }
    *out = ss;
    return BRK_OK;
}

/* Make sure m's retry topic has subscription k's queues.  g->mu held. */
brk_status grp_retry_topic_ensure(brk_groups *G, group *g, member *m,
                                  uint32_t k)
{
    uint32_t need = (g->nsubs > k + 1 ? g->nsubs : k + 1) * LEVELS;
    if (m->retry_nq >= (k + 1) * LEVELS)
        return BRK_OK;
    brk_topic_info ti;
    brk_status st = brk_topic_get(G->s, m->retry_topic, &ti);
    if (st == BRK_NOTFOUND) {
        st = brk_topic_create(G->s, m->retry_topic, (uint16_t)need);
        if (st == BRK_EXISTS)
            st = brk_topic_get(G->s, m->retry_topic, &ti);
        else if (st == BRK_OK)
            ti.queues = (uint16_t)need;
    }
    if (st != BRK_OK)
        return st;
    if (ti.writable < need) {
        bool created = false;
        if ((st = brk_topic_resize(G->s, m->retry_topic, (uint16_t)need,
                                   &created)) != BRK_OK)
            return st;
        ti.queues = (uint16_t)need;
    }
    m->retry_nq = ti.queues;
    substate *ss;
    return grp_ss_ensure(G, g, m, k, &ss);
}

/* ---- public API: configuration ---------------------------------------------------- */

static brk_status put_impl(brk_groups *G, const char *name, const char *topic,
                           const char *filter_text,
                           const brk_group_config *cfg, bool *created)
{
    if (created)
        *created = false;
    if (!G || !grp_group_name_ok(name) || !grp_topic_ok(topic))
        return BRK_INVAL;
    if (cfg && !grp_config_ok(cfg))
        return BRK_INVAL;
    filter f;
    brk_status st = grp_filter_parse(filter_text, &f);
    if (st != BRK_OK)
        return st;
    brk_topic_info ti;
    st = brk_topic_get(G->s, topic, &ti);
    if (st == BRK_NOTFOUND && !brk_store_auto_create(G->s)) {
        grp_filter_free(&f);
        return BRK_NOTFOUND;
    }
    if (st != BRK_OK && st != BRK_NOTFOUND) {
        grp_filter_free(&f);
        return st;
    }
    bool made = false;
    pthread_mutex_lock(&G->reg_mu);
    group *g = grp_find_group_locked(G, name);
    st = BRK_OK;
    if (!g) {
        uint32_t k;
        if ((st = grp_group_new(name, cfg, &g)) == BRK_OK
            && (st = grp_sub_add(g, topic, &f, &k)) == BRK_OK)
            st = grp_group_publish_locked(G, g);
        if (st != BRK_OK) {
            grp_group_free(NULL, g);
            g = NULL;
        } else {
            made = true;
        }
    }
    pthread_mutex_unlock(&G->reg_mu);
    if (st == BRK_OK && !made) {
        pthread_mutex_lock(&g->mu);
        if (cfg && (cfg->fifo != g->cfg.fifo
                    || cfg->broadcast != g->cfg.broadcast)) {
            if (g->progress) {
                st = BRK_CONFLICT;
            } else if (cfg->broadcast != g->cfg.broadcast) {
                /* No progress: no broadcast member exists; rebuild. */
                for (uint32_t i = 0; i < g->nmembers; i++)
                    member_free(G, g->members[i]);
                g->nmembers = 0;
                if (!cfg->broadcast) {
                    member *m = grp_member_new(g, "", 0);
                    if (!m || grp_members_push(g, m) != BRK_OK) {
                        free(m);
                        st = BRK_NOMEM;
                    }
                }
            }
        }
        if (st == BRK_OK && cfg)
            g->cfg = *cfg;
        if (st == BRK_OK) {
            int64_t k = grp_sub_find(g, topic);
            if (k >= 0) {
                grp_filter_free(&g->subs[k].f);
                g->subs[k].f = f;
                memset(&f, 0, sizeof f);
            } else {
                uint32_t kk;
                st = grp_sub_add(g, topic, &f, &kk);
            }
        }
        pthread_mutex_unlock(&g->mu);
    }
    grp_filter_free(&f);
    if (st != BRK_OK)
        return st;
    grp_mark_dirty(G);
    st = grp_save_state(G, true);
    if (st == BRK_OK && created)
        *created = made;
    return st;
}

brk_status brk_group_put(brk_groups *G, const char *name, const char *topic,
                         const char *filter_text, const brk_group_config *cfg,
                         bool *created)
{
    if (!G)
        return put_impl(G, name, topic, filter_text, cfg, created);
    if (!grp_call_enter(G, false)) {
        if (created)
            *created = false;
        return BRK_CLOSED;
    }
    brk_status st = put_impl(G, name, topic, filter_text, cfg, created);
    grp_call_leave(G);
    return st;
}

brk_status brk_group_get_config(brk_groups *G, const char *name,
                                brk_group_config *out)
{
    if (!G || !out || !name || !grp_group_name_ok(name))
        return BRK_INVAL;
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = BRK_NOTFOUND;
    group *g = grp_find_group(G, name);
    if (g) {
        pthread_mutex_lock(&g->mu);
        *out = g->cfg;
        pthread_mutex_unlock(&g->mu);
        st = BRK_OK;
    }
    grp_call_leave(G);
    return st;
}

brk_status brk_groups_list(brk_groups *G, brk_group_name **names,
                           size_t *count)
{
    if (!G || !names || !count)
        return BRK_INVAL;
    *names = NULL;
    *count = 0;
    if (!grp_call_enter(G, false))
        return BRK_CLOSED;
    brk_status st = BRK_OK;
    pthread_mutex_lock(&G->reg_mu);
    if (G->ngroups > 0) {
        *names = malloc(G->ngroups * sizeof **names);
        if (!*names) {
            st = BRK_NOMEM;
        } else {
            for (uint32_t i = 0; i < G->ngroups; i++)
                memcpy((*names)[i], G->groups[i]->name, sizeof (*names)[i]);
            *count = G->ngroups;
        }
    }
    pthread_mutex_unlock(&G->reg_mu);
    grp_call_leave(G);
    return st;
}

static void groups_free(brk_groups *G)
{
    for (uint32_t i = 0; i < G->ngroups; i++)
        grp_group_free(NULL, G->groups[i]);  /* cursors stay: see member_free */
    free(G->groups);
    for (size_t i = 0; i < G->nrnames; i++)
        free(G->rnames[i]);
    free(G->rnames);
    for (size_t b = 0; b < WBUCKETS; b++) {
        waiter *w = G->ib[b];
        while (w) {
            waiter *nx = w->inext;
            free(w);
            w = nx;
        }
    }
    brk_timerheap_free(&G->wheap);
    brk_timerheap_free(&G->gheap);
    free(G->armed);
    free(G->pend);
    pthread_cond_destroy(&G->cond);
    pthread_cond_destroy(&G->wdone);
    pthread_cond_destroy(&G->idle);
    pthread_mutex_destroy(&G->wmu);
    pthread_mutex_destroy(&G->reg_mu);
    pthread_mutex_destroy(&G->save_mu);
    free(G);
}

brk_status brk_groups_open(brk_groups **out, brk_store *s,
                           const brk_groups_opts *opts, char *errbuf,
                           size_t errlen)
{
    if (!out)
        return BRK_INVAL;
    *out = NULL;
    if (!s) {
        grp_set_err(errbuf, errlen, "no store");
        return BRK_INVAL;
    }
    brk_groups_opts o;
    brk_groups_opts_init(&o);
    if (opts) {
        o = *opts;
        if (o.persist_interval_ms == 0)
            o.persist_interval_ms = 1000;
        if (o.default_invisible_ms == 0)
            o.default_invisible_ms = 30000;
        if (o.default_invisible_ms > INVISIBLE_MAX_MS) {
            grp_set_err(errbuf, errlen, "default_invisible_ms over 12 h");
            return BRK_INVAL;
        }
    }
    brk_groups *G = calloc(1, sizeof *G);
    if (!G) {
        grp_set_err(errbuf, errlen, "out of memory");
        return BRK_NOMEM;
    }
    G->s = s;
    G->clock = brk_store_clock(s);
    G->o = o;
    G->sync_mode = brk_store_flush_mode(s) == BRK_FLUSH_SYNC;
    G->sys_clock = G->clock == brk_clock_system();
    G->wake_at = INT64_MIN;
    uint64_t ep = 0;
    if (getrandom(&ep, sizeof ep, 0) != (ssize_t)sizeof ep)
        ep = (uint64_t)G->clock->mono_ns(G->clock->ctx)
             ^ ((uint64_t)(uintptr_t)G << 17) ^ 0x9E3779B97F4A7C15ull;
    snprintf(G->epoch, sizeof G->epoch, "%016" PRIx64, ep);
    pthread_mutex_init(&G->save_mu, NULL);
    pthread_mutex_init(&G->reg_mu, NULL);
    pthread_mutex_init(&G->wmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&G->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&G->wdone, NULL);
    pthread_cond_init(&G->idle, NULL);
    brk_timerheap_init(&G->wheap);
    brk_timerheap_init(&G->gheap);
    atomic_init(&G->listener_active, 0);
    atomic_init(&G->saved_seq, 0);
    atomic_init(&G->dirty_seq, 0);
    atomic_init(&G->next_persist, grp_now_ms(G) + o.persist_interval_ms);
    brk_store_stats ss;
    brk_store_get_stats(s, &ss);
    G->durable_seen = ss.durable_offset;

    brk_status st = grp_load_state(G, errbuf, errlen);
    if (st != BRK_OK) {
        groups_free(G);
        return st;
    }
    /* Register every cursor and place it before the first retention run,
     * and let the first tick look at every group (retry heads). */
    int64_t now = grp_now_ms(G);
    for (uint32_t i = 0; i < G->ngroups; i++) {
        group *g = G->groups[i];
        pthread_mutex_lock(&g->mu);
        for (uint32_t mi = 0; mi < g->nmembers; mi++)
            for (uint32_t k = 0; k < g->nsubs; k++) {
                substate *sp;
                (void)grp_ss_ensure(G, g, g->members[mi], k, &sp);
            }
        pthread_mutex_unlock(&g->mu);
        grp_arm(G, g, now);
    }
    (void)grp_save_state_ex(G, true, false);
    G->listener.appended = grp_on_appended;
    G->listener.durable = grp_on_durable;
    G->listener.ctx = G;
    brk_store_set_listener(s, &G->listener);
    if (!o.no_background) {
        int rc = pthread_create(&G->thr, NULL, grp_bg_main, G);
        if (rc != 0) {
            brk_store_set_listener(s, NULL);
            grp_set_err(errbuf, errlen, "starting the groups thread: %s",
                    strerror(rc));
            groups_free(G);
            return BRK_NOMEM;
        }
        G->has_thr = true;
    }
    *out = G;
    return BRK_OK;
}

brk_status brk_groups_close(brk_groups *G)
{
    if (!G)
        return BRK_OK;
    /* From here on public calls return BRK_CLOSED and no waiter registers
     * (the flag is checked under wmu by both). */
    pthread_mutex_lock(&G->wmu);
    G->closing = true;
    G->stop = true;
    pthread_cond_signal(&G->cond);
    pthread_mutex_unlock(&G->wmu);
    if (G->has_thr)
        pthread_join(G->thr, NULL);
    brk_store_set_listener(G->s, NULL);     /* waits for calls in flight */
    while (atomic_load(&G->listener_active) > 0)
        sched_yield();
    /* Every waiter's callback runs, as at a deadline: this also wakes the
     * brk_group_receive_wait callers, which then return. */
    waiter *list = NULL;
    pthread_mutex_lock(&G->wmu);
    for (size_t b = 0; b < WBUCKETS; b++)
        while (G->tb[b])
            grp_w_take(G, G->tb[b], &list);
    pthread_mutex_unlock(&G->wmu);
    grp_w_fire(G, list);
    /* The calls in progress finish (they may still settle, and fire the
     * waiters they took), then nothing uses the registry any more. */
    pthread_mutex_lock(&G->wmu);
    while (G->busy > 0)
        pthread_cond_wait(&G->idle, &G->wmu);
    while (G->nwaiters > 0)
        pthread_cond_wait(&G->wdone, &G->wmu);
    pthread_mutex_unlock(&G->wmu);
    brk_status st = grp_save_state(G, true);
    groups_free(G);
    return st;
}
