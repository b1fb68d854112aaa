/*
 * kv_state: llama.cpp sequence state blob <-> KVFetcher host KV buffer (see kv_state.h for the
 * formats). Every read is bounds-checked; malformed blobs give an error, never a crash.
 */
#include "kv_state.h"

#include <stdlib.h>
#include <string.h>

size_t kvs_elem_size(int32_t ggml_type) {
    switch (ggml_type) {
    case KVS_GGML_TYPE_F32:
        return 4;
    case KVS_GGML_TYPE_F16:
    case KVS_GGML_TYPE_BF16:
        return 2;
    default:
        return 0;
    }
}

static size_t row_bytes(const kvs_geometry *g) {
    return (size_t)g->kv_heads * g->head_dim * kvs_elem_size(g->ggml_type);
}

size_t kvs_host_size(const kvs_geometry *g, uint32_t tokens) {
    return (size_t)g->n_layer * 2 * tokens * row_bytes(g);
}

size_t kvs_blob_size(const kvs_geometry *g, uint32_t tokens) {
    size_t n = 4 + 4 + 4 + 4; /* magic, seq_id, n_stream, cell_count */
    if (tokens == 0) {
        return n;
    }
    n += (size_t)tokens * 12; /* pos, n_seq_id, seq_id */
    n += 8;                   /* v_trans, n_layer */
    n += (size_t)g->n_layer * (4 + 8);
    n += g->v_trans ? (size_t)g->n_layer * (4 + 4 + 4) : (size_t)g->n_layer * (4 + 8);
    return n + kvs_host_size(g, tokens);
}

/* Offset in the host buffer of (layer, kv, token): NHD rows, K then V per layer. */
static size_t host_off(const kvs_geometry *g, uint32_t tokens, uint32_t layer, uint32_t kv,
                       uint32_t token) {
    return (((size_t)layer * 2 + kv) * tokens + token) * row_bytes(g);
}

typedef struct reader {
    const uint8_t *p;
    size_t left;
} reader;

static int rd(reader *r, void *dst, size_t n) {
    if (r->left < n) {
        return 0;
    }
    if (dst) {
        memcpy(dst, r->p, n);
    }
    r->p += n;
    r->left -= n;
    return 1;
}

typedef struct writer {
    uint8_t *p;
    size_t left;
} writer;

static int wr(writer *w, const void *src, size_t n) {
    if (w->left < n) {
        return 0;
    }
    memcpy(w->p, src, n);
    w->p += n;
    w->left -= n;
    return 1;
}

#define READ(r, x)                                                                              \
    do {                                                                                        \
        if (!rd((r), &(x), sizeof(x))) {                                                        \
            err = KVS_ERR_TRUNCATED;                                                            \
            goto out;                                                                           \
        }                                                                                       \
    } while (0)

