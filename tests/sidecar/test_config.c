/*
 * test_config.c - outboxd's configuration: layers, types, conflicts, output.
 *
 * Everything runs in-process through sc_config_load with argv and envp built
 * by the test (never the real environment); config files go to a scratch
 * directory (config_fx.h).  The PostgreSQL options (issue 6) and secrets
 * are in test_config_db.c.
 */
#include "config_fx.h"

/* ---- defaults and layers ---------------------------------------------------- */

static void defaults_apply_when_nothing_is_set(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, NONE), 0);
    sc_config *c = &f->cfg;
    assert_int_equal(c->command, SC_CMD_RUN);
    assert_string_equal(c->data_dir, "/var/lib/outboxd");
    assert_string_equal(c->listen, "127.0.0.1:8080");
    assert_string_equal(c->bind_host, "127.0.0.1");
    assert_int_equal(c->port, 8080);
    assert_true(c->loopback);
    assert_int_equal(c->threads, 0);
    assert_int_equal(c->max_connections, 4096);
    assert_int_equal(c->idle_timeout_ms, 60000);
    assert_int_equal(c->max_body, 1 << 20);
    assert_string_equal(c->token, "");
    assert_string_equal(c->auth_token, "");
    assert_int_equal(c->flush, SC_FLUSH_SYNC);
    assert_int_equal(c->flush_interval_ms, 500);
    assert_int_equal(c->group_commit_delay_us, 0);
    assert_int_equal(c->segment_size, 256u << 20);
    assert_int_equal(c->disk_budget, 0);
    assert_int_equal(c->retention_ms, 72LL * 3600 * 1000);
    assert_int_equal(c->max_message, 4u << 20);
    assert_true(c->auto_create_topics);
    assert_int_equal(c->default_queues, 4);
    assert_int_equal(c->check_first_ms, 6000);
    assert_int_equal(c->check_interval_ms, 60000);
    assert_int_equal(c->check_max, 15);
    assert_int_equal(c->check_on_exhausted, SC_EXHAUSTED_ROLLBACK);
    assert_int_equal(c->check_workers, 4);
    assert_int_equal(c->workers, 64);
    assert_int_equal(c->delay_max_ms, 40LL * 24 * 3600 * 1000);
    assert_int_equal(c->invisible_default_ms, 30000);
    assert_int_equal(c->default_wait_ms, 0);
    assert_int_equal(c->idempotency_window_ms, 24LL * 3600 * 1000);
    assert_int_equal(c->idempotency_max_keys, 100000);
    assert_int_equal(c->shutdown_grace_ms, 20000);
    assert_int_equal(c->log_level, 1);
    assert_string_equal(c->database_url, "");
    assert_string_equal(c->database_password_file, "");
    assert_int_equal(c->db_pool, 2);
    assert_int_equal(c->db_statement_timeout_ms, 5000);
    assert_int_equal(c->db_connect_timeout_ms, 5000);
    assert_string_equal(c->check_query, "");
    assert_false(c->relay);
    assert_int_equal(c->relay_batch, 500);
    assert_int_equal(c->relay_poll_interval_ms, 1000);
    assert_false(c->db_configured);
    assert_string_equal(sc_config_from(c, "threads"), "default");
    assert_string_equal(sc_config_from(c, "log_level"), "default");
    assert_null(sc_config_from(c, "no_such_option"));
}

static void file_beats_default(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "a.conf", "threads = 3\n");
    assert_int_equal(load(f, ARGS("--config", p), NONE), 0);
    assert_int_equal(f->cfg.threads, 3);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "file");
    assert_string_equal(f->cfg.config_file, p);
}

static void env_beats_default(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, ARGS("OUTBOXD_THREADS=5")), 0);
    assert_int_equal(f->cfg.threads, 5);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "env");
}

static void flag_beats_default(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--threads=7"), NONE), 0);
    assert_int_equal(f->cfg.threads, 7);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "flag");
}

static void env_beats_file(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "a.conf", "threads = 3\n");
    assert_int_equal(load(f, ARGS("--config", p), ARGS("OUTBOXD_THREADS=5")), 0);
    assert_int_equal(f->cfg.threads, 5);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "env");
}

