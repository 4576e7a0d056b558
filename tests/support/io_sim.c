/*
 * io_sim.c - a simulated disk implementing brk_io in memory, for crash tests.
 *
 * Why: the store's durability promises ("BRK_OK means fdatasync'ed", "a
 * state file is replaced atomically") can only be checked by losing power
 * at every interesting moment.  Doing that with a real disk is slow and not
 * reproducible, so this file models what a POSIX file system guarantees -
 * and no more - the way SQLite's test VFS does.
 *
 * THE MODEL
 *
 * Inodes.  The namespace is a tree of inodes: files and directories.  The
 * root directory always exists.  Every inode has two views:
 *
 *   volatile  what reads see right now (the page cache);
 *   durable   what a power loss leaves on the platter.
 *
 * Files.  pwrite and truncate change the volatile bytes at once and are
 * appended to the file's list of PENDING operations.  sync (fdatasync)
 * replays the pending list onto the durable bytes and empties it, so
 * durable + pending == volatile holds at all times.
 *
 * Directories.  A directory's content is its entry list (name -> inode).
 * create, unlink, mkdir, rmdir and rename change the volatile entries of
 * the parent directory at once and are appended to that directory's pending
 * list; sync_dir(dir) copies the volatile entries to the durable ones and
 * empties the list.  Consequences the store has to live with, exactly as on
 * ext4/xfs without extra syncs:
 *   - a new file whose parent directory was not synced vanishes at a crash,
 *     even if the file's own data was synced;
 *   - a file synced and then renamed without sync_dir keeps its old name
 *     after a crash (and an unsynced unlink is undone);
 *   - a new directory survives only if its parent was synced, and then it
 *     holds only what its own sync_dir made durable.
 * A rename within one directory is one pending operation (atomic at a
 * crash).  A rename between two directories is two: "add the new name" in
 * the target and "remove the old name" in the source, which a crash may
 * keep independently, leaving both names or neither.
 *
 * Crash (brk_sim_crash).  For every inode, the post-crash content is the
 * durable view plus a mode-dependent selection of its pending list, applied
 * in order:
 *   DROP_ALL     nothing pending survives.
 *   KEEP_RANDOM  files: every 512-byte-aligned sector piece of every pending
 *                write, and every pending truncate, is kept or dropped by an
 *                independent coin flip.  That is real writeback: unsynced
 *                pages reach the disk in any subset, and the file size grows
 *                to cover whatever landed (gaps read as zeros, like a hole).
 *                Directories: a random prefix (possibly empty or complete)
 *                of the pending list survives, like a journal committed up
 *                to some point.
 *   TORN_LAST    files: every pending operation lands except the last
 *                pending write, of which only a random strict prefix lands.
 *                Directories: nothing pending survives.
 * The result becomes both views (nothing pending).  Inodes no longer
 * reachable from the root are freed.  Should the independent per-directory
 * choices after cross-directory renames produce a directory with two names
 * (or a cycle), only the first name met in a depth-first walk in name order
 * is kept, so the namespace is always a tree.  Files may end up with two
 * names, as hard links.
 *
 * Handles.  A brk_file points at its inode, so it keeps working after the
 * name is unlinked or renamed, like a file descriptor.  A crash advances
 * the sim's epoch; every method except close on a handle from an older
 * epoch returns -EIO.
 *
 * Faults.  Every mutating call (open with CREATE, pwrite, sync, truncate,
 * mkdir, unlink, rmdir, rename, sync_dir) increments the operation counter
 * first, whatever its outcome, so a workload run twice produces the same
 * count and crash points can be replayed by number.  Checks, in order:
 *   argument errors (-EINVAL), stale handle (-EIO), DEAD or crash point
 *   reached (-EIO), injected failure for the kind, then the operation.
 * Every failure changes nothing.
 *
 * Capacity counts the volatile sizes of files that still have a name or an
 * open handle, i.e. what `df` would report before a crash.  It is computed
 * on demand, only when a limit is set, because test disks are small.
 *
 * Locking: one mutex (brk_sim.mu) guards every field of the sim and of all
 * inodes and handles; it is held for the whole of each method (at most a
 * memcpy of one request, or one crash computation) and never across a list
 * callback.
 */
/* strdup is POSIX.1-2008; see io_posix.c for why this is spelled out. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include "io_sim.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Types                                                                */

struct sim_buf {
    unsigned char *p;   /* owned; bytes [len, cap) are undefined */
    size_t len;         /* file size */
    size_t cap;
};

enum { SIM_FOP_WRITE, SIM_FOP_TRUNC };

/* One pending file operation: a write of `len` bytes `data` at `off`, or a
 * truncate to size `off`. */
struct sim_fop {
    int kind;
    uint64_t off;
    size_t len;
    unsigned char *data;    /* owned copy of the written bytes; NULL for TRUNC */
};

enum { SIM_NOP_ADD, SIM_NOP_DEL, SIM_NOP_MOVE };

/* One pending namespace operation on a directory:
 *   ADD  name -> ino (create, mkdir, target half of a cross-dir rename);
 *   DEL  name       (unlink, rmdir, source half of a cross-dir rename);
 *   MOVE name -> to (rename inside this directory), ino = the moved inode. */
struct sim_nop {
    int kind;
    char *name;                 /* owned */
    char *to;                   /* owned; MOVE only */
    struct sim_inode *ino;      /* counted reference; NULL for DEL */
};

struct sim_ent {
    char *name;                 /* owned */
    struct sim_inode *ino;      /* counted reference in live lists */
};

/* Entry list kept sorted by name: deterministic crash walks and listings,
 * and binary search. */
struct sim_ents {
    struct sim_ent *v;
    size_t n, cap;
};

struct sim_inode {
    struct sim_inode *prev, *next;  /* all inodes, in creation order: the
                                       crash walks them in this order so the
                                       random choices are reproducible */
    int is_dir;
    uint64_t refs;      /* references: volatile and durable entries, pending
                           namespace ops, open handles, +1 for the root */
    uint64_t vlinks;    /* volatile entries naming this inode */
    uint64_t nopen;     /* open handles */
    int mark;           /* crash scratch: reachable from the root */

    /* files */
    struct sim_buf vol, dur;
    struct sim_fop *fops;
    size_t nfops, capfops;

    /* directories */
    struct sim_ents vents, dents;
    struct sim_nop *nops;
    size_t nnops, capnops;

