/* status.c - tables generated from BRK_STATUS_MAP; nothing else lives here. */
#include "broker/status.h"

static const char *const brk_status_msgs[] = {
#define BRK_STATUS_MSG_(name, msg) msg,
    BRK_STATUS_MAP(BRK_STATUS_MSG_)
#undef BRK_STATUS_MSG_
};

static const char *const brk_status_names[] = {
#define BRK_STATUS_NAME_(name, msg) #name,
    BRK_STATUS_MAP(BRK_STATUS_NAME_)
#undef BRK_STATUS_NAME_
};

const char *brk_strerror(brk_status st)
{
    if ((unsigned)st >= (unsigned)BRK_STATUS_COUNT_)
        return "unknown status";
    return brk_status_msgs[st];
}

const char *brk_status_name(brk_status st)
{
    if ((unsigned)st >= (unsigned)BRK_STATUS_COUNT_)
        return "UNKNOWN";
    return brk_status_names[st];
}
