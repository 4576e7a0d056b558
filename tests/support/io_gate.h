/*
 * io_gate.h - the POSIX disk with a gate in front of fdatasync.
 *
 * A brk_io that forwards every call to brk_io_posix(), except that sync
 * (fdatasync) waits while the gate is closed.  Tests use it to hold a SYNC
 * store's appenders inside their fdatasync for as long as they like (for
 * example to show that a server stays responsive while every request
 * thread is blocked on the disk), then open the gate and let them finish.
 * sync_dir is not gated, nor is anything else.
 *
 * Threads: every function may be called from any thread.
 */
#ifndef BROKER_TEST_IO_GATE_H
#define BROKER_TEST_IO_GATE_H

#include <pthread.h>
#include <stdbool.h>

#include "broker/io.h"

typedef struct brk_gate_io {
    brk_io io;                  /* hand &g->io to the code under test */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool closed;
    unsigned waiting;           /* syncs held at the gate now */
} brk_gate_io;

/* Starts open. */
void brk_gate_io_init(brk_gate_io *g);
void brk_gate_io_destroy(brk_gate_io *g);

void brk_gate_io_close(brk_gate_io *g);
/* Open the gate and let every held sync through. */
void brk_gate_io_open(brk_gate_io *g);

/* Wait until at least n syncs are held at the gate, up to timeout_ms;
 * true when they are. */
bool brk_gate_io_wait_held(brk_gate_io *g, unsigned n, int timeout_ms);

#endif /* BROKER_TEST_IO_GATE_H */
