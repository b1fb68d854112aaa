/*
 * Unit test of examples/llama/kv_state.c without llama.cpp: build -> parse round trips for both
 * V orientations and every supported type, cells stored out of position order, and malformed
 * blobs (every truncation, trailing bytes, bad counts, types, positions) giving an error.
 * Built and run under AddressSanitizer/UBSan by tests/llama/run.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_state.h"

static int failures = 0;

#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fputc('\n', stderr);                                                                \
            failures++;                                                                         \
        }                                                                                       \
    } while (0)

static uint8_t *pattern(size_t n, unsigned seed) {
    uint8_t *p = malloc(n);
    for (size_t i = 0; i < n; i++) {
        p[i] = (uint8_t)((i * 131u + seed * 7u + (i >> 8)) & 0xff);
    }
    return p;
}

static void round_trip(int32_t type, uint32_t v_trans, uint32_t tokens) {
    kvs_geometry g = {5, 4, 8, type, v_trans};
    const size_t hl = kvs_host_size(&g, tokens), bl = kvs_blob_size(&g, tokens);
    uint8_t *host = pattern(hl, tokens), *blob = malloc(bl), *back = malloc(hl ? hl : 1);
    CHECK(kvs_build(&g, tokens, host, hl, blob, bl) == KVS_OK, "build type %d vt %u", type, v_trans);
    kvs_geometry h = {5, 4, 8, -1, 7};
    uint32_t t = 0;
    kvs_error e = kvs_parse(blob, bl, &h, &t, back, hl);
    if (tokens == 0) {
        CHECK(e == KVS_ERR_STREAMS, "an empty state has no stream to read: %s", kvs_strerror(e));
    } else {
        CHECK(e == KVS_OK, "parse: %s", kvs_strerror(e));
        CHECK(t == tokens && h.ggml_type == type && h.v_trans == v_trans, "geometry back");
        CHECK(memcmp(host, back, hl) == 0, "values back (type %d vt %u)", type, v_trans);
    }
    /* every truncation is an error, never a read past the end */
    for (size_t cut = 0; cut < bl && tokens; cut++) {
        uint8_t *c = malloc(cut ? cut : 1);
        memcpy(c, blob, cut);
        kvs_geometry q = g;
        uint32_t tt;
        kvs_error ce = kvs_parse(c, cut, &q, &tt, NULL, 0);
        CHECK(ce != KVS_OK, "truncated at %zu accepted", cut);
        free(c);
    }
    if (tokens) {
        uint8_t *longer = malloc(bl + 1);
        memcpy(longer, blob, bl);
        longer[bl] = 0;
        kvs_geometry q = g;
        CHECK(kvs_parse(longer, bl + 1, &q, &t, NULL, 0) == KVS_ERR_TRAILING, "trailing byte");
        free(longer);
        /* wrong layer count for this model */
        q.n_layer = 4;
        CHECK(kvs_parse(blob, bl, &q, &t, NULL, 0) == KVS_ERR_SHAPE, "layer count");
        q = g;
        q.kv_heads = 2;
        CHECK(kvs_parse(blob, bl, &q, &t, NULL, 0) == KVS_ERR_SHAPE, "row size");
        /* wrong host buffer size */
        q = g;
        CHECK(kvs_parse(blob, bl, &q, &t, back, hl - 1) == KVS_ERR_BUFFER, "host size");
    }
    free(host);
    free(blob);
    free(back);
}

