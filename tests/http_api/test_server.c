/*
 * test_server.c - the libmicrohttpd transport (api_server_* of api.h) over
 * real sockets, the parts that never reach a request worker or a parked
 * long poll: keep-alive, the body limit (413), bearer tokens (401),
 * binding errors, the idle timeout, the raw query string, oversized
 * headers and the request metrics.  Long polls, the request workers,
 * draining and closing are in test_server_workers.c; the fixture and the
 * clients in server_fx.h.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "server_fx.h"

/* ---- keep-alive, body limit, auth, binding -------------------------------------- */

static void keep_alive_reuses_the_connection(void **state)
{
    fx *f = *state;
    server_open(f);
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 1);
    resp_free(&r);
    req(f, "GET", "/readyz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 0);
    resp_free(&r);
    create_topic(f, "t");
    assert_int_equal(connects_of(f->curl), 0);
}

static void body_far_over_the_limit_is_413_before_it_is_read(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    /* Declares 100 MB (beyond what the server reads to drop), sends 100
     * bytes: the answer comes at once. */
    int fd = raw_connect(f->port);
    const char *head = "POST /v1/topics/t/messages HTTP/1.1\r\nHost: x\r\n"
                       "Content-Type: application/json\r\n"
                       "Content-Length: 104857600\r\n\r\n";
    raw_send(fd, head, strlen(head));
    char pad[100];
    memset(pad, ' ', sizeof pad);
    raw_send(fd, pad, sizeof pad);
    char buf[4096];
    bool closed;
    int64_t t0 = now_ms();
    raw_read(fd, buf, sizeof buf, 10000, &closed);
    assert_true(now_ms() - t0 < 5000);
    assert_true(strncmp(buf, "HTTP/1.1 413", 12) == 0);
    assert_non_null(strcasestr(buf, "Content-Type: application/problem+json"));
    assert_non_null(strstr(buf, "urn:outboxd:problem:payload-too-large"));
    assert_true(closed);              /* the rest is not read: connection ends */
    close(fd);
}

/* Sends `len` bytes of body after a head that declares them. */
static void raw_post(int fd, const char *path, const char *extra_head,
                     size_t len)
{
    char head[512];
    int n = snprintf(head, sizeof head, "POST %s HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/json\r\n%s"
                     "Content-Length: %zu\r\n\r\n", path, extra_head, len);
    raw_send(fd, head, (size_t)n);
    char *body = malloc(len);
    assert_non_null(body);
    memset(body, ' ', len);
    raw_send(fd, body, len);
    free(body);
}

/* A client that does not wait for 100-continue sends its whole body: the
 * server reads it (and drops it) before answering, so the connection
 * stays usable and the client reads the 413 instead of a reset. */
static void body_over_the_limit_is_read_then_413_on_a_kept_connection(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    int fd = raw_connect(f->port);
    raw_post(fd, "/v1/topics/t/messages", "", 2048);
    assert_int_equal(raw_status(fd, 10000), 413);
    raw_request(fd, "GET", "/healthz", NULL);
    assert_int_equal(raw_status(fd, 10000), 200);
    close(fd);
}

#define BIG_BODY      (2u << 20)
#define BIG_CLIENTS   4
#define BIG_REQUESTS  200

typedef struct big_client {
    fx *f;
    const char *body;
    int not_413;                /* answers other than 413, resets included */
    long last_status;
    CURLcode last_rc;
} big_client;