    /* crash scratch: the post-crash content, built before anything is
     * replaced so that an allocation failure leaves the sim unchanged */
    struct sim_buf cr_vol, cr_dur;
    struct sim_ents cr_vents, cr_dents;
};

struct brk_sim {
    brk_io io;                  /* handed out by brk_sim_io; immutable */
    pthread_mutex_t mu;         /* guards everything below and all inodes */
    struct sim_inode *root;
    struct sim_inode *head, *tail;  /* list of every inode */
    uint64_t rng[4];            /* xoshiro256** state */
    uint64_t epoch;             /* bumped by each crash; stales old handles */
    uint64_t ops;               /* mutating calls so far */
    uint64_t crash_at;          /* die when ops exceeds this; UINT64_MAX = never */
    int dead;
    uint64_t capacity;
    struct {
        int err;                /* positive errno */
        uint64_t count;         /* failures still to inject */
    } fail[BRK_SIM_OP_COUNT_];
};

/* What a brk_file really is for this backend.  Deliberately not named
 * "struct brk_file": the POSIX backend defines that tag, and a program
 * linking both must not see two different definitions of one type. */
struct sim_handle {
    struct sim_inode *ino;      /* counted reference (refs and nopen) */
    uint64_t epoch;             /* sim epoch at open */
    int writable;
};

static struct brk_sim *sim_of(brk_io *io)
{
    return (struct brk_sim *)(void *)((char *)io - offsetof(struct brk_sim, io));
}

static struct sim_handle *handle_of(brk_file *f)
{
    return (struct sim_handle *)(void *)f;
}

/* ------------------------------------------------------------------ */
/* Deterministic randomness: splitmix64 expands the seed, xoshiro256**   */
/* produces the stream.  Both are small, well-known and good enough for  */
/* choosing which sectors survive.                                        */

static uint64_t sim_splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t sim_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t sim_rand(struct brk_sim *s)
{
    uint64_t *r = s->rng;
    uint64_t out = sim_rotl(r[1] * 5, 7) * 9;
    uint64_t t = r[1] << 17;

    r[2] ^= r[0];
    r[3] ^= r[1];
    r[1] ^= r[2];
    r[0] ^= r[3];
    r[2] ^= t;
    r[3] = sim_rotl(r[3], 45);
    return out;
}

/* Uniform-enough value in [0, n); n > 0.  The modulo bias is below 2^-40
 * for the sizes used here and does not matter for fault selection. */
static uint64_t sim_rand_below(struct brk_sim *s, uint64_t n)
{
    return sim_rand(s) % n;
}

static int sim_coin(struct brk_sim *s)
{
    return (int)(sim_rand(s) >> 63);
}

/* ------------------------------------------------------------------ */
/* Byte buffers                                                          */