static void flag_beats_file(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "a.conf", "threads = 3\n");
    assert_int_equal(load(f, ARGS("--config", p, "--threads", "7"), NONE), 0);
    assert_int_equal(f->cfg.threads, 7);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "flag");
}

static void flag_beats_env(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--threads=7"), ARGS("OUTBOXD_THREADS=5")), 0);
    assert_int_equal(f->cfg.threads, 7);
    assert_string_equal(sc_config_from(&f->cfg, "threads"), "flag");
}

static void config_file_comes_from_env_when_no_flag(void **state)
{
    fixture *f = *state;
    char env[700];
    const char *p = write_file(f, "b.conf",
                               "# a comment\n\n  flush = async  # inline\n"
                               "data_dir = \"/tmp/with # hash\"\n");
    snprintf(env, sizeof env, "OUTBOXD_CONFIG=%s", p);
    assert_int_equal(load(f, NONE, ARGS(env)), 0);
    assert_int_equal(f->cfg.flush, SC_FLUSH_ASYNC);
    assert_string_equal(f->cfg.data_dir, "/tmp/with # hash");
    assert_string_equal(sc_config_from(&f->cfg, "flush"), "file");
}

static void every_type_parses_its_units(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--max-body=2k", "--segment-size", "1GiB",
                                  "--disk-budget=512MiB", "--max-message=100B",
                                  "--retention=2d", "--idempotency-window=90m",
                                  "--flush-interval=250ms", "--check-first=0",
                                  "--auto-create-topics", "false",
                                  "--check-on-exhausted=hold",
                                  "--log-level=debug", "--listen=[::1]:0"),
                          NONE), 0);
    sc_config *c = &f->cfg;
    assert_int_equal(c->max_body, 2048);
    assert_int_equal(c->segment_size, 1ULL << 30);
    assert_int_equal(c->disk_budget, 512ULL << 20);
    assert_int_equal(c->max_message, 100);
    assert_int_equal(c->retention_ms, 2LL * 86400000);
    assert_int_equal(c->idempotency_window_ms, 90LL * 60000);
    assert_int_equal(c->flush_interval_ms, 250);
    assert_int_equal(c->check_first_ms, 0);
    assert_false(c->auto_create_topics);
    assert_int_equal(c->check_on_exhausted, SC_EXHAUSTED_HOLD);
    assert_int_equal(c->log_level, 0);
    assert_string_equal(c->bind_host, "::1");
    assert_int_equal(c->port, 0);
    assert_true(c->loopback);
}

static void bare_bool_flag_means_true(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--auto-create-topics", "run"),
                          ARGS("OUTBOXD_AUTO_CREATE_TOPICS=no")), 0);
    assert_true(f->cfg.auto_create_topics);
    assert_int_equal(f->cfg.command, SC_CMD_RUN);
}

/* ---- malformed values -------------------------------------------------------- */

static void bad_size_unit_is_78(void **state)
{
    expect_78(*state, ARGS("--max-body=1MB"), NONE,
              "outboxd: config: flag --max-body: max_body: bad size \"1MB\"", NULL);
}

static void negative_uint_is_78(void **state)
{
    expect_78(*state, NONE, ARGS("OUTBOXD_THREADS=-1"),
              "outboxd: config: env OUTBOXD_THREADS: threads: must not be negative",
              NULL);
}

static void uint_overflow_is_78(void **state)
{
    expect_78(*state, ARGS("--idempotency-max-keys=99999999999999999999999"),
              NONE, "outboxd: config: flag --idempotency-max-keys: "
              "idempotency_max_keys: number too large", NULL);
}

static void size_overflow_is_78(void **state)
{
    expect_78(*state, ARGS("--disk-budget=17179869184GiB"), NONE,
              "outboxd: config: flag --disk-budget: disk_budget: size too large",
              NULL);
}

static void bad_duration_is_78(void **state)
{
    expect_78(*state, ARGS("--retention=3w"), NONE,
              "outboxd: config: flag --retention: retention: bad duration \"3w\"",
              NULL);
}

static void duration_without_unit_is_78(void **state)
{
    expect_78(*state, ARGS("--shutdown-grace=20"), NONE,
              "outboxd: config: flag --shutdown-grace: shutdown_grace: bad "
              "duration \"20\"", NULL);
}

