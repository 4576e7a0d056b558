/*
 * broker/status.h - the one status list of broker_core.
 *
 * Every broker_core function that can fail returns a brk_status.  The list is
 * an X-macro so the enum, brk_strerror() and brk_status_name() can never
 * disagree.  Non-error outcomes (AGAIN, EMPTY) live here too so callers can
 * tell "nothing yet" from "something broke" without a second channel.
 *
 * Add new codes at the end: the numeric values are used in logs and tests.
 */
#ifndef BROKER_STATUS_H
#define BROKER_STATUS_H

#define BRK_STATUS_MAP(X)                                                      \
    X(OK,       "success")                                                     \
    X(AGAIN,    "not ready yet; try again later")                              \
    X(EMPTY,    "nothing to return")                                           \
    X(NOTFOUND, "no such topic, queue or message")                             \
    X(EXISTS,   "already exists")                                              \
    X(INVAL,    "invalid argument")                                            \
    X(NOMEM,    "out of memory")                                               \
    X(IO,       "I/O error")                                                   \
    X(NOSPC,    "no space left on device")                                     \
    X(FULL,     "store full: the disk budget is reached")                      \
    X(CORRUPT,  "corrupt data found before the end of the log")                \
    X(FAILED,   "store failed earlier (sticky error); reopen to recover")      \
    X(TOOBIG,   "record too large")                                            \
    X(RANGE,    "offset out of range")                                         \
    X(READONLY, "queue takes no new writes (removed by a shrink)")             \
    X(CLOSED,   "store is closing")                                            \
    X(LIMIT,    "a configured limit was reached")                              \
    X(BADREC,   "malformed record")                                            \
    X(LOCKED,   "the store directory is in use by another process")          \
    X(CONFLICT, "conflicts with the current state (e.g. commit after rollback)")

typedef enum brk_status {
#define BRK_STATUS_ENUM_(name, msg) BRK_##name,
    BRK_STATUS_MAP(BRK_STATUS_ENUM_)
#undef BRK_STATUS_ENUM_
    BRK_STATUS_COUNT_
} brk_status;

/* A static sentence describing `st`; "unknown status" for values outside the list. */
const char *brk_strerror(brk_status st);

/* The code's name without prefix ("NOTFOUND"); "UNKNOWN" outside the list. */
const char *brk_status_name(brk_status st);

#endif /* BROKER_STATUS_H */
