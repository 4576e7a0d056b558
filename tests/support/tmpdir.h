/*
 * tmpdir.h - scratch directories on the real file system for tests.
 *
 * brk_tmpdir_new makes a fresh directory under $TMPDIR (or /tmp) named
 * after `tag`; brk_tmpdir_remove deletes it with everything inside, without
 * following symbolic links.  Tests use them in setup and teardown, so the
 * directory goes whether the test passed or failed.
 */
#ifndef BROKER_TEST_TMPDIR_H
#define BROKER_TEST_TMPDIR_H

#include <stddef.h>

/* Create the directory and write its path into out[cap].  Returns 0, or -1
 * (with a message on stderr) when the path does not fit or mkdtemp fails. */
int brk_tmpdir_new(const char *tag, char *out, size_t cap);

/* Remove `path` recursively.  Returns 0, or -1 when something could not be
 * removed (the rest is still removed). */
int brk_tmpdir_remove(const char *path);

#endif /* BROKER_TEST_TMPDIR_H */