static void bad_bool_is_78(void **state)
{
    expect_78(*state, NONE, ARGS("OUTBOXD_AUTO_CREATE_TOPICS=maybe"),
              "outboxd: config: env OUTBOXD_AUTO_CREATE_TOPICS: "
              "auto_create_topics: bad boolean \"maybe\"", NULL);
}

static void bad_enum_is_78(void **state)
{
    expect_78(*state, ARGS("--flush=sometimes"), NONE,
              "outboxd: config: flag --flush: flush: bad value \"sometimes\" "
              "(one of: sync, async)", NULL);
}

static void port_out_of_range_is_78(void **state)
{
    expect_78(*state, ARGS("--listen=127.0.0.1:70000"), NONE,
              "outboxd: config: flag --listen: listen: port 70000 out of range",
              NULL);
}

static void listen_without_port_is_78(void **state)
{
    expect_78(*state, ARGS("--listen=127.0.0.1"), NONE,
              "outboxd: config: flag --listen: listen: missing port", NULL);
}

static void ipv6_without_brackets_is_78(void **state)
{
    expect_78(*state, ARGS("--listen=::1:8080"), NONE,
              "outboxd: config: flag --listen: listen: IPv6 addresses need "
              "brackets", NULL);
}

static void listen_hostname_is_78(void **state)
{
    expect_78(*state, ARGS("--listen=example.org:80"), NONE,
              "outboxd: config: flag --listen: listen: bad host", NULL);
}

static void out_of_range_uint_is_78(void **state)
{
    expect_78(*state, ARGS("--default-queues=0"), NONE,
              "outboxd: config: flag --default-queues: default_queues: out of "
              "range: must be between 1 and 1024", NULL);
    expect_78(*state, ARGS("--default-queues=1025"), NONE,
              "outboxd: config: flag --default-queues: default_queues: out of "
              "range", NULL);
}

static void max_message_over_64MiB_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--max-message=65MiB"), NONE,
              "outboxd: config: flag --max-message: max_message: out of range: "
              "must be between 1B and 64MiB", NULL);
    assert_int_equal(load(f, ARGS("--max-message=64MiB"), NONE), 0);
}

static void bad_value_in_file_names_file_and_line(void **state)
{
    fixture *f = *state;
    char prefix[700];
    const char *p = write_file(f, "c.conf", "threads = 2\n\nthreads = two\n");
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:3: threads: not a number",
             p);
    expect_78(f, ARGS("--config", p), NONE, prefix, NULL);
}

static void unknown_key_in_file_names_file_and_line(void **state)
{
    fixture *f = *state;
    char prefix[700];
    const char *p = write_file(f, "d.conf", "# x\nthreads = 2\nthredas = 3\n");
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:3: thredas: unknown "
             "option", p);
    expect_78(f, ARGS("--config", p), NONE, prefix, NULL);
}

static void line_without_equals_is_78(void **state)
{
    fixture *f = *state;
    char prefix[700];
    const char *p = write_file(f, "e.conf", "threads 2\n");
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:1: expected", p);
    expect_78(f, ARGS("--config", p), NONE, prefix, NULL);
}

static void missing_config_file_is_78(void **state)
{
    expect_78(*state, ARGS("--config=/nonexistent/outboxd.conf"), NONE,
              "outboxd: config: /nonexistent/outboxd.conf: cannot open", NULL);
}

static void a_lower_layer_error_is_reported_even_if_overridden(void **state)
{
    /* Each layer is checked as applied: a broken env value is an error
     * although a flag would replace it. */
    expect_78(*state, ARGS("--threads=2"), ARGS("OUTBOXD_THREADS=x"),
              "outboxd: config: env OUTBOXD_THREADS: threads: not a number", NULL);
}

static void missing_value_after_flag_is_64(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--threads"), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: option --threads needs a value "
                        "(--threads=VALUE)");
    assert_int_equal(load(f, ARGS("--listen", "--threads=1"), NONE), EX_USAGE);
    assert_prefix(f->err, "outboxd: option --listen needs a value");
}

static void unknown_flag_is_64(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--thredas=2"), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: unknown option --thredas (see "
                        "outboxd --help)");
    assert_int_equal(load(f, ARGS("-x"), NONE), EX_USAGE);
}