static void *send_big_bodies(void *arg)
{
    big_client *b = arg;
    CURL *c = curl_easy_init();
    for (int i = 0; i < BIG_REQUESTS; i++) {
        resp r;
        req_on(b->f, c, "POST", "/v1/topics/t/messages", b->body, NULL, &r);
        if (r.status != 413 || r.rc != CURLE_OK) {
            b->not_413++;
            b->last_status = r.status;
            b->last_rc = r.rc;
        }
        resp_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

/* The known defect: answered before the body was read, MHD closed the
 * connection under a client still sending, and about one request in a
 * hundred saw a reset instead of the 413.  No Expect header (req_setup
 * sends "Expect:"), the default 1 MiB limit, 2 MiB bodies. */
static void big_bodies_without_expect_get_413_on_parallel_connections(void **state)
{
    fx *f = *state;
    server_open(f);
    char *body = malloc(BIG_BODY + 1);
    assert_non_null(body);
    memset(body, 'x', BIG_BODY);
    body[BIG_BODY] = 0;
    big_client b[BIG_CLIENTS];
    pthread_t th[BIG_CLIENTS];
    for (int i = 0; i < BIG_CLIENTS; i++) {
        b[i] = (big_client){ .f = f, .body = body };
        assert_int_equal(pthread_create(&th[i], NULL, send_big_bodies, &b[i]), 0);
    }
    int bad = 0;
    for (int i = 0; i < BIG_CLIENTS; i++) {
        pthread_join(th[i], NULL);
        bad += b[i].not_413;
        if (b[i].not_413)
            print_message("client %d: %d not 413, last: status %ld, %s\n", i,
                          b[i].not_413, b[i].last_status,
                          curl_easy_strerror(b[i].last_rc));
    }
    free(body);
    assert_int_equal(bad, 0);
}

/* A client that waits for 100-continue is answered at once and never
 * sends the body. */
static void client_expecting_100_continue_gets_413_without_sending_the_body(void **state)
{
    fx *f = *state;
    server_open(f);
    char *body = malloc(BIG_BODY + 1);
    assert_non_null(body);
    memset(body, 'x', BIG_BODY);
    body[BIG_BODY] = 0;
    resp r;
    req_setup(f, f->curl, "POST", "/v1/topics/t/messages", body, NULL, &r);
    curl_slist_free_all(r.sent);
    r.sent = curl_slist_append(NULL, "Content-Type: application/json");
    r.sent = curl_slist_append(r.sent, "Expect: 100-continue");
    curl_easy_setopt(f->curl, CURLOPT_HTTPHEADER, r.sent);
    curl_easy_setopt(f->curl, CURLOPT_EXPECT_100_TIMEOUT_MS, 30000L);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 413);
    curl_off_t up = -1;
    curl_easy_getinfo(f->curl, CURLINFO_SIZE_UPLOAD_T, &up);
    assert_int_equal(up, 0);
    resp_free(&r);
    free(body);
}

static void body_just_over_the_limit_is_413_and_at_the_limit_is_accepted(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    char body[1100];
    /* {"body":"xxx...x"} of exactly 1024 bytes */
    size_t fill = 1024 - strlen("{\"body\":\"\"}");
    strcpy(body, "{\"body\":\"");
    memset(body + 9, 'x', fill);
    strcpy(body + 9 + fill, "\"}");
    assert_int_equal(strlen(body), 1024);
    resp r;
    expect_status(f, "POST", "/v1/topics/t/messages", body, NULL, 201);
    body[1023] = ' ';
    strcpy(body + 1024, "}");                       /* 1025 bytes */
    req(f, "POST", "/v1/topics/t/messages", body, NULL, &r);
    assert_int_equal(r.status, 413);
    char ct[128];
    assert_string_equal(resp_header(&r, "Content-Type", ct, sizeof ct),
                        "application/problem+json");
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:payload-too-large");
    assert_int_equal(json_integer_value(json_object_get(r.json, "status")), 413);
    resp_free(&r);
}

typedef struct chunk_src {
    size_t left;
} chunk_src;

static size_t read_chunks(char *buf, size_t sz, size_t n, void *ud)
{
    chunk_src *s = ud;
    size_t k = sz * n < s->left ? sz * n : s->left;
    if (k > 512)
        k = 512;
    memset(buf, ' ', k);
    s->left -= k;
    return k;
}

static void chunked_body_over_the_limit_is_413(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    resp r;
    req_setup(f, f->curl, "POST", "/v1/topics/t/messages", NULL, NULL, &r);
    r.sent = curl_slist_append(r.sent, "Transfer-Encoding: chunked");
    r.sent = curl_slist_append(r.sent, "Content-Type: application/json");
    curl_easy_setopt(f->curl, CURLOPT_HTTPHEADER, r.sent);
    chunk_src src = { .left = 8 * 1024 };      /* 8 x the limit: read */
    curl_easy_setopt(f->curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(f->curl, CURLOPT_READFUNCTION, read_chunks);
    curl_easy_setopt(f->curl, CURLOPT_READDATA, &src);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 413);
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:payload-too-large");
    resp_free(&r);
}

/* A chunked body has no length to judge up front; past 16 times the limit
 * the server stops reading and closes. */
static void chunked_body_far_over_the_limit_is_cut_off(void **state)
{
    fx *f = *state;
    f->cfg.max_body_bytes = 1024;
    server_open(f);
    resp r;
    req_setup(f, f->curl, "POST", "/v1/topics/t/messages", NULL, NULL, &r);
    r.sent = curl_slist_append(r.sent, "Transfer-Encoding: chunked");
    r.sent = curl_slist_append(r.sent, "Content-Type: application/json");
    curl_easy_setopt(f->curl, CURLOPT_HTTPHEADER, r.sent);
    chunk_src src = { .left = 4u << 20 };
    curl_easy_setopt(f->curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(f->curl, CURLOPT_READFUNCTION, read_chunks);
    curl_easy_setopt(f->curl, CURLOPT_READDATA, &src);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 0);
    assert_int_not_equal(r.rc, CURLE_OK);
    assert_true(src.left > 0);                  /* not all of it was taken */
    resp_free(&r);
}

static void expect_401(fx *f, const char *auth)
{
    const char *extra[2] = { auth, NULL };
    const char *saved = f->token;
    f->token = NULL;
    resp r;
    req(f, "GET", "/v1/topics", NULL, auth ? extra : NULL, &r);
    f->token = saved;
    if (r.status != 401)
        fail_msg("with \"%s\": %ld", auth ? auth : "(none)", r.status);
    char h[64];
    assert_string_equal(resp_header(&r, "WWW-Authenticate", h, sizeof h), "Bearer");
    assert_string_equal(resp_header(&r, "Content-Type", h, sizeof h),
                        "application/problem+json");
    assert_string_equal(problem_type(&r), "urn:outboxd:problem:unauthorized");
    assert_int_equal(json_integer_value(json_object_get(r.json, "status")), 401);
    resp_free(&r);
}

static void token_is_required_and_checked(void **state)
{
    fx *f = *state;
    f->cfg.token = "s3cret-t0ken";
    server_open(f);
    expect_401(f, NULL);
    expect_401(f, "Authorization: Bearer wrong");
    expect_401(f, "Authorization: Bearer s3cret-t0ke");
    expect_401(f, "Authorization: Bearer s3cret-t0ken2");
    expect_401(f, "Authorization: Bearer ");
    expect_401(f, "Authorization: Basic czNjcmV0LXQwa2Vu");
    expect_401(f, "Authorization: s3cret-t0ken");
    resp r;
    req(f, "GET", "/v1/topics", NULL, NULL, &r);       /* f->token is sent */
    assert_int_equal(r.status, 200);
    resp_free(&r);
    const char *lower[] = { "Authorization: bearer s3cret-t0ken", NULL };
    f->token = NULL;
    expect_status(f, "GET", "/v1/topics", NULL, lower, 200);
    /* liveness and readiness stay open */
    expect_status(f, "GET", "/healthz", NULL, NULL, 200);
    expect_status(f, "GET", "/readyz", NULL, NULL, 200);
    /* a write without the token never reaches the handler */
    expect_status(f, "POST", "/v1/topics/t/messages", "{\"body\":1}", NULL, 401);
    f->token = f->cfg.token;
    expect_status(f, "GET", "/v1/topics/t", NULL, NULL, 404);
}

/* The 401 comes after the body, like the 413: the connection stays. */
static void unauthorized_post_with_a_body_gets_401_on_a_kept_connection(void **state)
{
    fx *f = *state;
    f->cfg.token = "tok";
    server_open(f);
    int fd = raw_connect(f->port);
    raw_post(fd, "/v1/topics/t/messages", "", 64 * 1024);
    assert_int_equal(raw_status(fd, 10000), 401);
    raw_request(fd, "GET", "/healthz", NULL);
    assert_int_equal(raw_status(fd, 10000), 200);
    close(fd);
}

static void bind_to_a_bad_address_is_inval(void **state)
{
    fx *f = *state;
    const char *bad[] = { "localhost", "127.0.0", "1.2.3.4.5", "::g", "0x7f000001" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        f->cfg.bind_addr = bad[i];
        f->err[0] = 0;
        assert_int_equal(server_try_open(f), BRK_INVAL);
        assert_null(f->srv);
        assert_non_null(strstr(f->err, bad[i]));
    }
}

static void bind_conflict_is_io_naming_the_address(void **state)
{
    fx *f = *state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 1), 0);
    socklen_t al = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &al);
    f->cfg.port = ntohs(a.sin_port);
    assert_int_equal(server_try_open(f), BRK_IO);
    assert_null(f->srv);
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u", (unsigned)f->cfg.port);
    if (!strstr(f->err, want) || !strstr(f->err, strerror(EADDRINUSE)))
        fail_msg("errbuf: %s", f->err);
    close(fd);
}