/* A blob whose cells are stored in reverse position order parses into position order. */
static void out_of_order(void) {
    kvs_geometry g = {1, 1, 2, KVS_GGML_TYPE_F32, 0};
    /* magic, seq, n_stream, cells=2, cell0 pos1, cell1 pos0, v_trans 0, n_layer 1, K, V */
    uint8_t b[256];
    size_t o = 0;
#define PUT(x)                                                                                  \
    do {                                                                                        \
        memcpy(b + o, &(x), sizeof(x));                                                         \
        o += sizeof(x);                                                                         \
    } while (0)
    uint32_t u1 = 1, u2 = 2, u0 = 0, magic = KVS_STATE_MAGIC;
    int32_t p0 = 0, p1 = 1, s0 = 0, ty = KVS_GGML_TYPE_F32;
    PUT(magic);
    PUT(s0);
    uint64_t row = 8;
    float k[4] = {10, 11, 0, 1}; /* cell0 (pos 1) = 10 11, cell1 (pos 0) = 0 1 */
    float v[4] = {20, 21, 2, 3};
    PUT(u1);
    PUT(u2);
    PUT(p1);
    PUT(u1);
    PUT(s0);
    PUT(p0);
    PUT(u1);
    PUT(s0);
    PUT(u0);
    PUT(u1);
    PUT(ty);
    PUT(row);
    PUT(k);
    PUT(ty);
    PUT(row);
    PUT(v);
    float host[8];
    uint32_t t = 0;
    kvs_error e = kvs_parse(b, o, &g, &t, (uint8_t *)host, sizeof host);
    const float want[8] = {0, 1, 10, 11, 2, 3, 20, 21};
    CHECK(e == KVS_OK && t == 2 && memcmp(host, want, sizeof want) == 0, "reordered by position: %s",
          kvs_strerror(e));
    /* duplicate position */
    memcpy(b + 16, &p0, 4);
    CHECK(kvs_parse(b, o, &g, &t, NULL, 0) == KVS_ERR_POSITIONS, "duplicate position");
    memcpy(b + 16, &p1, 4);
    /* a cell in two sequences */
    memcpy(b + 20, &u2, 4);
    CHECK(kvs_parse(b, o, &g, &t, NULL, 0) == KVS_ERR_SEQ, "shared cell");
    memcpy(b + 20, &u1, 4);
    /* not a state at all */
    memcpy(b, &u2, 4);
    CHECK(kvs_parse(b, o, &g, &t, NULL, 0) == KVS_ERR_MAGIC, "magic");
    memcpy(b, &magic, 4);
    /* a quantized cache type (q8_0 = 8) */
    int32_t q8 = 8;
    memcpy(b + 48, &q8, 4);
    CHECK(kvs_parse(b, o, &g, &t, NULL, 0) == KVS_ERR_TYPE, "quantized type");
#undef PUT
}

static void prefix_cut(void) {
    kvs_geometry g = {2, 1, 1, KVS_GGML_TYPE_F32, 0};
    /* layer0 K t0..2, layer0 V, layer1 K, layer1 V */
    float host[12] = {0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32}, out[8];
    CHECK(kvs_host_prefix(&g, 3, (uint8_t *)host, sizeof host, 2, (uint8_t *)out, sizeof out) == KVS_OK,
          "prefix");
    const float want[8] = {0, 1, 10, 11, 20, 21, 30, 31};
    CHECK(memcmp(out, want, sizeof want) == 0, "prefix values");
    CHECK(kvs_host_prefix(&g, 3, (uint8_t *)host, sizeof host, 4, (uint8_t *)out, sizeof out) ==
              KVS_ERR_BUFFER,
          "prefix longer than the buffer");
}

int main(void) {
    const int32_t types[] = {KVS_GGML_TYPE_F32, KVS_GGML_TYPE_F16, KVS_GGML_TYPE_BF16};
    for (int i = 0; i < 3; i++) {
        for (uint32_t vt = 0; vt < 2; vt++) {
            round_trip(types[i], vt, 3);
            round_trip(types[i], vt, 1);
        }
    }
    round_trip(KVS_GGML_TYPE_F16, 1, 0);
    out_of_order();
    prefix_cut();
    kvs_geometry bad = {1, 1, 1, 8, 0};
    uint8_t blob[64];
    CHECK(kvs_build(&bad, 1, blob, 2, blob, sizeof blob) == KVS_ERR_TYPE, "build rejects q8_0");
    if (failures) {
        fprintf(stderr, "test_kv_state: %d failures\n", failures);
        return 1;
    }
    printf("test_kv_state: ok\n");
    return 0;
}