static void unknown_command_is_64(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("serve"), NONE), EX_USAGE);
    assert_string_equal(f->err, "outboxd: unknown command \"serve\" (commands: "
                        "run, config, db)");
    assert_int_equal(load(f, ARGS("run", "config"), NONE), EX_USAGE);
}

static void help_and_version_answer_before_any_check(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--help"), ARGS("OUTBOXD_THREADS=x")), 0);
    assert_int_equal(f->cfg.command, SC_CMD_HELP);
    assert_int_equal(load(f, ARGS("config", "--version"), NONE), 0);
    assert_int_equal(f->cfg.command, SC_CMD_VERSION);
    assert_int_equal(load(f, ARGS("config"), NONE), 0);
    assert_int_equal(f->cfg.command, SC_CMD_CONFIG);
}

/* Malformed numbers of every kind, from every layer that does not trim. */
static void malformed_numbers_are_78(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {
        "--shutdown-grace=1.5s", "--max-body=0x10", "--threads=0x10",
        "--max-body=99999999999999999999GiB", "--disk-budget=18446744073709551615T",
        "--retention=99999999999999999999d", "--threads=-1", "--max-body=-1KiB",
        "--threads= 4", "--threads=4 ", "--max-body= 2KiB", "--max-body=2048 ",
        "--shutdown-grace=0 ", "--shutdown-grace=5s ", "--max-body=2  KiB",
        "--threads=", "--max-body=", "--retention=", "--threads=+5",
        "--listen=127.0.0.1:65536", "--listen=127.0.0.1:-1",
        "--listen=127.0.0.1: 80", "--listen=[::1]", "--listen=[::1]80",
        "--listen=[::1]:", "--listen=[127.0.0.1]:80", "--listen=[fe80::1%lo]:80",
        "--listen=:80", "--listen=", "--workers=0", "--workers=4097", NULL
    };
    for (size_t i = 0; bad[i]; i++) {
        int rc = load(f, ARGS(bad[i]), NONE);
        if (rc != EX_CONFIG)
            fail_msg("%s: exit %d, want 78 (%s)", bad[i], rc, f->err);
        assert_prefix(f->err, "outboxd: config: flag --");
    }
}

static void ipv6_literals_parse_and_only_the_loopback_one_needs_no_token(
    void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--listen=[::1]:65535"), NONE), 0);
    assert_string_equal(f->cfg.bind_host, "::1");
    assert_int_equal(f->cfg.port, 65535);
    assert_true(f->cfg.loopback);
    assert_int_equal(load(f, ARGS("--listen=[0:0:0:0:0:0:0:1]:1"), NONE), 0);
    assert_true(f->cfg.loopback);
    expect_78(f, ARGS("--listen=[::]:8080"), NONE,
              "outboxd: config: flag --listen: listen: [::]:8080 is not a "
              "loopback address", NULL);
    assert_int_equal(load(f, ARGS("--listen=[2001:db8::1]:80"),
                          ARGS("OUTBOXD_TOKEN=0123456789abcdef")), 0);
    assert_string_equal(f->cfg.bind_host, "2001:db8::1");
    assert_false(f->cfg.loopback);
}

static void a_space_between_number_and_unit_is_allowed(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--max-body=2 KiB", "--shutdown-grace=3 s"),
                          NONE), 0);
    assert_int_equal(f->cfg.max_body, 2048);
    assert_int_equal(f->cfg.shutdown_grace_ms, 3000);
}

static void crlf_line_endings_are_accepted(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "crlf.conf", "# windows\r\nthreads = 3\r\n"
                               "data_dir = \"/tmp/a b\"\r\n\r\nflush=async\r\n");
    assert_int_equal(load(f, ARGS("--config", p), NONE), 0);
    assert_int_equal(f->cfg.threads, 3);
    assert_string_equal(f->cfg.data_dir, "/tmp/a b");
    assert_int_equal(f->cfg.flush, SC_FLUSH_ASYNC);
}