static int buf_reserve(struct sim_buf *b, uint64_t need)
{
    size_t cap;
    unsigned char *p;

    if (need <= b->cap)
        return 0;
    if (need > BRK_SIM_MAX_FILE)
        return -EFBIG;
    cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* The apply functions require capacity reserved beforehand, so a sequence
 * of them cannot fail halfway. */
static void buf_apply_write(struct sim_buf *b, uint64_t off,
                            const unsigned char *data, size_t n)
{
    size_t o = (size_t)off;

    if (n == 0)
        return;
    if (o > b->len)
        memset(b->p + b->len, 0, o - b->len);   /* a hole reads as zeros */
    memcpy(b->p + o, data, n);
    if (o + n > b->len)
        b->len = o + n;
}

static void buf_apply_trunc(struct sim_buf *b, uint64_t size)
{
    size_t sz = (size_t)size;

    if (sz > b->len)
        memset(b->p + b->len, 0, sz - b->len);
    b->len = sz;
}

static void buf_free(struct sim_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static int buf_clone(struct sim_buf *dst, const struct sim_buf *src)
{
    int rc = buf_reserve(dst, src->len);

    if (rc != 0)
        return rc;
    if (src->len > 0)
        memcpy(dst->p, src->p, src->len);
    dst->len = src->len;
    return 0;
}

static uint64_t fop_end(const struct sim_fop *op)
{
    return op->kind == SIM_FOP_WRITE ? op->off + op->len : op->off;
}

static void fop_apply(struct sim_buf *b, const struct sim_fop *op)
{
    if (op->kind == SIM_FOP_WRITE)
        buf_apply_write(b, op->off, op->data, op->len);
    else
        buf_apply_trunc(b, op->off);
}

/* Largest size a buffer passes through while `ops` are replayed onto a
 * buffer of size `start`: what must be reserved up front. */
static uint64_t fops_need(uint64_t start, const struct sim_fop *ops, size_t n)
{
    uint64_t need = start;

    for (size_t i = 0; i < n; i++)
        if (fop_end(&ops[i]) > need)
            need = fop_end(&ops[i]);
    return need;
}

static void fops_free(struct sim_inode *ino)
{
    for (size_t i = 0; i < ino->nfops; i++)
        free(ino->fops[i].data);
    free(ino->fops);
    ino->fops = NULL;
    ino->nfops = ino->capfops = 0;
}

static int fops_reserve(struct sim_inode *ino)
{
    struct sim_fop *v;
    size_t cap;

    if (ino->nfops < ino->capfops)
        return 0;
    cap = ino->capfops ? ino->capfops * 2 : 16;
    v = realloc(ino->fops, cap * sizeof *v);
    if (v == NULL)
        return -ENOMEM;
    ino->fops = v;
    ino->capfops = cap;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Entry lists (no reference counting here; callers do it)               */

/* Compare entry name `a` with the counted string key[0..n). */
static int name_cmp(const char *a, const char *key, size_t n)
{
    int c = strncmp(a, key, n);

    if (c != 0)
        return c;
    return a[n] == '\0' ? 0 : 1;
}

/* Index of `key` if present (returns 1), else its insertion index (0). */
static int ents_find(const struct sim_ents *e, const char *key, size_t n,
                     size_t *pos)
{
    size_t lo = 0, hi = e->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = name_cmp(e->v[mid].name, key, n);

        if (c == 0) {
            *pos = mid;
            return 1;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *pos = lo;
    return 0;
}

static struct sim_inode *ents_get(const struct sim_ents *e, const char *name)
{
    size_t pos;

    return ents_find(e, name, strlen(name), &pos) ? e->v[pos].ino : NULL;
}

static int ents_reserve(struct sim_ents *e, size_t extra)
{
    struct sim_ent *v;
    size_t cap;

    if (e->n + extra <= e->cap)
        return 0;
    cap = e->cap ? e->cap : 8;
    while (cap < e->n + extra)
        cap *= 2;
    v = realloc(e->v, cap * sizeof *v);
    if (v == NULL)
        return -ENOMEM;
    e->v = v;
    e->cap = cap;
    return 0;
}

/* Set name -> ino, taking ownership of `owned` (freed if the name already
 * existed).  Needs one reserved slot.  Returns the replaced inode or NULL. */
static struct sim_inode *ents_put(struct sim_ents *e, char *owned,
                                  struct sim_inode *ino)
{
    size_t pos;
    struct sim_inode *old;

    if (ents_find(e, owned, strlen(owned), &pos)) {
        free(owned);
        old = e->v[pos].ino;
        e->v[pos].ino = ino;
        return old;
    }
    memmove(&e->v[pos + 1], &e->v[pos], (e->n - pos) * sizeof e->v[0]);
    e->v[pos].name = owned;
    e->v[pos].ino = ino;
    e->n++;
    return NULL;
}

static void ents_remove_at(struct sim_ents *e, size_t pos)
{
    free(e->v[pos].name);
    memmove(&e->v[pos], &e->v[pos + 1], (e->n - pos - 1) * sizeof e->v[0]);
    e->n--;
}

/* Remove `name`; returns the inode it named, or NULL if absent. */
static struct sim_inode *ents_remove(struct sim_ents *e, const char *name)
{
    size_t pos;
    struct sim_inode *old;

    if (!ents_find(e, name, strlen(name), &pos))
        return NULL;
    old = e->v[pos].ino;
    ents_remove_at(e, pos);
    return old;
}

static void ents_free(struct sim_ents *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->v[i].name);
    free(e->v);
    e->v = NULL;
    e->n = e->cap = 0;
}

static int ents_clone(struct sim_ents *dst, const struct sim_ents *src)
{
    if (ents_reserve(dst, src->n) != 0)
        return -ENOMEM;
    for (size_t i = 0; i < src->n; i++) {
        char *name = strdup(src->v[i].name);
        if (name == NULL)
            return -ENOMEM;     /* dst keeps what it has; caller frees it */
        dst->v[dst->n].name = name;
        dst->v[dst->n].ino = src->v[i].ino;
        dst->n++;
    }
    return 0;
}

/* Replay one namespace op on an uncounted list (crash computation). */
static int ents_apply_nop(struct sim_ents *e, const struct sim_nop *op)
{
    char *name;

    if (op->kind == SIM_NOP_DEL) {
        ents_remove(e, op->name);
        return 0;
    }
    name = strdup(op->kind == SIM_NOP_MOVE ? op->to : op->name);
    if (name == NULL || ents_reserve(e, 1) != 0) {
        free(name);
        return -ENOMEM;
    }
    if (op->kind == SIM_NOP_MOVE)
        ents_remove(e, op->name);
    ents_put(e, name, op->ino);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Inodes and reference counting                                        */

static struct sim_inode *inode_new(struct brk_sim *s, int is_dir)
{
    struct sim_inode *ino = calloc(1, sizeof *ino);

    if (ino == NULL)
        return NULL;
    ino->is_dir = is_dir;
    ino->prev = s->tail;
    if (s->tail != NULL)
        s->tail->next = ino;
    else
        s->head = ino;
    s->tail = ino;
    return ino;
}

static void nops_free_raw(struct sim_inode *dir)
{
    for (size_t i = 0; i < dir->nnops; i++) {
        free(dir->nops[i].name);
        free(dir->nops[i].to);
    }
    free(dir->nops);
    dir->nops = NULL;
    dir->nnops = dir->capnops = 0;
}

/* Free an inode's memory without touching the inodes it refers to. */
static void inode_destroy_raw(struct brk_sim *s, struct sim_inode *ino)
{
    if (ino->prev != NULL)
        ino->prev->next = ino->next;
    else
        s->head = ino->next;
    if (ino->next != NULL)
        ino->next->prev = ino->prev;
    else
        s->tail = ino->prev;

    buf_free(&ino->vol);
    buf_free(&ino->dur);
    buf_free(&ino->cr_vol);
    buf_free(&ino->cr_dur);
    fops_free(ino);
    ents_free(&ino->vents);
    ents_free(&ino->dents);
    ents_free(&ino->cr_vents);
    ents_free(&ino->cr_dents);
    nops_free_raw(ino);
    free(ino);
}

static void inode_ref(struct sim_inode *ino)
{
    ino->refs++;
}

/* Drop one reference; at zero the inode and its own references go.  Cycles
 * (possible only in durable entries after cross-directory renames) never
 * reach zero and are freed at the next crash or at brk_sim_close. */
static void inode_unref(struct brk_sim *s, struct sim_inode *ino)
{
    if (--ino->refs > 0)
        return;
    for (size_t i = 0; i < ino->vents.n; i++) {
        ino->vents.v[i].ino->vlinks--;
        inode_unref(s, ino->vents.v[i].ino);
    }
    for (size_t i = 0; i < ino->dents.n; i++)
        inode_unref(s, ino->dents.v[i].ino);
    for (size_t i = 0; i < ino->nnops; i++)
        if (ino->nops[i].ino != NULL)
            inode_unref(s, ino->nops[i].ino);
    inode_destroy_raw(s, ino);
}

static int nops_reserve(struct sim_inode *dir, size_t extra)
{
    struct sim_nop *v;
    size_t cap;

    if (dir->nnops + extra <= dir->capnops)
        return 0;
    cap = dir->capnops ? dir->capnops : 8;
    while (cap < dir->nnops + extra)
        cap *= 2;
    v = realloc(dir->nops, cap * sizeof *v);
    if (v == NULL)
        return -ENOMEM;
    dir->nops = v;
    dir->capnops = cap;
    return 0;
}

/* Record a pending namespace op (slot reserved; takes ownership of names). */
static void nops_push(struct sim_inode *dir, int kind, char *name, char *to,
                      struct sim_inode *ino)
{
    struct sim_nop *op = &dir->nops[dir->nnops++];

    op->kind = kind;
    op->name = name;
    op->to = to;
    op->ino = ino;
    if (ino != NULL)
        inode_ref(ino);
}

/* Volatile link name -> ino in dir (slot reserved; takes `owned`). */
static void vol_link(struct brk_sim *s, struct sim_inode *dir, char *owned,
                     struct sim_inode *ino)
{
    struct sim_inode *old;

    inode_ref(ino);
    ino->vlinks++;
    old = ents_put(&dir->vents, owned, ino);
    if (old != NULL) {
        old->vlinks--;
        inode_unref(s, old);
    }
}

static void vol_unlink(struct brk_sim *s, struct sim_inode *dir,
                       const char *name)
{
    struct sim_inode *old = ents_remove(&dir->vents, name);

    if (old != NULL) {
        old->vlinks--;
        inode_unref(s, old);
    }
}

/* ------------------------------------------------------------------ */
/* Paths                                                                 */

/* Normalise `path` into a fresh string "a/b/c" ("" for the root): leading,
 * trailing and repeated slashes and "." go, ".." removes one component. */
static int path_norm(const char *path, char **out)
{
    size_t olen = 0;
    const char *p = path;
    char *o;

    *out = NULL;
    if (path == NULL)
        return -EINVAL;
    o = malloc(strlen(path) + 1);
    if (o == NULL)
        return -ENOMEM;
    while (*p != '\0') {
        const char *q;
        size_t clen;

        while (*p == '/')
            p++;
        if (*p == '\0')
            break;
        q = p;
        while (*q != '\0' && *q != '/')
            q++;
        clen = (size_t)(q - p);
        if (clen == 1 && p[0] == '.') {
            /* nothing */
        } else if (clen == 2 && p[0] == '.' && p[1] == '.') {
            while (olen > 0 && o[olen - 1] != '/')
                olen--;
            if (olen > 0)
                olen--;
        } else {
            if (clen > NAME_MAX) {
                free(o);
                return -ENAMETOOLONG;
            }
            if (olen > 0)
                o[olen++] = '/';
            memcpy(o + olen, p, clen);
            olen += clen;
        }
        p = q;
    }
    o[olen] = '\0';
    *out = o;
    return 0;
}

/* Resolve the first `len` characters of a normalised path (a component
 * boundary) through the volatile namespace. */
static int path_walk(struct brk_sim *s, const char *norm, size_t len,
                     struct sim_inode **out)
{
    struct sim_inode *cur = s->root;
    size_t i = 0;

    while (i < len) {
        size_t j = i, pos;

        while (j < len && norm[j] != '/')
            j++;
        if (!cur->is_dir)
            return -ENOTDIR;
        if (!ents_find(&cur->vents, norm + i, j - i, &pos))
            return -ENOENT;
        cur = cur->vents.v[pos].ino;
        i = j + 1;
    }
    *out = cur;
    return 0;
}

/* Split a normalised, non-root path into its parent directory (resolved)
 * and last component (pointer into norm). */
static int path_parent(struct brk_sim *s, const char *norm,
                       struct sim_inode **dir, const char **name)
{
    const char *slash = strrchr(norm, '/');
    size_t plen = slash != NULL ? (size_t)(slash - norm) : 0;
    int rc = path_walk(s, norm, plen, dir);

    if (rc != 0)
        return rc;
    if (!(*dir)->is_dir)
        return -ENOTDIR;
    *name = slash != NULL ? slash + 1 : norm;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Fault gate                                                            */

static int sim_gate(struct brk_sim *s, brk_sim_op kind, int mutating)
{
    if (mutating) {
        s->ops++;
        if (s->dead)
            return -EIO;
        if (s->ops > s->crash_at) {
            s->dead = 1;
            return -EIO;
        }
    }
    if (s->fail[kind].count > 0) {
        s->fail[kind].count--;
        return -s->fail[kind].err;
    }
    return 0;
}

static int handle_check(struct brk_sim *s, struct sim_handle *h)
{
    return h->epoch == s->epoch ? 0 : -EIO;
}

static uint64_t sim_used(struct brk_sim *s)
{
    uint64_t used = 0;

    for (struct sim_inode *i = s->head; i != NULL; i = i->next)
        if (!i->is_dir && (i->vlinks > 0 || i->nopen > 0))
            used += i->vol.len;
    return used;
}

/* ------------------------------------------------------------------ */
/* brk_io methods                                                        */

static int sim_open(brk_io *io, const char *path, int flags, brk_file **out)
{
    const int known = BRK_IO_RDWR | BRK_IO_CREATE | BRK_IO_EXCL;
    struct brk_sim *s = sim_of(io);
    int create = (flags & BRK_IO_CREATE) != 0;
    struct sim_handle *h = NULL;
    struct sim_inode *dir, *ino, *fresh = NULL;
    const char *name;
    char *norm = NULL, *n1 = NULL, *n2 = NULL;
    int rc;

    if (out == NULL || path == NULL || (flags & ~known) != 0)
        return -EINVAL;
    *out = NULL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, create ? BRK_SIM_OP_OPEN_CREATE : BRK_SIM_OP_OPEN, create);
    if (rc != 0)
        goto done;
    rc = path_norm(path, &norm);
    if (rc != 0)
        goto done;
    if (norm[0] == '\0') {
        rc = -EISDIR;
        goto done;
    }
    rc = path_parent(s, norm, &dir, &name);
    if (rc != 0)
        goto done;
    ino = ents_get(&dir->vents, name);
    if (ino != NULL) {
        if (create && (flags & BRK_IO_EXCL)) {
            rc = -EEXIST;
            goto done;
        }
        if (ino->is_dir) {
            rc = -EISDIR;
            goto done;
        }
    } else if (!create) {
        rc = -ENOENT;
        goto done;
    }

    h = malloc(sizeof *h);
    if (h == NULL) {
        rc = -ENOMEM;
        goto done;
    }
    if (ino == NULL) {
        n1 = strdup(name);
        n2 = strdup(name);
        if (n1 == NULL || n2 == NULL || nops_reserve(dir, 1) != 0 ||
            ents_reserve(&dir->vents, 1) != 0 ||
            (fresh = inode_new(s, 0)) == NULL) {
            rc = -ENOMEM;
            goto done;
        }
        nops_push(dir, SIM_NOP_ADD, n1, NULL, fresh);
        vol_link(s, dir, n2, fresh);
        n1 = n2 = NULL;
        ino = fresh;
    }
    inode_ref(ino);
    ino->nopen++;
    h->ino = ino;
    h->epoch = s->epoch;
    h->writable = create || (flags & BRK_IO_RDWR);
    *out = (brk_file *)(void *)h;
    h = NULL;
done:
    pthread_mutex_unlock(&s->mu);
    free(h);
    free(n1);
    free(n2);
    free(norm);
    return rc;
}

static int sim_close(brk_io *io, brk_file *f)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);

    if (h == NULL)
        return 0;
    pthread_mutex_lock(&s->mu);
    h->ino->nopen--;
    inode_unref(s, h->ino);
    pthread_mutex_unlock(&s->mu);
    free(h);
    return 0;
}

static int sim_pread(brk_io *io, brk_file *f, void *buf, size_t len,
                     uint64_t off, size_t *nread)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);
    size_t n = 0;
    int rc;

    if (nread != NULL)
        *nread = 0;
    if (h == NULL || (buf == NULL && len > 0))
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = handle_check(s, h);
    if (rc == 0)
        rc = sim_gate(s, BRK_SIM_OP_PREAD, 0);
    if (rc == 0 && off < h->ino->vol.len) {
        size_t avail = h->ino->vol.len - (size_t)off;
        n = len < avail ? len : avail;
        memcpy(buf, h->ino->vol.p + off, n);
    }
    pthread_mutex_unlock(&s->mu);
    if (rc == 0 && nread != NULL)
        *nread = n;
    return rc;
}

