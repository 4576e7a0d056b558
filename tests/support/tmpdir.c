/* tmpdir.c - see tmpdir.h. */
#define _XOPEN_SOURCE 700
#include "tmpdir.h"

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int brk_tmpdir_new(const char *tag, char *out, size_t cap)
{
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = "/tmp";
    int n = snprintf(out, cap, "%s/outboxd-%s-XXXXXX", base, tag);
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "brk_tmpdir_new: path for %s too long\n", tag);
        return -1;
    }
    if (!mkdtemp(out)) {
        fprintf(stderr, "brk_tmpdir_new: mkdtemp %s: %s\n", out, strerror(errno));
        return -1;
    }
    return 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag,
                        struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 ? 0 : 1;   /* non-zero stops the walk */
}

int brk_tmpdir_remove(const char *path)
{
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}