/* A NUL would silently cut the value short (a token, a path). */
static void nul_byte_in_config_file_is_78(void **state)
{
    fixture *f = *state;
    char path[600], prefix[700];
    snprintf(path, sizeof path, "%s/nul.conf", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fwrite("threads = 2\nthreads = 3\0 junk\n", 1, 30, fp);
    fclose(fp);
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:2: NUL byte", path);
    expect_78(f, ARGS("--config", path), NONE, prefix, NULL);
}

/* A file without newlines (a binary, /dev/zero) must not be read into
 * memory whole: lines are bounded, comments too. */
static void config_line_over_64KiB_is_78(void **state)
{
    fixture *f = *state;
    char path[600], prefix[700];
    snprintf(path, sizeof path, "%s/long.conf", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("threads = 2\n#", fp);
    for (int i = 0; i < 8 << 20; i++)
        fputc('x', fp);
    fputs("\nthreads = 3\n", fp);
    fclose(fp);
    snprintf(prefix, sizeof prefix, "outboxd: config: %s:2: line longer than "
             "65536 bytes", path);
    expect_78(f, ARGS("--config", path), NONE, prefix, NULL);
}

static void config_file_that_is_a_directory_is_78_and_says_why(void **state)
{
    fixture *f = *state;
    char prefix[700];
    snprintf(prefix, sizeof prefix, "outboxd: config: %s: cannot read: ", f->dir);
    expect_78(f, ARGS("--config", f->dir), NONE, prefix, "Is a directory");
}

/* ---- conflicting values ------------------------------------------------------- */

static void token_and_token_file_together_is_78(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "tok", "0123456789abcdef\n");
    char arg[700];
    snprintf(arg, sizeof arg, "--token-file=%s", p);
    expect_78(f, ARGS(arg), ARGS("OUTBOXD_TOKEN=0123456789abcdefXYZ"),
              "outboxd: config: flag --token-file: token_file: token and "
              "token_file are both set", NULL);
}

static void non_loopback_listen_without_token_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--listen=0.0.0.0:8080"), NONE,
              "outboxd: config: flag --listen: listen: 0.0.0.0:8080 is not a "
              "loopback address", "token");
    assert_int_equal(load(f, ARGS("--listen=0.0.0.0:8080"),
                          ARGS("OUTBOXD_TOKEN=0123456789abcdef")), 0);
    assert_false(f->cfg.loopback);
    assert_string_equal(f->cfg.auth_token, "0123456789abcdef");
    assert_int_equal(load(f, ARGS("--listen=127.3.4.5:1"), NONE), 0);
    assert_true(f->cfg.loopback);
}

static void short_token_is_78(void **state)
{
    expect_78(*state, NONE, ARGS("OUTBOXD_TOKEN=short"),
              "outboxd: config: env OUTBOXD_TOKEN: token: token too short "
              "(5 bytes; at least 16)", NULL);
}

static void token_file_strips_trailing_newline(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "tok", "0123456789abcdefgh\r\n");
    char arg[700];
    snprintf(arg, sizeof arg, "--token-file=%s", p);
    assert_int_equal(load(f, ARGS(arg, "--listen=0.0.0.0:0"), NONE), 0);
    assert_string_equal(f->cfg.auth_token, "0123456789abcdefgh");
    assert_string_equal(f->cfg.token, "");
}

static void short_token_in_file_is_78(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "tok", "abc\n");
    char arg[700];
    snprintf(arg, sizeof arg, "--token-file=%s", p);
    expect_78(f, ARGS(arg), NONE, "outboxd: config: flag --token-file: "
              "token_file: the token in the file is too short", NULL);
}

static void unreadable_token_file_is_78(void **state)
{
    expect_78(*state, ARGS("--token-file=/nonexistent/token"), NONE,
              "outboxd: config: flag --token-file: token_file: cannot read "
              "/nonexistent/token", NULL);
}

/* SC_TOKEN_MAX bytes of token plus the newline an editor adds. */
static void token_file_with_a_1024_byte_token_and_a_newline_loads(void **state)
{
    fixture *f = *state;
    char tok[SC_TOKEN_MAX + 3], arg[700];
    memset(tok, 'k', SC_TOKEN_MAX);
    memcpy(tok + SC_TOKEN_MAX, "\r\n", 3);
    const char *p = write_file(f, "tok", tok);
    snprintf(arg, sizeof arg, "--token-file=%s", p);
    assert_int_equal(load(f, ARGS(arg), NONE), 0);
    assert_int_equal(strlen(f->cfg.auth_token), SC_TOKEN_MAX);
    tok[SC_TOKEN_MAX] = 'k';             /* 1025 bytes: too long */
    tok[SC_TOKEN_MAX + 1] = '\0';
    p = write_file(f, "tok", tok);
    expect_78(f, ARGS(arg), NONE, "outboxd: config: flag --token-file: "
              "token_file: ", "at most 1024");
}

