/* End-to-end test of libkvfetcher from C against the daemon's local server with an in-memory
 * backend (tests/c/run.sh starts it). Usage: test_client SOCKET REFDIR [REPLACE_SOCKET]
 * REPLACE_SOCKET is the same server with this uid in [save] replace_uids.
 * Exits 0 on success; prints the failed check otherwise. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvfetcher.h"

static int failures = 0;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                             \
        }                                                                           \
    } while (0)

#define CHECK_CODE(expr, code)                                                       \
    do {                                                                             \
        kvf_error got_ = (expr);                                                     \
        if (got_ != (code)) {                                                        \
            char d_[256];                                                            \
            kvf_last_error_detail(d_, sizeof d_);                                    \
            fprintf(stderr, "%s:%d: %s returned %u, expected %u (%s)\n", __FILE__,   \
                    __LINE__, #expr, (unsigned)got_, (unsigned)(code), d_);          \
            failures++;                                                              \
        }                                                                            \
    } while (0)

static unsigned char *read_file(const char *dir, const char *name, size_t *len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(2);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void test_error_messages(void) {
    char buf[128];
    size_t n = kvf_error_message(KVF_ERR_NOT_FOUND, buf, sizeof buf);
    CHECK(n == strlen("not found") && strcmp(buf, "not found") == 0);
    n = kvf_error_message(KVF_ERR_GPU_UNSUPPORTED, buf, 4);
    CHECK(n > 4 && strlen(buf) == 3);
    CHECK(kvf_error_message(12345, buf, sizeof buf) > 0 && strcmp(buf, "unknown error") == 0);
    CHECK(kvf_error_message(KVF_OK, NULL, 0) == 2);
    CHECK(kvf_version(buf, sizeof buf) > 0 && buf[0] >= '0' && buf[0] <= '9');
}

static void test_bad_arguments(const char *sock) {
    kvf_client *c = (kvf_client *)0x1;
    CHECK_CODE(kvf_client_connect("/nonexistent/kvf.sock", &c), KVF_ERR_CONNECT);
    CHECK(c == (kvf_client *)0x1); /* outputs untouched on failure */
    CHECK_CODE(kvf_client_connect(NULL, &c), KVF_ERR_NULL_ARGUMENT);
    CHECK_CODE(kvf_client_connect(sock, NULL), KVF_ERR_NULL_ARGUMENT);
    CHECK_CODE(kvf_client_connect("\xff\xfe", &c), KVF_ERR_INVALID_UTF8);
    uint32_t t = 77;
    CHECK_CODE(kvf_client_lookup(NULL, "m", NULL, 0, &t), KVF_ERR_NULL_ARGUMENT);
    CHECK(t == 77);
    kvf_client_free(NULL);
    kvf_fetch_free(NULL);
}

static void compare_layers(kvf_fetch *f, const unsigned char *ref, size_t ref_len) {
    kvf_shape s;
    CHECK_CODE(kvf_fetch_shape(f, &s), KVF_OK);
    size_t off = 0;
    for (uint32_t l = 0; l < s.num_layers; l++) {
        CHECK_CODE(kvf_fetch_wait_layer(f, l), KVF_OK);
        const uint8_t *p = NULL;
        size_t n = 0;
        CHECK_CODE(kvf_fetch_layer_ptr(f, l, &p, &n), KVF_OK);
        CHECK(p != NULL && off + n <= ref_len);
        if (p && off + n <= ref_len) CHECK(memcmp(p, ref + off, n) == 0);
        const uint8_t *v = NULL;
        size_t vn = 0;
        CHECK_CODE(kvf_fetch_tensor_ptr(f, l, 1, &v, &vn), KVF_OK);
        CHECK(vn * 2 == n && v == p + vn);
        off += n;
    }
    CHECK(off == ref_len);
}

/* GPU accessors on a host fetch fail with KVF_ERR_WRONG_MEMORY at once (no wait, outputs
 * untouched); the detail points at the host accessors. */
static void test_gpu_accessors_on_host_fetch(kvf_fetch *f) {
    uint64_t dp = 77;
    size_t dn = 88;
    CHECK_CODE(kvf_fetch_device_ptr(f, &dp, &dn), KVF_ERR_WRONG_MEMORY);
    char detail[256];
    CHECK(kvf_last_error_detail(detail, sizeof detail) > 0 && strstr(detail, "host memory"));
    CHECK_CODE(kvf_fetch_layer_device_ptr(f, 0, &dp, &dn), KVF_ERR_WRONG_MEMORY);
    CHECK_CODE(kvf_fetch_stream_wait_layer(f, 0, NULL), KVF_ERR_WRONG_MEMORY);
    CHECK(dp == 77 && dn == 88);
    CHECK_CODE(kvf_fetch_device_ptr(f, NULL, &dn), KVF_ERR_NULL_ARGUMENT);
    CHECK_CODE(kvf_fetch_device_ptr(NULL, &dp, &dn), KVF_ERR_NULL_ARGUMENT);
    char msg[128];
    CHECK(kvf_error_message(KVF_ERR_WRONG_MEMORY, msg, sizeof msg) > 0 && strstr(msg, "memory"));
}