kvs_error kvs_parse(const uint8_t *blob, size_t blob_len, kvs_geometry *g, uint32_t *tokens,
                    uint8_t *host, size_t host_len) {
    kvs_error err = KVS_OK;
    reader r = {blob, blob_len};
    uint32_t *cell_of_pos = NULL; /* position -> cell index in the blob */
    uint32_t n_stream = 0, cells = 0, found = 0;
    kvs_geometry geo = *g;

    uint32_t magic = 0;
    int32_t src_seq = 0;
    READ(&r, magic);
    if (magic != KVS_STATE_MAGIC) {
        err = KVS_ERR_MAGIC;
        goto out;
    }
    READ(&r, src_seq);
    READ(&r, n_stream);
    if (n_stream == 0) {
        err = KVS_ERR_STREAMS;
        goto out;
    }
    for (uint32_t s = 0; s < n_stream; s++) {
        uint32_t cc = 0;
        READ(&r, cc);
        if (cc == 0) {
            continue;
        }
        if (found) { /* a second non-empty stream */
            err = KVS_ERR_STREAMS;
            goto out;
        }
        found = 1;
        cells = cc;
        if (cells > blob_len / 12) {
            err = KVS_ERR_TRUNCATED;
            goto out;
        }
        cell_of_pos = malloc((size_t)cells * sizeof(uint32_t));
        if (!cell_of_pos) {
            err = KVS_ERR_NOMEM;
            goto out;
        }
        memset(cell_of_pos, 0xff, (size_t)cells * sizeof(uint32_t));
        for (uint32_t i = 0; i < cells; i++) {
            int32_t pos = 0, seq = 0;
            uint32_t n_seq = 0;
            READ(&r, pos);
            READ(&r, n_seq);
            if (n_seq != 1) {
                err = KVS_ERR_SEQ;
                goto out;
            }
            READ(&r, seq);
            if (pos < 0 || (uint32_t)pos >= cells || cell_of_pos[pos] != UINT32_MAX) {
                err = KVS_ERR_POSITIONS;
                goto out;
            }
            cell_of_pos[pos] = i;
        }
        uint32_t v_trans = 0, n_layer = 0;
        READ(&r, v_trans);
        READ(&r, n_layer);
        if (n_layer != geo.n_layer || v_trans > 1) {
            err = KVS_ERR_SHAPE;
            goto out;
        }
        geo.v_trans = v_trans;
        const size_t n_embd = (size_t)geo.kv_heads * geo.head_dim;
        /* host_len is checked against the shape once the first layer names the type */
        for (uint32_t kv = 0; kv < 2; kv++) {
            for (uint32_t l = 0; l < geo.n_layer; l++) {
                int32_t type = 0;
                READ(&r, type);
                const size_t es = kvs_elem_size(type);
                if (es == 0 || (l + kv > 0 && type != geo.ggml_type)) {
                    err = KVS_ERR_TYPE;
                    goto out;
                }
                if (l + kv == 0) {
                    geo.ggml_type = type;
                    if (host && host_len != kvs_host_size(&geo, cells)) {
                        err = KVS_ERR_BUFFER;
                        goto out;
                    }
                }
                const size_t rb = n_embd * es;
                if (kv == 0 || !v_trans) {
                    uint64_t row = 0;
                    READ(&r, row);
                    if (row != rb) {
                        err = KVS_ERR_SHAPE;
                        goto out;
                    }
                    if (r.left / rb < cells) {
                        err = KVS_ERR_TRUNCATED;
                        goto out;
                    }
                    for (uint32_t pos = 0; pos < cells && host; pos++) {
                        memcpy(host + host_off(&geo, cells, l, kv, pos),
                               r.p + (size_t)cell_of_pos[pos] * rb, rb);
                    }
                    rd(&r, NULL, (size_t)cells * rb);
                } else {
                    uint32_t el = 0, ne = 0;
                    READ(&r, el);
                    READ(&r, ne);
                    if (el != es || ne != n_embd) {
                        err = KVS_ERR_SHAPE;
                        goto out;
                    }
                    if (r.left / es / cells < n_embd) {
                        err = KVS_ERR_TRUNCATED;
                        goto out;
                    }
                    /* channel j of every cell, cells contiguous: transpose into rows */
                    for (size_t j = 0; j < n_embd && host; j++) {
                        const uint8_t *src = r.p + j * cells * es;
                        for (uint32_t pos = 0; pos < cells; pos++) {
                            memcpy(host + host_off(&geo, cells, l, 1, pos) + j * es,
                                   src + (size_t)cell_of_pos[pos] * es, es);
                        }
                    }
                    rd(&r, NULL, n_embd * cells * es);
                }
            }
        }
    }
    if (!found) {
        err = KVS_ERR_STREAMS;
        goto out;
    }
    if (r.left != 0) {
        err = KVS_ERR_TRAILING;
        goto out;
    }
    *g = geo;
    *tokens = cells;
out:
    free(cell_of_pos);
    return err;
}

#define WRITE(w, x)                                                                             \
    do {                                                                                        \
        if (!wr((w), &(x), sizeof(x))) {                                                        \
            return KVS_ERR_BUFFER;                                                              \
        }                                                                                       \
    } while (0)

kvs_error kvs_build(const kvs_geometry *g, uint32_t tokens, const uint8_t *host, size_t host_len,
                    uint8_t *blob, size_t blob_len) {
    if (kvs_elem_size(g->ggml_type) == 0) {
        return KVS_ERR_TYPE;
    }
    if (g->n_layer == 0 || g->n_layer > 4096) {
        return KVS_ERR_SHAPE;
    }
    if (host_len != kvs_host_size(g, tokens)) {
        return KVS_ERR_BUFFER;
    }
    const uint8_t *layers[4096];
    const size_t layer_len = host_len / g->n_layer;
    for (uint32_t l = 0; l < g->n_layer; l++) {
        layers[l] = host + (size_t)l * layer_len;
    }
    return kvs_build_layers(g, tokens, layers, layer_len, blob, blob_len);
}