/* Errors about a secret never echo it. */
static void token_errors_never_echo_the_token(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "tok", "s3cr3t s3cr3t s3cr3t\n");
    char arg[700];
    snprintf(arg, sizeof arg, "--token-file=%s", p);
    assert_int_equal(load(f, ARGS(arg), NONE), EX_CONFIG);
    assert_null(strstr(f->err, "s3cr3t"));
    assert_int_equal(load(f, ARGS("--token=s3cr3t\x01s3cr3t-s3cr3t"), NONE),
                     EX_CONFIG);
    assert_null(strstr(f->err, "s3cr3t"));
    assert_int_equal(load(f, NONE, ARGS("OUTBOXD_TOKEN=s3cr3t")), EX_CONFIG);
    assert_null(strstr(f->err, "s3cr3t"));
    const char *c = write_file(f, "t.conf", "token = \"s3cr3t-s3cr3t-s3cr3t\n");
    assert_int_equal(load(f, ARGS("--config", c), NONE), EX_CONFIG);
    assert_null(strstr(f->err, "s3cr3t"));
}

static void idempotency_window_over_retention_is_78(void **state)
{
    fixture *f = *state;
    expect_78(f, ARGS("--retention=1h"), NONE,
              "outboxd: config: flag --retention: retention: "
              "idempotency_window (1d) exceeds retention (1h)", NULL);
    assert_int_equal(load(f, ARGS("--retention=1h", "--idempotency-window=1h"),
                          NONE), 0);
}

/* ---- output ---------------------------------------------------------------------- */

static void config_output_masks_secrets(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, NONE, ARGS("OUTBOXD_TOKEN=s3cr3t-s3cr3t-s3cr3t")), 0);
    assert_printed_without(&f->cfg, "\ntoken = ********  # from env\n", "s3cr3t");
}

static void config_output_has_one_line_per_option_with_its_source(void **state)
{
    fixture *f = *state;
    const char *p = write_file(f, "g.conf", "flush = async\nthreads = 2\n");
    assert_int_equal(load(f, ARGS("--config", p, "--threads=3", "config"),
                          ARGS("OUTBOXD_LOG_LEVEL=warn")), 0);
    char *out = print_config(&f->cfg);
    size_t lines = 0;
    for (const char *s = out; *s; s++)
        lines += *s == '\n';
    assert_int_equal(lines, SC_OPT_COUNT);
    assert_prefix(out, "data_dir = /var/lib/outboxd  # from default\n");
    assert_non_null(strstr(out, "\nflush = async  # from file\n"));
    assert_non_null(strstr(out, "\nthreads = 3  # from flag\n"));
    assert_non_null(strstr(out, "\nlog_level = warn  # from env\n"));
    assert_non_null(strstr(out, "\nretention = 3d  # from default\n"));
    assert_non_null(strstr(out, "\nmax_body = 1MiB  # from default\n"));
    assert_non_null(strstr(out, "\ntoken = \"\"  # from default\n"));
    free(out);
}

/* The output without its "# from" comments. */
static char *values_only(char *out)
{
    char *w = out;
    for (char *r = out; *r;) {
        char *nl = strchr(r, '\n');
        char *hash = strstr(r, "  # from ");
        size_t n = (size_t)((hash && hash < nl ? hash : nl) - r);
        memmove(w, r, n);
        w += n;
        *w++ = '\n';
        r = nl + 1;
    }
    *w = '\0';
    return out;
}

static void config_output_loads_back_to_the_same_values(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--flush-interval=1500ms", "--disk-budget=3000",
                                  "--default-wait=2s", "--data-dir=/x y"),
                          NONE), 0);
    char *first = print_config(&f->cfg);
    const char *p = write_file(f, "h.conf", first);
    assert_int_equal(load(f, ARGS("--config", p), NONE), 0);
    assert_int_equal(f->cfg.flush_interval_ms, 1500);
    assert_int_equal(f->cfg.disk_budget, 3000);
    assert_int_equal(f->cfg.default_wait_ms, 2000);
    assert_string_equal(f->cfg.data_dir, "/x y");
    char *second = print_config(&f->cfg);
    assert_string_equal(values_only(first), values_only(second));
    free(first);
    free(second);
}

