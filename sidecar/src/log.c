/*
 * log.c - JSON-lines logger (see log.h for the line format).
 *
 * A line is built in a growable buffer (on the stack up to 2 KiB, on the heap
 * beyond), then written with write(2) under the logger's mutex: the mutex
 * keeps lines whole even when a write is short or stderr is a pipe and the
 * line is longer than PIPE_BUF.  Logging never fails loudly: an allocation
 * failure drops the line, a write error is ignored (there is nowhere left to
 * report it), and a reader that takes no byte for 2 s costs the line rather
 * than blocking every logging thread.  A SIGPIPE is the caller's to ignore
 * (the daemon does).
 */
#include "log.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EAGAIN_POLLS   20      /* x EAGAIN_POLL_MS: 2 s without progress */
#define EAGAIN_POLL_MS 100

struct sc_log {
    api_log_level level;       /* least severe level written */
    FILE *out;                 /* borrowed */
    int fd;                    /* fileno(out), or -1: write through stdio */
    const brk_clock *clock;
    pthread_mutex_t lock;      /* held for the write of one line */
    bool cut;                  /* the last line was cut short (under lock) */
    api_logger api;            /* { sc_log_api_log, this } */
};

/* ---- line buffer ------------------------------------------------------------ */

typedef struct linebuf {
    char *p;
    size_t len, cap;
    bool heap, oom;
} linebuf;

static void lb_reserve(linebuf *b, size_t more)
{
    if (b->oom || b->len + more <= b->cap)
        return;
    size_t cap = b->cap * 2;
    while (cap < b->len + more)
        cap *= 2;
    char *n = b->heap ? realloc(b->p, cap) : malloc(cap);
    if (!n) {
        b->oom = true;
        return;
    }
    if (!b->heap)
        memcpy(n, b->p, b->len);
    b->p = n;
    b->cap = cap;
    b->heap = true;
}

static void lb_put(linebuf *b, const char *s, size_t n)
{
    lb_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void lb_puts(linebuf *b, const char *s)
{
    lb_put(b, s, strlen(s));
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when it is not one:
 * overlong forms, surrogates and code points above U+10FFFF are invalid. */
static size_t utf8_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    size_t n;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
    else return 0;
    if (avail < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static void lb_json_string(linebuf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t avail = strlen(s);
    lb_put(b, "\"", 1);
    while (avail > 0) {
        unsigned c = *p;
        size_t n = utf8_len(p, avail);
        if (c == '"' || c == '\\') {
            char esc[2] = { '\\', (char)c };
            lb_put(b, esc, 2);
        } else if (c < 0x20 || c == 0x7F) {
            char esc[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
            lb_put(b, esc, 6);
        } else if (n == 0) {
            lb_put(b, "\xEF\xBF\xBD", 3);      /* U+FFFD for the bad byte */
            n = 1;
        } else {
            lb_put(b, (const char *)p, n);
        }
        if (n == 0)
            n = 1;
        p += n;
        avail -= n;
    }
    lb_put(b, "\"", 1);
}

/* ---- public ------------------------------------------------------------------ */

static void api_log_cb(void *ctx, api_log_level level, const char *msg,
                       const api_log_field *fields, size_t nfields)
{
    sc_log_write(ctx, level, msg, fields, nfields);
}

sc_log *sc_log_open(api_log_level level, FILE *out)
{
    sc_log *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    l->level = level;
    l->out = out;
    l->fd = fileno(out);
    l->clock = brk_clock_system();
    pthread_mutex_init(&l->lock, NULL);
    l->api.log = api_log_cb;
    l->api.ctx = l;
    return l;
}

void sc_log_close(sc_log *l)
{
    if (!l)
        return;
    pthread_mutex_destroy(&l->lock);
    free(l);
}

void sc_log_set_clock(sc_log *l, const brk_clock *clock)
{
    l->clock = clock ? clock : brk_clock_system();
}

bool sc_log_enabled(const sc_log *l, api_log_level level)
{
    return l && level >= l->level;
}

const char *sc_log_level_name(api_log_level level)
{
    switch (level) {
    case API_LOG_DEBUG: return "debug";
    case API_LOG_INFO:  return "info";
    case API_LOG_WARN:  return "warn";
    case API_LOG_ERROR: return "error";
    }
    return "error";
}

static void format_time(int64_t ms, char out[32])
{
    time_t secs = (time_t)(ms / 1000);
    int frac = (int)(ms % 1000);
    if (frac < 0) {
        frac += 1000;
        secs--;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", frac);
}

/* write(2) all of p, also when the descriptor is non-blocking (the flag
 * belongs to the open file, which a parent process may have set): on
 * EAGAIN wait for room, at most EAGAIN_POLLS x EAGAIN_POLL_MS while the
 * reader does not drain at all.  False when the rest was dropped. */
static bool write_all(int fd, const char *p, size_t len)
{
    int idle_polls = 0;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w > 0) {
            p += w;
            len -= (size_t)w;
            idle_polls = 0;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) &&
            idle_polls < EAGAIN_POLLS) {
            struct pollfd pf = { fd, POLLOUT, 0 };
            if (poll(&pf, 1, EAGAIN_POLL_MS) <= 0)
                idle_polls++;             /* a failing poll must not spin */
            continue;
        }
        return false;            /* EPIPE, EBADF, EIO, ...: nowhere to log */
    }
    return true;
}

static void emit(sc_log *l, const char *p, size_t len)
{
    pthread_mutex_lock(&l->lock);
    if (l->fd < 0) {
        fwrite(p, 1, len, l->out);
        fflush(l->out);
    } else {
        /* after a line cut short, end it so that only that line is lost */
        if (l->cut && write_all(l->fd, "\n", 1))
            l->cut = false;
        if (!l->cut && !write_all(l->fd, p, len))
            l->cut = true;
    }
    pthread_mutex_unlock(&l->lock);
}

void sc_log_write(sc_log *l, api_log_level level, const char *msg,
                  const api_log_field *fields, size_t nfields)
{
    if (!sc_log_enabled(l, level))
        return;
    char stackbuf[2048];
    linebuf b = { stackbuf, 0, sizeof stackbuf, false, false };
    char ts[32];
    format_time(l->clock->now_ms(l->clock->ctx), ts);
    lb_puts(&b, "{\"time\":\"");
    lb_puts(&b, ts);
    lb_puts(&b, "\",\"level\":\"");
    lb_puts(&b, sc_log_level_name(level));
    lb_puts(&b, "\",\"msg\":");
    lb_json_string(&b, msg ? msg : "");
    for (size_t i = 0; i < nfields; i++) {
        if (!fields[i].key)
            continue;
        lb_put(&b, ",", 1);
        lb_json_string(&b, fields[i].key);
        lb_put(&b, ":", 1);
        if (fields[i].value)
            lb_json_string(&b, fields[i].value);
        else
            lb_puts(&b, "null");
    }
    lb_puts(&b, "}\n");
    if (!b.oom)
        emit(l, b.p, b.len);
    if (b.heap)
        free(b.p);
}

void sc_log_kv(sc_log *l, api_log_level level, const char *msg, ...)
{
    if (!sc_log_enabled(l, level))
        return;
    api_log_field f[16];
    size_t n = 0;
    va_list ap;
    va_start(ap, msg);
    for (const char *k; n < 16 && (k = va_arg(ap, const char *)) != NULL; n++) {
        f[n].key = k;
        f[n].value = va_arg(ap, const char *);
    }
    va_end(ap);
    sc_log_write(l, level, msg, f, n);
}

const api_logger *sc_log_api(sc_log *l)
{
    return &l->api;
}