static int sim_pwrite(brk_io *io, brk_file *f, const void *buf, size_t len,
                      uint64_t off)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);
    struct sim_inode *ino;
    unsigned char *copy = NULL;
    int rc;

    if (h == NULL || (buf == NULL && len > 0))
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    ino = h->ino;
    rc = handle_check(s, h);
    if (rc == 0 && !h->writable)
        rc = -EBADF;
    if (rc == 0)
        rc = sim_gate(s, BRK_SIM_OP_PWRITE, 1);
    if (rc != 0 || len == 0)
        goto done;
    if (off > BRK_SIM_MAX_FILE || len > BRK_SIM_MAX_FILE - off) {
        rc = -EFBIG;
        goto done;
    }
    if (s->capacity != BRK_SIM_UNLIMITED) {
        uint64_t end = off + len;
        uint64_t grow = end > ino->vol.len ? end - ino->vol.len : 0;
        uint64_t used = sim_used(s);

        if (used > s->capacity || grow > s->capacity - used) {
            rc = -ENOSPC;
            goto done;
        }
    }
    copy = malloc(len);
    if (copy == NULL || fops_reserve(ino) != 0) {
        rc = -ENOMEM;
        goto done;
    }
    rc = buf_reserve(&ino->vol, off + len);
    if (rc != 0)
        goto done;
    memcpy(copy, buf, len);
    buf_apply_write(&ino->vol, off, copy, len);
    ino->fops[ino->nfops++] = (struct sim_fop){
        .kind = SIM_FOP_WRITE, .off = off, .len = len, .data = copy };
    copy = NULL;