/* A value that the file syntax would cut ('#' after a space) or trim is
 * printed quoted, so `outboxd config` loads back. */
static void config_output_quotes_values_that_need_it(void **state)
{
    fixture *f = *state;
    assert_int_equal(load(f, ARGS("--data-dir=/d #1 "), NONE), 0);
    char *first = print_config(&f->cfg);
    assert_non_null(strstr(first, "data_dir = \"/d #1 \"  # from flag\n"));
    const char *p = write_file(f, "q.conf", first);
    assert_int_equal(load(f, ARGS("--config", p), NONE), 0);
    assert_string_equal(f->cfg.data_dir, "/d #1 ");
    free(first);
}

static void usage_lists_every_option_with_env_and_default(void **state)
{
    (void)state;
    char *buf = usage_text();
    assert_non_null(strstr(buf, "--data-dir=PATH  (OUTBOXD_DATA_DIR, default "
                                "/var/lib/outboxd)"));
    assert_non_null(strstr(buf, "--flush=sync|async  (OUTBOXD_FLUSH, default sync)"));
    assert_non_null(strstr(buf, "--idempotency-window=DURATION  "
                                "(OUTBOXD_IDEMPOTENCY_WINDOW, default 24h)"));
    assert_non_null(strstr(buf, "--token=TOKEN  (OUTBOXD_TOKEN, default none)"));
    size_t opts = 0;
    for (const char *s = buf; (s = strstr(s, "\n  --")) != NULL; s++)
        opts++;
    assert_int_equal(opts, SC_OPT_COUNT + 1);   /* + --config */
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(defaults_apply_when_nothing_is_set),
        T(file_beats_default),
        T(env_beats_default),
        T(flag_beats_default),
        T(env_beats_file),
        T(flag_beats_file),
        T(flag_beats_env),
        T(config_file_comes_from_env_when_no_flag),
        T(every_type_parses_its_units),
        T(bare_bool_flag_means_true),
        T(bad_size_unit_is_78),
        T(negative_uint_is_78),
        T(uint_overflow_is_78),
        T(size_overflow_is_78),
        T(bad_duration_is_78),
        T(duration_without_unit_is_78),
        T(bad_bool_is_78),
        T(bad_enum_is_78),
        T(port_out_of_range_is_78),
        T(listen_without_port_is_78),
        T(ipv6_without_brackets_is_78),
        T(listen_hostname_is_78),
        T(out_of_range_uint_is_78),
        T(max_message_over_64MiB_is_78),
        T(bad_value_in_file_names_file_and_line),
        T(unknown_key_in_file_names_file_and_line),
        T(line_without_equals_is_78),
        T(missing_config_file_is_78),
        T(a_lower_layer_error_is_reported_even_if_overridden),
        T(missing_value_after_flag_is_64),
        T(unknown_flag_is_64),
        T(unknown_command_is_64),
        T(help_and_version_answer_before_any_check),
        T(token_and_token_file_together_is_78),
        T(non_loopback_listen_without_token_is_78),
        T(short_token_is_78),
        T(token_file_strips_trailing_newline),
        T(short_token_in_file_is_78),
        T(unreadable_token_file_is_78),
        T(malformed_numbers_are_78),
        T(ipv6_literals_parse_and_only_the_loopback_one_needs_no_token),
        T(a_space_between_number_and_unit_is_allowed),
        T(crlf_line_endings_are_accepted),
        T(nul_byte_in_config_file_is_78),
        T(config_line_over_64KiB_is_78),
        T(config_file_that_is_a_directory_is_78_and_says_why),
        T(token_file_with_a_1024_byte_token_and_a_newline_loads),
        T(token_errors_never_echo_the_token),
        T(idempotency_window_over_retention_is_78),
        T(config_output_masks_secrets),
        T(config_output_has_one_line_per_option_with_its_source),
        T(config_output_loads_back_to_the_same_values),
        T(config_output_quotes_values_that_need_it),
        T(usage_lists_every_option_with_env_and_default),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
