/*
 * codec.h - JSON <-> broker structs for the HTTP API (http_api private).
 *
 * No I/O: jansson values and bytes in, owned structs or jansson values out.
 * Every function that can reject input writes a one-line reason naming the
 * field into err[errlen] ("field 'headers.x' must be a string") and returns
 * BRK_INVAL; the handler turns that into a 400 problem.  Those that take
 * err write "out of memory" with BRK_NOMEM (a 503), so err is set on every
 * failure.
 *
 * Ownership: api_msg owns its buffers (api_msg_free).  Functions returning
 * json_t * return a new reference.  Functions taking a json_t * to fill
 * (api_msg_to_json) only add to it.
 */
#ifndef HTTP_API_CODEC_H
#define HTTP_API_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "broker/record.h"
#include "broker/status.h"

/* ---- message fields (shared by send and prepare) ------------------------ */

/* A message as the request gave it, ready for brk_append_req /
 * brk_txn_prepare_req.  Every buffer is owned (malloc'ed) or NULL. */
typedef struct api_msg {
    char    *key;                   /* 0..BRK_KEY_MAX bytes, not NUL-counted */
    size_t   key_len;
    char    *tag;                   /* 0..BRK_TAG_MAX */
    size_t   tag_len;
    uint8_t *props;                 /* encoded block (brk_props_encode) */
    size_t   props_len;
    uint8_t *body;                  /* JSON text (flags) or raw bytes */
    size_t   body_len;
    uint32_t flags;                 /* BRK_RECF_BODY_JSON for "body" */
} api_msg;

/* The request-object fields api_msg_parse reads. */
#define API_MSG_FIELDS "key", "tag", "headers", "body", "body_base64"

/* Read key, tag, headers and exactly one of body / body_base64 from `obj`.
 * "body" (any JSON value, null included) is stored as compact JSON text
 * with BRK_RECF_BODY_JSON; "body_base64" as the decoded bytes.  Other
 * fields are ignored (see api_json_check_fields).  On failure *m is empty. */
brk_status api_msg_parse(const json_t *obj, api_msg *m, char *err,
                         size_t errlen);
void api_msg_free(api_msg *m);

/* Add "key", "tag", "headers" and "body" (flagged JSON that parses) or
 * "body_base64" of `rec` to `obj`.  Headers whose name starts with
 * `skip_prefix` (may be NULL) are left out.  BRK_NOMEM on allocation
 * failure. */
brk_status api_msg_to_json(json_t *obj, const brk_record *rec,
                           const char *skip_prefix);

/* ---- request objects ------------------------------------------------------ */

/* Parse a request body that must be one JSON object.  Duplicate keys are
 * refused; "\u0000" is allowed inside strings.  *out is a new reference.
 * BRK_NOMEM (not INVAL) when jansson ran out of memory. */
brk_status api_json_parse_object(const char *buf, size_t len, json_t **out,
                                 char *err, size_t errlen);

/* BRK_INVAL ("unknown field 'x'", with `prefix` before the name, e.g.
 * "check.") when `obj` holds a key outside `allowed` (NULL-terminated). */
brk_status api_json_check_fields(const json_t *obj, const char *const *allowed,
                                 const char *prefix, char *err, size_t errlen);

/* Typed field getters.  An absent field leaves *out alone and sets
 * *present false (present may be NULL); a field of the wrong type or
 * outside [lo, hi] is BRK_INVAL naming prefix+name.  A JSON null counts as
 * absent only where the rule says so (it never does here: null is a type
 * error, so typos of intent surface). */
brk_status api_json_int(const json_t *obj, const char *prefix,
                        const char *name, int64_t lo, int64_t hi,
                        int64_t *out, bool *present, char *err, size_t errlen);
brk_status api_json_bool(const json_t *obj, const char *prefix,
                         const char *name, bool *out, bool *present,
                         char *err, size_t errlen);
/* A string of 0..max bytes (min 1 when nonempty is set); *out borrows
 * from obj. */
brk_status api_json_str(const json_t *obj, const char *prefix,
                        const char *name, size_t max, bool nonempty,
                        const char **out, size_t *len, bool *present,
                        char *err, size_t errlen);

/* api_json_str for a value used as a C string (a tag expression, an enum
 * word, a reason): one with a NUL inside is refused, since reading it up
 * to the NUL would quietly act on another value. */
brk_status api_json_cstr(const json_t *obj, const char *prefix,
                         const char *name, size_t max, bool nonempty,
                         const char **out, bool *present, char *err,
                         size_t errlen);