done:
    pthread_mutex_unlock(&s->mu);
    free(copy);
    return rc;
}

static int sim_sync(brk_io *io, brk_file *f)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);
    struct sim_inode *ino;
    int rc;

    if (h == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    ino = h->ino;
    rc = handle_check(s, h);
    if (rc == 0)
        rc = sim_gate(s, BRK_SIM_OP_SYNC, 1);
    if (rc == 0)
        rc = buf_reserve(&ino->dur, fops_need(ino->dur.len, ino->fops,
                                              ino->nfops));
    if (rc == 0) {
        /* Replay rather than copy the volatile bytes: the cost is the
         * unsynced bytes, not the file size, which keeps group-commit tests
         * with thousands of syncs fast. */
        for (size_t i = 0; i < ino->nfops; i++)
            fop_apply(&ino->dur, &ino->fops[i]);
        fops_free(ino);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int sim_truncate(brk_io *io, brk_file *f, uint64_t size)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);
    struct sim_inode *ino;
    int rc;

    if (h == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    ino = h->ino;
    rc = handle_check(s, h);
    if (rc == 0 && !h->writable)
        rc = -EINVAL;       /* what ftruncate(2) says for a read-only fd */
    if (rc == 0)
        rc = sim_gate(s, BRK_SIM_OP_TRUNCATE, 1);
    if (rc == 0 && size > BRK_SIM_MAX_FILE)
        rc = -EFBIG;
    if (rc == 0 && fops_reserve(ino) != 0)
        rc = -ENOMEM;
    if (rc == 0)
        rc = buf_reserve(&ino->vol, size);
    if (rc == 0) {
        buf_apply_trunc(&ino->vol, size);
        ino->fops[ino->nfops++] = (struct sim_fop){
            .kind = SIM_FOP_TRUNC, .off = size, .len = 0, .data = NULL };
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int sim_size(brk_io *io, brk_file *f, uint64_t *size)
{
    struct brk_sim *s = sim_of(io);
    struct sim_handle *h = handle_of(f);
    int rc;

    if (h == NULL || size == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = handle_check(s, h);
    if (rc == 0)
        *size = h->ino->vol.len;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int sim_mkdir(brk_io *io, const char *path)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *dir, *ino, *fresh = NULL;
    const char *name;
    char *norm = NULL, *n1 = NULL, *n2 = NULL;
    int rc;

    if (path == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, BRK_SIM_OP_MKDIR, 1);
    if (rc == 0)
        rc = path_norm(path, &norm);
    if (rc != 0 || norm[0] == '\0')     /* the root always exists */
        goto done;
    rc = path_parent(s, norm, &dir, &name);
    if (rc != 0)
        goto done;
    ino = ents_get(&dir->vents, name);
    if (ino != NULL) {
        rc = ino->is_dir ? 0 : -EEXIST;
        goto done;
    }
    n1 = strdup(name);
    n2 = strdup(name);
    if (n1 == NULL || n2 == NULL || nops_reserve(dir, 1) != 0 ||
        ents_reserve(&dir->vents, 1) != 0 ||
        (fresh = inode_new(s, 1)) == NULL) {
        rc = -ENOMEM;
        goto done;
    }
    nops_push(dir, SIM_NOP_ADD, n1, NULL, fresh);
    vol_link(s, dir, n2, fresh);
    n1 = n2 = NULL;
done:
    pthread_mutex_unlock(&s->mu);
    free(n1);
    free(n2);
    free(norm);
    return rc;
}

/* unlink and rmdir: same bookkeeping, different type checks. */
static int sim_remove(brk_io *io, const char *path, int want_dir)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *dir, *ino;
    const char *name;
    char *norm = NULL, *n1 = NULL;
    int rc;

    if (path == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, want_dir ? BRK_SIM_OP_RMDIR : BRK_SIM_OP_UNLINK, 1);
    if (rc == 0)
        rc = path_norm(path, &norm);
    if (rc != 0)
        goto done;
    if (norm[0] == '\0') {
        rc = want_dir ? -EBUSY : -EISDIR;
        goto done;
    }
    rc = path_parent(s, norm, &dir, &name);
    if (rc != 0)
        goto done;
    ino = ents_get(&dir->vents, name);
    if (ino == NULL) {
        rc = -ENOENT;
        goto done;
    }
    if (want_dir && !ino->is_dir) {
        rc = -ENOTDIR;
        goto done;
    }
    if (!want_dir && ino->is_dir) {
        rc = -EISDIR;           /* Linux unlink(2) on a directory */
        goto done;
    }
    if (want_dir && ino->vents.n > 0) {
        rc = -ENOTEMPTY;
        goto done;
    }
    n1 = strdup(name);
    if (n1 == NULL || nops_reserve(dir, 1) != 0) {
        rc = -ENOMEM;
        goto done;
    }
    nops_push(dir, SIM_NOP_DEL, n1, NULL, NULL);
    n1 = NULL;
    vol_unlink(s, dir, name);
done:
    pthread_mutex_unlock(&s->mu);
    free(n1);
    free(norm);
    return rc;
}

static int sim_unlink(brk_io *io, const char *path)
{
    return sim_remove(io, path, 0);
}

static int sim_rmdir(brk_io *io, const char *path)
{
    return sim_remove(io, path, 1);
}

static int sim_rename(brk_io *io, const char *from, const char *to)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *fdir, *tdir, *src, *dst;
    const char *fname, *tname;
    char *nf = NULL, *nt = NULL, *a = NULL, *b = NULL, *c = NULL;
    size_t flen;
    int rc;

    if (from == NULL || to == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, BRK_SIM_OP_RENAME, 1);
    if (rc == 0)
        rc = path_norm(from, &nf);
    if (rc == 0)
        rc = path_norm(to, &nt);
    if (rc != 0)
        goto done;
    if (nf[0] == '\0' || nt[0] == '\0') {
        rc = -EBUSY;
        goto done;
    }
    rc = path_parent(s, nf, &fdir, &fname);
    if (rc != 0)
        goto done;
    src = ents_get(&fdir->vents, fname);
    if (src == NULL) {
        rc = -ENOENT;
        goto done;
    }
    rc = path_parent(s, nt, &tdir, &tname);
    if (rc != 0)
        goto done;
    dst = ents_get(&tdir->vents, tname);
    if (dst == src)
        goto done;              /* same file: POSIX says do nothing */
    if (src->is_dir) {
        flen = strlen(nf);
        if (strncmp(nt, nf, flen) == 0 && nt[flen] == '/') {
            rc = -EINVAL;       /* into its own subtree */
            goto done;
        }
        if (dst != NULL && !dst->is_dir) {
            rc = -ENOTDIR;
            goto done;
        }
        if (dst != NULL && dst->vents.n > 0) {
            rc = -ENOTEMPTY;
            goto done;
        }
    } else if (dst != NULL && dst->is_dir) {
        rc = -EISDIR;
        goto done;
    }

    a = strdup(fname);
    b = strdup(tname);
    c = strdup(tname);
    if (a == NULL || b == NULL || c == NULL ||
        nops_reserve(fdir, 1) != 0 || nops_reserve(tdir, 1) != 0 ||
        ents_reserve(&tdir->vents, 1) != 0) {
        rc = -ENOMEM;
        goto done;
    }
    if (fdir == tdir) {
        nops_push(fdir, SIM_NOP_MOVE, a, b, src);
    } else {
        nops_push(tdir, SIM_NOP_ADD, b, NULL, src);
        nops_push(fdir, SIM_NOP_DEL, a, NULL, NULL);
    }
    a = b = NULL;
    /* Link the new name first: it takes a reference, so unlinking the old
     * name cannot free the inode in between. */
    vol_link(s, tdir, c, src);
    c = NULL;
    vol_unlink(s, fdir, fname);
done:
    pthread_mutex_unlock(&s->mu);
    free(a);
    free(b);
    free(c);
    free(nf);
    free(nt);
    return rc;
}

static int sim_sync_dir(brk_io *io, const char *path)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *dir = NULL;
    struct sim_ents fresh = { 0 };
    struct sim_ents old;
    char *norm = NULL;
    int rc;

    if (path == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, BRK_SIM_OP_SYNC_DIR, 1);
    if (rc == 0)
        rc = path_norm(path, &norm);
    if (rc == 0)
        rc = path_walk(s, norm, strlen(norm), &dir);
    if (rc == 0 && !dir->is_dir)
        rc = -ENOTDIR;
    if (rc == 0 && ents_clone(&fresh, &dir->vents) != 0)
        rc = -ENOMEM;
    if (rc != 0) {
        ents_free(&fresh);
        goto done;
    }
    /* Take the new references before dropping the old ones so an inode
     * named in both lists never touches zero. */
    for (size_t i = 0; i < fresh.n; i++)
        inode_ref(fresh.v[i].ino);
    old = dir->dents;
    dir->dents = fresh;
    for (size_t i = 0; i < old.n; i++)
        inode_unref(s, old.v[i].ino);
    ents_free(&old);
    for (size_t i = 0; i < dir->nnops; i++) {
        struct sim_inode *ino = dir->nops[i].ino;
        dir->nops[i].ino = NULL;
        if (ino != NULL)
            inode_unref(s, ino);
    }
    nops_free_raw(dir);
done:
    pthread_mutex_unlock(&s->mu);
    free(norm);
    return rc;
}

static int sim_list(brk_io *io, const char *path, brk_io_list_fn fn,
                    void *arg)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *dir = NULL;
    char **names = NULL;
    char *norm = NULL;
    size_t n = 0;
    int rc;

    if (path == NULL || fn == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = sim_gate(s, BRK_SIM_OP_LIST, 0);
    if (rc == 0)
        rc = path_norm(path, &norm);
    if (rc == 0)
        rc = path_walk(s, norm, strlen(norm), &dir);
    if (rc == 0 && !dir->is_dir)
        rc = -ENOTDIR;
    /* Snapshot the names so the callback runs unlocked: callers commonly
     * open or unlink the files they are told about. */
    if (rc == 0 && dir->vents.n > 0) {
        names = calloc(dir->vents.n, sizeof *names);
        if (names == NULL)
            rc = -ENOMEM;
        for (size_t i = 0; rc == 0 && i < dir->vents.n; i++) {
            names[i] = strdup(dir->vents.v[i].name);
            if (names[i] == NULL)
                rc = -ENOMEM;
            n = i + 1;
        }
    }
    pthread_mutex_unlock(&s->mu);
    free(norm);
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (fn(arg, names[i]) != 0)
            break;
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc;
}

static int sim_exists(brk_io *io, const char *path)
{
    struct brk_sim *s = sim_of(io);
    struct sim_inode *ino;
    char *norm = NULL;
    int rc;

    if (path == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    rc = path_norm(path, &norm);
    if (rc == 0)
        rc = path_walk(s, norm, strlen(norm), &ino);
    pthread_mutex_unlock(&s->mu);
    free(norm);
    if (rc == 0)
        return 1;
    if (rc == -ENOENT || rc == -ENOTDIR)
        return 0;
    return rc;
}

/* ------------------------------------------------------------------ */
/* Crash                                                                 */

/* Post-crash bytes of one file into ino->cr_vol / cr_dur. */
static int crash_file(struct brk_sim *s, struct sim_inode *ino, int mode)
{
    struct sim_buf *nb = &ino->cr_vol;
    size_t last = SIZE_MAX;
    int rc;

    rc = buf_reserve(nb, fops_need(ino->dur.len, ino->fops, ino->nfops));
    if (rc == 0)
        rc = buf_clone(nb, &ino->dur);
    if (rc != 0)
        return rc;

    if (mode == BRK_SIM_TORN_LAST)
        for (size_t i = 0; i < ino->nfops; i++)
            if (ino->fops[i].kind == SIM_FOP_WRITE)
                last = i;

    for (size_t i = 0; i < ino->nfops && mode != BRK_SIM_DROP_ALL; i++) {
        const struct sim_fop *op = &ino->fops[i];

        if (mode == BRK_SIM_TORN_LAST) {
            if (i == last)
                buf_apply_write(nb, op->off, op->data,
                                (size_t)sim_rand_below(s, op->len));
            else
                fop_apply(nb, op);
        } else if (op->kind == SIM_FOP_TRUNC) {
            if (sim_coin(s))
                buf_apply_trunc(nb, op->off);
        } else {
            /* Each piece of the write that falls in one aligned sector is
             * an independent writeback decision. */
            uint64_t pos = op->off, end = op->off + op->len;

            while (pos < end) {
                uint64_t sec_end = (pos / BRK_SIM_SECTOR + 1) * BRK_SIM_SECTOR;
                uint64_t piece_end = sec_end < end ? sec_end : end;

                if (sim_coin(s))
                    buf_apply_write(nb, pos, op->data + (pos - op->off),
                                    (size_t)(piece_end - pos));
                pos = piece_end;
            }
        }
    }
    return buf_clone(&ino->cr_dur, nb);
}

/* Post-crash entries of one directory into ino->cr_vents / cr_dents. */
static int crash_dir(struct brk_sim *s, struct sim_inode *ino, int mode)
{
    size_t keep = 0;

    if (ents_clone(&ino->cr_vents, &ino->dents) != 0)
        return -ENOMEM;
    if (mode == BRK_SIM_KEEP_RANDOM)
        keep = (size_t)sim_rand_below(s, (uint64_t)ino->nnops + 1);
    for (size_t i = 0; i < keep; i++)
        if (ents_apply_nop(&ino->cr_vents, &ino->nops[i]) != 0)
            return -ENOMEM;
    return ents_clone(&ino->cr_dents, &ino->cr_vents);
}

static void crash_scratch_free(struct brk_sim *s)
{
    for (struct sim_inode *i = s->head; i != NULL; i = i->next) {
        buf_free(&i->cr_vol);
        buf_free(&i->cr_dur);
        ents_free(&i->cr_vents);
        ents_free(&i->cr_dents);
    }
}

/* Mark everything reachable from `dir`, dropping any second name of a
 * directory so the result is a tree (see the model above). */
static void crash_mark(struct sim_inode *dir)
{
    size_t i = 0;

    dir->mark = 1;
    while (i < dir->vents.n) {
        struct sim_inode *child = dir->vents.v[i].ino;

        if (child->is_dir && child->mark) {
            /* vents and dents are identical copies here */
            ents_remove_at(&dir->vents, i);
            ents_remove_at(&dir->dents, i);
            continue;
        }
        if (child->is_dir)
            crash_mark(child);
        else
            child->mark = 1;
        i++;
    }
}

brk_status brk_sim_crash(brk_sim *s, int mode)
{
    struct sim_inode *i, *next;

    if (s == NULL || (mode != BRK_SIM_DROP_ALL && mode != BRK_SIM_KEEP_RANDOM &&
                      mode != BRK_SIM_TORN_LAST))
        return BRK_INVAL;
    pthread_mutex_lock(&s->mu);

    /* Phase 1: compute every post-crash content; may fail, changes nothing
     * visible. */
    for (i = s->head; i != NULL; i = i->next) {
        int rc = i->is_dir ? crash_dir(s, i, mode) : crash_file(s, i, mode);
        if (rc != 0) {
            crash_scratch_free(s);
            pthread_mutex_unlock(&s->mu);
            return BRK_NOMEM;
        }
    }

    /* Phase 2: install it.  Pending lists go without touching reference
     * counts; those are recomputed from scratch below. */
    for (i = s->head; i != NULL; i = i->next) {
        buf_free(&i->vol);
        buf_free(&i->dur);
        i->vol = i->cr_vol;
        i->dur = i->cr_dur;
        memset(&i->cr_vol, 0, sizeof i->cr_vol);
        memset(&i->cr_dur, 0, sizeof i->cr_dur);
        fops_free(i);
        ents_free(&i->vents);
        ents_free(&i->dents);
        i->vents = i->cr_vents;
        i->dents = i->cr_dents;
        memset(&i->cr_vents, 0, sizeof i->cr_vents);
        memset(&i->cr_dents, 0, sizeof i->cr_dents);
        nops_free_raw(i);
        i->mark = 0;
    }

    /* Phase 3: reachability, reference counts, and freeing what is gone.
     * Files with open (now stale) handles stay until those are closed. */
    crash_mark(s->root);
    for (i = s->head; i != NULL; i = i->next) {
        i->refs = i->nopen;
        i->vlinks = 0;
    }
    s->root->refs++;
    for (i = s->head; i != NULL; i = i->next) {
        if (!i->mark || !i->is_dir)
            continue;
        for (size_t k = 0; k < i->vents.n; k++) {
            i->vents.v[k].ino->refs++;
            i->vents.v[k].ino->vlinks++;
        }
        for (size_t k = 0; k < i->dents.n; k++)
            i->dents.v[k].ino->refs++;
    }
    for (i = s->head; i != NULL; i = next) {
        next = i->next;
        if (!i->mark && i->nopen == 0 && i != s->root)
            inode_destroy_raw(s, i);
        else
            i->mark = 0;
    }

    s->epoch++;
    s->dead = 0;
    s->crash_at = UINT64_MAX;
    pthread_mutex_unlock(&s->mu);
    return BRK_OK;
}

/* ------------------------------------------------------------------ */
/* Lifecycle and test controls                                           */

brk_status brk_sim_open(brk_sim **out, uint64_t seed)
{
    struct brk_sim *s;
    uint64_t x = seed;

    if (out == NULL)
        return BRK_INVAL;
    *out = NULL;
    s = calloc(1, sizeof *s);
    if (s == NULL)
        return BRK_NOMEM;
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return BRK_NOMEM;
    }
    s->root = inode_new(s, 1);
    if (s->root == NULL) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        return BRK_NOMEM;
    }
    s->root->refs = 1;      /* the sim's own reference; never dropped */
    for (int k = 0; k < 4; k++)
        s->rng[k] = sim_splitmix(&x);
    s->crash_at = UINT64_MAX;
    s->capacity = BRK_SIM_UNLIMITED;
    s->io = (brk_io){
        .open = sim_open,
        .close = sim_close,
        .pread = sim_pread,
        .pwrite = sim_pwrite,
        .sync = sim_sync,
        .truncate = sim_truncate,
        .size = sim_size,
        .mkdir = sim_mkdir,
        .unlink = sim_unlink,
        .rmdir = sim_rmdir,
        .rename = sim_rename,
        .sync_dir = sim_sync_dir,
        .list = sim_list,
        .exists = sim_exists,
    };
    *out = s;
    return BRK_OK;
}