static void ipv6_loopback_works_when_the_host_has_it(void **state)
{
    fx *f = *state;
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    bool have = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0)
        close(fd);
    if (!have)
        skip();
    f->cfg.bind_addr = "::1";
    server_open(f);
    char url[64];
    snprintf(url, sizeof url, "http://[::1]:%u/healthz", (unsigned)f->port);
    resp r;
    req_setup(f, f->curl, "GET", "/healthz", NULL, NULL, &r);
    curl_easy_setopt(f->curl, CURLOPT_URL, url);
    req_done(f->curl, &r, curl_easy_perform(f->curl));
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void idle_connection_is_closed_after_the_idle_timeout(void **state)
{
    fx *f = *state;
    f->cfg.idle_timeout_s = 1;
    server_open(f);
    int fd = raw_connect(f->port);
    char buf[256];
    bool closed;
    int64_t t0 = now_ms();
    raw_read(fd, buf, sizeof buf, 8000, &closed);
    int64_t ms = now_ms() - t0;
    close(fd);
    assert_true(closed);
    if (ms < 700 || ms > 5000)
        fail_msg("idle connection closed after %lld ms", (long long)ms);
    /* a kept-alive connection goes the same way */
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(connects_of(f->curl), 1);
    resp_free(&r);
    sleep_ms(2500);
    req(f, "GET", "/healthz", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(connects_of(f->curl), 1);      /* a new connection */
    resp_free(&r);
}


/* ---- requests reach the handler as sent ------------------------------------------- */

static void raw_query_string_reaches_the_handler(void **state)
{
    fx *f = *state;
    server_open(f);
    expect_status(f, "GET", "/v1/transactions?state=stuck&limit=5", NULL, NULL, 200);
    expect_status(f, "GET", "/v1/transactions?state=st%75ck", NULL, NULL, 200);
    expect_status(f, "GET", "/v1/transactions?limit=0", NULL, NULL, 400);
    expect_status(f, "GET", "/v1/transactions?state=bogus", NULL, NULL, 400);
}

static void oversized_headers_are_refused_by_the_server_without_leaking(void **state)
{
    fx *f = *state;
    server_open(f);
    int fd = raw_connect(f->port);
    /* MHD answers 431 and closes once its buffer is full, possibly while
     * we still send (then the answer may be lost to the reset): what must
     * hold is that the server shrugs it off and frees the request. */
    char big[40000];
    int n = snprintf(big, sizeof big, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(big + n, 'a', sizeof big - (size_t)n - 4);
    memcpy(big + sizeof big - 4, "\r\n\r\n", 4);
    (void)send(fd, big, sizeof big, MSG_NOSIGNAL);
    char buf[1024];
    bool closed;
    size_t got = raw_read(fd, buf, sizeof buf, 5000, &closed);
    close(fd);
    assert_true(got == 0 || strncmp(buf, "HTTP/1.1 4", 10) == 0);
    assert_true(api_server_wait_idle(f->srv, 5000));
    expect_status(f, "GET", "/healthz", NULL, NULL, 200);
}

static void requests_are_counted_by_route_and_status(void **state)
{
    fx *f = *state;
    f->cfg.token = "tok";
    server_open(f);
    resp r;
    req(f, "GET", "/healthz", NULL, NULL, &r);
    resp_free(&r);
    f->token = NULL;
    req(f, "GET", "/v1/topics", NULL, NULL, &r);           /* 401 */
    assert_int_equal(r.status, 401);
    resp_free(&r);
    f->token = "tok";
    req(f, "GET", "/metrics", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    const char *want[] = {
        "outboxd_http_requests_total{route=\"/healthz\",method=\"GET\",code=\"200\"} 1",
        "outboxd_http_requests_total{route=\"unmatched\",method=\"GET\",code=\"401\"} 1",
        "outboxd_http_request_duration_seconds_count{route=\"/healthz\"} 1",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(r.body, want[i]))
            fail_msg("metrics lack %s:\n%s", want[i], r.body);
    resp_free(&r);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_ALL);
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(keep_alive_reuses_the_connection),
        T(body_far_over_the_limit_is_413_before_it_is_read),
        T(body_over_the_limit_is_read_then_413_on_a_kept_connection),
        T(big_bodies_without_expect_get_413_on_parallel_connections),
        T(client_expecting_100_continue_gets_413_without_sending_the_body),
        T(body_just_over_the_limit_is_413_and_at_the_limit_is_accepted),
        T(chunked_body_over_the_limit_is_413),
        T(chunked_body_far_over_the_limit_is_cut_off),
        T(token_is_required_and_checked),
        T(unauthorized_post_with_a_body_gets_401_on_a_kept_connection),
        T(bind_to_a_bad_address_is_inval),
        T(bind_conflict_is_io_naming_the_address),
        T(ipv6_loopback_works_when_the_host_has_it),
        T(idle_connection_is_closed_after_the_idle_timeout),
        T(raw_query_string_reaches_the_handler),
        T(oversized_headers_are_refused_by_the_server_without_leaking),
        T(requests_are_counted_by_route_and_status),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