kvs_error kvs_build_layers(const kvs_geometry *g, uint32_t tokens, const uint8_t *const *layers,
                           size_t layer_len, uint8_t *blob, size_t blob_len) {
    const size_t es = kvs_elem_size(g->ggml_type);
    if (es == 0) {
        return KVS_ERR_TYPE;
    }
    if (g->v_trans > 1 || g->n_layer == 0 || g->kv_heads == 0 || g->head_dim == 0) {
        return KVS_ERR_SHAPE;
    }
    if (layer_len != 2 * (size_t)tokens * row_bytes(g) || blob_len != kvs_blob_size(g, tokens)) {
        return KVS_ERR_BUFFER;
    }
    writer w = {blob, blob_len};
    const uint32_t one = 1, magic = KVS_STATE_MAGIC;
    const int32_t seq = 0;
    WRITE(&w, magic);
    WRITE(&w, seq);
    WRITE(&w, one); /* n_stream */
    WRITE(&w, tokens);
    if (tokens == 0) {
        return KVS_OK;
    }
    for (uint32_t i = 0; i < tokens; i++) {
        const int32_t pos = (int32_t)i;
        WRITE(&w, pos);
        WRITE(&w, one);
        WRITE(&w, seq);
    }
    WRITE(&w, g->v_trans);
    WRITE(&w, g->n_layer);
    const uint32_t n_embd = g->kv_heads * g->head_dim;
    const uint64_t rb = (uint64_t)n_embd * es;
    for (uint32_t kv = 0; kv < 2; kv++) {
        for (uint32_t l = 0; l < g->n_layer; l++) {
            WRITE(&w, g->ggml_type);
            const uint8_t *src = layers[l] + (size_t)kv * tokens * row_bytes(g);
            if (kv == 0 || !g->v_trans) {
                WRITE(&w, rb);
                if (!wr(&w, src, (size_t)tokens * rb)) {
                    return KVS_ERR_BUFFER;
                }
            } else {
                const uint32_t el = (uint32_t)es;
                WRITE(&w, el);
                WRITE(&w, n_embd);
                if (w.left < (size_t)n_embd * tokens * es) {
                    return KVS_ERR_BUFFER;
                }
                for (uint32_t j = 0; j < n_embd; j++) {
                    for (uint32_t t = 0; t < tokens; t++) {
                        memcpy(w.p, src + (size_t)t * rb + (size_t)j * es, es);
                        w.p += es;
                    }
                }
                w.left -= (size_t)n_embd * tokens * es;
            }
        }
    }
    return w.left == 0 ? KVS_OK : KVS_ERR_BUFFER;
}

kvs_error kvs_host_prefix(const kvs_geometry *g, uint32_t tokens, const uint8_t *host,
                          size_t host_len, uint32_t prefix, uint8_t *out, size_t out_len) {
    if (kvs_elem_size(g->ggml_type) == 0) {
        return KVS_ERR_TYPE;
    }
    if (prefix > tokens || host_len != kvs_host_size(g, tokens) ||
        out_len != kvs_host_size(g, prefix)) {
        return KVS_ERR_BUFFER;
    }
    const size_t n = (size_t)prefix * row_bytes(g);
    for (uint32_t t = 0; t < 2 * g->n_layer; t++) {
        memcpy(out + (size_t)t * n, host + (size_t)t * tokens * row_bytes(g), n);
    }
    return KVS_OK;
}

const char *kvs_strerror(kvs_error e) {
    switch (e) {
    case KVS_OK:
        return "ok";
    case KVS_ERR_TRUNCATED:
        return "state blob is truncated";
    case KVS_ERR_TRAILING:
        return "state blob has trailing bytes";
    case KVS_ERR_STREAMS:
        return "state blob does not hold exactly one non-empty stream";
    case KVS_ERR_SEQ:
        return "state blob has cells shared by several sequences";
    case KVS_ERR_POSITIONS:
        return "state blob positions are not 0..n-1";
    case KVS_ERR_TYPE:
        return "kv cache type is not f32, f16 or bf16";
    case KVS_ERR_SHAPE:
        return "layer count or row size differ from the model";
    case KVS_ERR_BUFFER:
        return "buffer size does not match the kv shape";
    case KVS_ERR_NOMEM:
        return "out of memory";
    case KVS_ERR_MAGIC:
        return "not a llama.cpp sequence state (wrong magic)";
    }
    return "unknown error";
}