void brk_sim_close(brk_sim *s)
{
    if (s == NULL)
        return;
    /* Raw destruction: reference counts do not matter any more, and cycles
     * in durable entries would never reach zero anyway. */
    while (s->head != NULL)
        inode_destroy_raw(s, s->head);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

brk_io *brk_sim_io(brk_sim *s)
{
    return &s->io;
}

void brk_sim_set_crash_after(brk_sim *s, uint64_t n)
{
    pthread_mutex_lock(&s->mu);
    if (n == UINT64_MAX || s->ops > UINT64_MAX - n)
        s->crash_at = UINT64_MAX;
    else
        s->crash_at = s->ops + n;
    pthread_mutex_unlock(&s->mu);
}

uint64_t brk_sim_ops(brk_sim *s)
{
    uint64_t n;

    pthread_mutex_lock(&s->mu);
    n = s->ops;
    pthread_mutex_unlock(&s->mu);
    return n;
}

bool brk_sim_is_dead(brk_sim *s)
{
    bool dead;

    pthread_mutex_lock(&s->mu);
    dead = s->dead != 0;
    pthread_mutex_unlock(&s->mu);
    return dead;
}

brk_status brk_sim_fail_next(brk_sim *s, brk_sim_op op, int errno_value,
                             uint64_t count)
{
    if (s == NULL || (unsigned)op >= (unsigned)BRK_SIM_OP_COUNT_ ||
        errno_value == 0 || errno_value == INT_MIN)
        return BRK_INVAL;
    pthread_mutex_lock(&s->mu);
    s->fail[op].err = errno_value < 0 ? -errno_value : errno_value;
    s->fail[op].count = count;
    pthread_mutex_unlock(&s->mu);
    return BRK_OK;
}

void brk_sim_set_capacity(brk_sim *s, uint64_t bytes)
{
    pthread_mutex_lock(&s->mu);
    s->capacity = bytes;
    pthread_mutex_unlock(&s->mu);
}

/* Look up a regular file for the raw helpers, with status codes. */
static brk_status sim_find_file(brk_sim *s, const char *path,
                                struct sim_inode **out)
{
    char *norm = NULL;
    int rc = path_norm(path, &norm);

    if (rc == 0)
        rc = path_walk(s, norm, strlen(norm), out);
    free(norm);
    if (rc == -ENOMEM)
        return BRK_NOMEM;
    if (rc == -ENOENT || rc == -ENOTDIR)
        return BRK_NOTFOUND;
    if (rc != 0 || (*out)->is_dir)
        return BRK_INVAL;
    return BRK_OK;
}

brk_status brk_sim_file_size(brk_sim *s, const char *path, uint64_t *size)
{
    struct sim_inode *ino;
    brk_status st;

    if (s == NULL || path == NULL || size == NULL)
        return BRK_INVAL;
    pthread_mutex_lock(&s->mu);
    st = sim_find_file(s, path, &ino);
    if (st == BRK_OK)
        *size = ino->vol.len;
    pthread_mutex_unlock(&s->mu);
    return st;
}

brk_status brk_sim_write_raw(brk_sim *s, const char *path, uint64_t off,
                             const void *buf, size_t len)
{
    struct sim_inode *ino;
    brk_status st;

    if (s == NULL || path == NULL || (buf == NULL && len > 0))
        return BRK_INVAL;
    if (off > BRK_SIM_MAX_FILE || len > BRK_SIM_MAX_FILE - off)
        return BRK_INVAL;
    pthread_mutex_lock(&s->mu);
    st = sim_find_file(s, path, &ino);
    if (st == BRK_OK && len > 0) {
        if (buf_reserve(&ino->vol, off + len) != 0 ||
            buf_reserve(&ino->dur, off + len) != 0) {
            st = BRK_NOMEM;
        } else {
            buf_apply_write(&ino->vol, off, buf, len);
            buf_apply_write(&ino->dur, off, buf, len);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}