/* kvf_client_save_gpu checks its arguments before touching the driver; without a driver (this
 * test host) a well-formed call is KVF_ERR_GPU_UNSUPPORTED, with one a bogus device pointer is
 * KVF_ERR_INVALID_ARGUMENT. */
static void test_save_gpu_arguments(kvf_client *c, const uint32_t *tokens) {
    kvf_shape s = {8, 4, 2, 128};
    size_t len = (size_t)8 * 2 * 4 * 2 * 128 * 2;
    kvf_layout host = {KVF_DTYPE_F16, KVF_ORDER_NHD, 0, KVF_MEMORY_HOST, 0};
    kvf_layout gpu = {KVF_DTYPE_F16, KVF_ORDER_NHD, 0, KVF_MEMORY_GPU, 0};
    uint32_t chunks = 99;
    CHECK_CODE(kvf_client_save_gpu(c, "m", tokens, 4, &host, &s, 0x1000, len, &chunks),
               KVF_ERR_INVALID_ARGUMENT);
    CHECK_CODE(kvf_client_save_gpu(c, "m", tokens, 4, &gpu, &s, 0x1000, len - 1, &chunks),
               KVF_ERR_INVALID_ARGUMENT);
    CHECK_CODE(kvf_client_save_gpu(c, "m", tokens, 3, &gpu, &s, 0x1000, len, &chunks),
               KVF_ERR_INVALID_ARGUMENT);
    CHECK_CODE(kvf_client_save_gpu(c, "m", tokens, 4, &gpu, &s, 0x1000, len, NULL),
               KVF_ERR_NULL_ARGUMENT);
    kvf_error e = kvf_client_save_gpu(c, "m", tokens, 4, &gpu, &s, 0x1000, len, &chunks);
    CHECK(e == KVF_ERR_GPU_UNSUPPORTED || e == KVF_ERR_INVALID_ARGUMENT);
    CHECK(chunks == 99);
    unsigned char one = 0;
    CHECK_CODE(kvf_client_save(c, "m", tokens, 4, &gpu, &s, &one, 1, &chunks),
               KVF_ERR_INVALID_ARGUMENT);
}

/* The harness serves 4 clients at once (server_c_harness.rs C_TEST_MAX_CLIENTS): with `held`
 * connected, the first client over the limit is refused with `busy` after its handshake, and
 * its first request must return KVF_ERR_BUSY with the daemon's reason, not a socket error. */
#define HARNESS_MAX_CLIENTS 4
static void test_busy(const char *sock, int held, const uint32_t *tokens, size_t n_tokens) {
    kvf_client *extra[HARNESS_MAX_CLIENTS + 1] = {0};
    int n = 0;
    kvf_error last = KVF_OK;
    uint32_t avail = 0;
    while (n < HARNESS_MAX_CLIENTS + 1) {
        CHECK_CODE(kvf_client_connect(sock, &extra[n]), KVF_OK);
        if (!extra[n]) break;
        last = kvf_client_lookup(extra[n++], "codelm-107m", tokens, n_tokens, &avail);
        if (last != KVF_OK) break;
    }
    CHECK_CODE(last, KVF_ERR_BUSY);
    CHECK(n + held == HARNESS_MAX_CLIENTS + 1);
    char detail[256] = "";
    CHECK(kvf_last_error_detail(detail, sizeof detail) > 0);
    CHECK(strstr(detail, "clients") != NULL);
    for (int i = 0; i < n; i++) {
        kvf_client_free(extra[i]);
    }
}

/* Fetches `n_tokens` of `model` and checks every layer against `expect`. */
static void check_fetch(kvf_client *c, const char *model, const uint32_t *tokens, uint32_t n_tokens,
                        const kvf_layout *layout, const unsigned char *expect, size_t len) {
    kvf_fetch *f = NULL;
    CHECK_CODE(kvf_client_fetch(c, model, tokens, n_tokens, layout, &f), KVF_OK);
    if (f) {
        compare_layers(f, expect, len);
        kvf_fetch_free(f);
    }
}