/* ---- responses ------------------------------------------------------------ */

/* Compact text of `v` (any JSON value), malloc'ed, NUL-terminated, *len
 * without the NUL.  Reals are written with the fewest digits (15..17) that
 * read back as the same double, so 0.1 stays 0.1.  NULL on NOMEM.  The
 * bytes are json_dumps(JSON_COMPACT | JSON_ENCODE_ANY)'s: a tree without
 * reals is written by api_jbuf (no jansson dump, no loop-check table),
 * anything else by jansson. */
char *api_json_dump(const json_t *v, size_t *len);

/* A growing buffer of compact JSON text, written directly: the fixed-shape
 * 2xx answers of the hot routes and the reals-free trees of api_json_dump,
 * byte for byte what jansson's compact dump of the same json_t would be
 * (strings escape '"', '\' and controls only, as \b \f \n \r \t or
 * \u00XX upper case; integers in decimal).  A failed allocation or a
 * string that is not valid UTF-8 (jansson refuses those too) marks the
 * buffer failed; later writes do nothing and api_jbuf_take returns NULL. */
typedef struct api_jbuf {
    char *p;
    size_t len, cap;
    bool failed;
} api_jbuf;

/* Start with room for `hint` bytes (at least 64). */
void api_jbuf_init(api_jbuf *b, size_t hint);
/* A JSON string of s[n] (NULs inside allowed, written as \u0000). */
void api_jbuf_str(api_jbuf *b, const void *s, size_t n);
void api_jbuf_int(api_jbuf *b, int64_t v);
/* As api_json_uuid and api_json_time(ms, false) would be written. */
void api_jbuf_uuid(api_jbuf *b, const uint8_t id[BRK_UUID_LEN]);
void api_jbuf_time(api_jbuf *b, int64_t ms);
/* Flat objects: the buffer holds one object.  Writes '{' (first key) or
 * ',' and then "key":; api_jbuf_end closes it ("{}" when no key came). */
void api_jbuf_key(api_jbuf *b, const char *key);
void api_jbuf_end(api_jbuf *b);
/* Any value whose tree holds no real (false, buffer unchanged, for one
 * that does or nests deeper than jansson's parser allows). */
bool api_jbuf_value(api_jbuf *b, const json_t *v);
/* The text, NUL-terminated, *len without the NUL; the buffer is handed
 * over (free() it).  NULL (and freed) when the buffer failed. */
char *api_jbuf_take(api_jbuf *b, size_t *len);

/* A JSON string of the bytes p[n]; invalid UTF-8 is replaced by U+FFFD so
 * the response is always valid JSON.  NULL only on NOMEM. */
json_t *api_json_text(const void *p, size_t n);

/* "2026-11-25T13:14:02.123Z" as a JSON string; null when ms <= 0 and
 * zero_is_null. */
json_t *api_json_time(int64_t ms, bool zero_is_null);

/* Canonical lower-case UUID text. */
json_t *api_json_uuid(const uint8_t id[BRK_UUID_LEN]);

/* Set obj[key] = v, taking v's reference (also on failure).  Returns false
 * when v is NULL or the set failed, so builders can chain `ok &= ...`. */
bool api_json_put(json_t *obj, const char *key, json_t *v);

/* ---- base64 (RFC 4648 standard alphabet, with padding) ------------------- */

/* Encoded text, malloc'ed and NUL-terminated; NULL on NOMEM. */
char *api_base64_encode(const void *p, size_t n, size_t *outlen);

/* Decode s[n]: length a multiple of 4, '=' only as the final padding, no
 * whitespace, unused bits zero.  *out is malloc'ed (non-NULL even for an
 * empty input).  BRK_INVAL on bad input, BRK_NOMEM. */
brk_status api_base64_decode(const char *s, size_t n, uint8_t **out,
                             size_t *outlen);

/* ---- RFC 3339 times -------------------------------------------------------- */

#define API_TIME_LEN 24             /* "YYYY-MM-DDTHH:MM:SS.mmmZ" */

/* Parse "YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)" ('t'/'z' also
 * accepted; fraction of any length, truncated to ms) into ms since the
 * epoch (negative before 1970).  BRK_INVAL on anything else, including
 * impossible dates (Feb 30) and offsets beyond 23:59. */
brk_status api_time_parse(const char *s, size_t n, int64_t *ms);

/* Format ms since the epoch as UTC with milliseconds (years 0000..9999;
 * out of range clamps). */
void api_time_format(int64_t ms, char out[API_TIME_LEN + 1]);

#endif /* HTTP_API_CODEC_H */