/* Stored chunks are write-once: saving other KV for a saved prefix keeps what was saved, and
 * KVF_SAVE_REPLACE is refused (KVF_ERR_BAD_REQUEST, "may not replace") unless the daemon's
 * [save] replace_uids lists this uid, as on the harness's replace socket, where it
 * overwrites. `saved` holds KV of `*ss` for `tokens`; a model of this process is used, so that
 * runs against one server (ASan, then valgrind) do not see each other's saves. */
static void test_save_replace(kvf_client *c, const char *replace_sock, const uint32_t *tokens,
                              const kvf_layout *layout, const kvf_shape *ss,
                              const unsigned char *saved, size_t len, size_t tensor) {
    char model[64];
    snprintf(model, sizeof model, "c-replace-%ld", (long)getpid());
    uint32_t chunks = 99;
    CHECK_CODE(kvf_client_save_with_flags(c, model, tokens, ss->tokens, layout, ss, saved, len, 0, &chunks),
               KVF_OK);
    CHECK(chunks == 1);
    check_fetch(c, model, tokens, ss->tokens, layout, saved, len);
    /* Other valid KV of the same shape: every tensor moved one place on. */
    unsigned char *other = malloc(len);
    for (size_t i = 0; i < len; i++) other[i] = saved[(i + tensor) % len];
    CHECK(memcmp(other, saved, len) != 0);
    chunks = 99;
    CHECK_CODE(kvf_client_save_with_flags(c, model, tokens, ss->tokens, layout, ss, other, len, 0, &chunks),
               KVF_OK);
    CHECK(chunks == 1);
    check_fetch(c, model, tokens, ss->tokens, layout, saved, len);

    chunks = 99;
    CHECK_CODE(kvf_client_save_with_flags(c, model, tokens, ss->tokens, layout, ss, other, len, 4, &chunks),
               KVF_ERR_INVALID_ARGUMENT);
    char detail[256] = "";
    CHECK(kvf_last_error_detail(detail, sizeof detail) > 0 && strstr(detail, "flags"));
    CHECK_CODE(kvf_client_save_with_flags(c, model, tokens, ss->tokens, layout, ss, other, len,
                                          KVF_SAVE_REPLACE, NULL),
               KVF_ERR_NULL_ARGUMENT);
    CHECK_CODE(kvf_client_save_with_flags(c, model, tokens, ss->tokens, layout, ss, other, len,
                                          KVF_SAVE_REPLACE, &chunks),
               KVF_ERR_BAD_REQUEST);
    CHECK(kvf_last_error_detail(detail, sizeof detail) > 0 && strstr(detail, "may not replace"));
    CHECK(chunks == 99);
    check_fetch(c, model, tokens, ss->tokens, layout, saved, len);

    if (replace_sock) {
        kvf_client *r = NULL;
        CHECK_CODE(kvf_client_connect(replace_sock, &r), KVF_OK);
        if (r) {
            CHECK_CODE(kvf_client_save_with_flags(r, model, tokens, ss->tokens, layout, ss, other, len,
                                                  KVF_SAVE_REPLACE, &chunks),
                       KVF_OK);
            CHECK(chunks == 1);
            kvf_client_free(r);
        }
        check_fetch(c, model, tokens, ss->tokens, layout, other, len);
    } else {
        printf("skipped: replace allowed (no REPLACE_SOCKET given)\n");
    }
    free(other);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s SOCKET REFDIR [REPLACE_SOCKET]\n", argv[0]);
        return 2;
    }
    const char *sock = argv[1], *dir = argv[2], *replace_sock = argc == 4 ? argv[3] : NULL;
    size_t tok_bytes, f16_len, bf16_len;
    uint32_t *tokens = (uint32_t *)read_file(dir, "tokens.bin", &tok_bytes);
    size_t n_tokens = tok_bytes / 4;
    unsigned char *ref_f16 = read_file(dir, "ref-f16-nhd.bin", &f16_len);
    unsigned char *ref_bf16 = read_file(dir, "ref-bf16-hnd-p16.bin", &bf16_len);

    test_error_messages();
    test_bad_arguments(sock);

    kvf_client *c = NULL;
    CHECK_CODE(kvf_client_connect(sock, &c), KVF_OK);
    if (!c) return 1;
    test_busy(sock, 1, tokens, n_tokens);

    uint32_t avail = 0;
    CHECK_CODE(kvf_client_lookup(c, "codelm-107m", tokens, n_tokens, &avail), KVF_OK);
    CHECK(avail == n_tokens);
    CHECK_CODE(kvf_client_lookup(c, "no-such-model", tokens, n_tokens, &avail), KVF_ERR_NOT_FOUND);
    char detail[256];
    CHECK(kvf_last_error_detail(detail, sizeof detail) > 0 && strstr(detail, "no-such-model"));

    /* f16, NHD, contiguous: every layer equals the reference, read while it arrives. */
    kvf_layout f16 = {KVF_DTYPE_F16, KVF_ORDER_NHD, 0, KVF_MEMORY_HOST, 0};
    kvf_fetch *f = NULL;
    CHECK_CODE(kvf_client_fetch(c, "codelm-107m", tokens, n_tokens, &f16, &f), KVF_OK);
    if (f) {
        kvf_shape s;
        CHECK_CODE(kvf_fetch_shape(f, &s), KVF_OK);
        CHECK(s.num_layers == 8 && s.tokens == n_tokens && s.kv_heads == 2 && s.head_dim == 128);
        compare_layers(f, ref_f16, f16_len);
        uint32_t done = 0;
        CHECK_CODE(kvf_fetch_wait_all(f, &done), KVF_OK);
        CHECK(done == n_tokens);
        const uint8_t *p;
        size_t n;
        CHECK_CODE(kvf_fetch_layer_ptr(f, 8, &p, &n), KVF_ERR_LAYER_OUT_OF_RANGE);
        CHECK_CODE(kvf_fetch_tensor_ptr(f, 0, 2, &p, &n), KVF_ERR_INVALID_ARGUMENT);
        test_gpu_accessors_on_host_fetch(f);
        kvf_fetch_free(f);
    }

    /* bf16, HND, paged by 16 (130 tokens: a padded last block); the fetch outlives its
     * client. */
    kvf_layout bf16 = {KVF_DTYPE_BF16, KVF_ORDER_HND, 16, KVF_MEMORY_HOST, 0};
    f = NULL;
    CHECK_CODE(kvf_client_fetch(c, "codelm-107m", tokens, n_tokens, &bf16, &f), KVF_OK);

    /* Bad layouts and GPU memory. */
    kvf_fetch *g = NULL;
    kvf_layout bad = {9, KVF_ORDER_NHD, 0, KVF_MEMORY_HOST, 0};
    CHECK_CODE(kvf_client_fetch(c, "codelm-107m", tokens, n_tokens, &bad, &g), KVF_ERR_INVALID_ARGUMENT);
    kvf_layout gpu = {KVF_DTYPE_F16, KVF_ORDER_NHD, 0, KVF_MEMORY_GPU, 0};
    CHECK_CODE(kvf_client_fetch(c, "codelm-107m", tokens, n_tokens, &gpu, &g), KVF_ERR_GPU_UNSUPPORTED);
    CHECK_CODE(kvf_client_fetch(c, "no-such-model", tokens, n_tokens, &f16, &g), KVF_ERR_NOT_FOUND);
    CHECK(g == NULL);
    test_save_gpu_arguments(c, tokens);

    /* Save the first 40 tokens (f16 NHD, built from the reference), then fetch them back. */
    const uint32_t st = 40, heads = 2, dim = 128, layers = 8;
    size_t row = (size_t)heads * dim * 2, full_t = n_tokens * row, part_t = st * row;
    unsigned char *save = malloc(layers * 2 * part_t);
    for (uint32_t i = 0; i < layers * 2; i++) memcpy(save + i * part_t, ref_f16 + i * full_t, part_t);
    kvf_shape ss = {layers, st, heads, dim};
    uint32_t chunks = 0;
    CHECK_CODE(kvf_client_save(c, "c-saved", tokens, st, &f16, &ss, save, layers * 2 * part_t, &chunks), KVF_OK);
    CHECK(chunks == 1);
    CHECK_CODE(kvf_client_save(c, "c-saved", tokens, st, &f16, &ss, save, 7, &chunks), KVF_ERR_INVALID_ARGUMENT);
    kvf_fetch *back = NULL;
    CHECK_CODE(kvf_client_fetch(c, "c-saved", tokens, n_tokens, &f16, &back), KVF_OK);
    if (back) {
        compare_layers(back, save, layers * 2 * part_t);
        kvf_fetch_free(back);
    }
    test_save_replace(c, replace_sock, tokens, &f16, &ss, save, layers * 2 * part_t, part_t);
    free(save);

    kvf_client_free(c);
    if (f) {
        compare_layers(f, ref_bf16, bf16_len);
        kvf_fetch_free(f);
    }

    free(tokens);
    free(ref_f16);
    free(ref_bf16);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_client: all checks passed\n");
    return 0;
}
