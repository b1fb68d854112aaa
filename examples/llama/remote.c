/*
 * remote: every kvf_ call of the example (see remote.h). The KV moves in the layout
 * { dtype = the llama.cpp cache type, order NHD, contiguous, host memory (or GPU memory for a
 * --kv-gpu fetch) }: per layer K then V, [tokens, kv_heads, head_dim], which is llama.cpp's
 * cache row layout.
 */
#include "remote.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvfetcher.h"

struct remote {
    kvf_client *client;
};

/* "message: detail" for a kvf_ error code. */
static void kvf_reason(uint32_t code, const char *what, char *err, size_t err_len) {
    char msg[128] = "", detail[256] = "";
    kvf_error_message(code, msg, sizeof msg);
    kvf_last_error_detail(detail, sizeof detail);
    snprintf(err, err_len, "%s: %s%s%s (kvf error %u)", what, msg, detail[0] ? ": " : "", detail,
             code);
}

static int layout_of(const kvs_geometry *g, kvf_layout *l) {
    memset(l, 0, sizeof(*l));
    switch (g->ggml_type) {
    case KVS_GGML_TYPE_F16:
        l->dtype = KVF_DTYPE_F16;
        break;
    case KVS_GGML_TYPE_BF16:
        l->dtype = KVF_DTYPE_BF16;
        break;
    case KVS_GGML_TYPE_F32:
        l->dtype = KVF_DTYPE_F32;
        break;
    default:
        return -1;
    }
    l->order = KVF_ORDER_NHD;
    l->block_tokens = 0;
    l->memory = KVF_MEMORY_HOST;
    return 0;
}

/* llama_token ids are int32 and non-negative; the protocol carries them as u32. */
static uint32_t *as_u32(const int32_t *toks, uint32_t n) {
    uint32_t *u = malloc((n ? n : 1) * sizeof(uint32_t));
    for (uint32_t i = 0; u && i < n; i++) {
        u[i] = (uint32_t)toks[i];
    }
    return u;
}

remote *remote_connect(const char *socket_path, char *err, size_t err_len) {
    remote *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    uint32_t rc = (uint32_t)kvf_client_connect(socket_path, &r->client);
    if (rc != KVF_OK) {
        kvf_reason(rc, socket_path, err, err_len);
        free(r);
        return NULL;
    }
    return r;
}

void remote_close(remote *r) {
    if (r) {
        kvf_client_free(r->client);
        free(r);
    }
}

int remote_lookup(remote *r, const char *model_id, const int32_t *toks, uint32_t n,
                  uint32_t *available, char *err, size_t err_len) {
    uint32_t *u = as_u32(toks, n);
    if (!u) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    uint32_t got = 0;
    uint32_t rc = (uint32_t)kvf_client_lookup(r->client, model_id, u, n, &got);
    free(u);
    if (rc != KVF_OK) {
        kvf_reason(rc, "lookup", err, err_len);
        return -1;
    }
    *available = got;
    return 0;
}

/* Fails a fetch in progress: frees what remote_fetch_kv built so far. */
static int fetch_fail(kvf_fetch *f, remote_fetch *out) {
    if (out->cu && out->staging) {
        /* Copies may still be queued: let them finish before the buffers go away. */
        char ignored[64];
        cuda_sync(out->cu, ignored, sizeof ignored);
        cuda_host_free(out->cu, out->staging);
    }
    free(out->layers);
    kvf_fetch_free(f);
    memset(out, 0, sizeof(*out));
    return -1;
}

int remote_fetch_kv(remote *r, const char *model_id, const int32_t *toks, uint32_t n,
                    const kvs_geometry *g, cuda_drv *cu, int gpu, remote_fetch *out, char *err,
                    size_t err_len) {
    kvf_layout layout;
    kvf_fetch *f = NULL;
    kvf_shape shape;
    uint32_t tokens = 0;
    memset(out, 0, sizeof(*out));
    if (layout_of(g, &layout) != 0) {
        snprintf(err, err_len, "kv cache type %d has no kvfetcher dtype", g->ggml_type);
        return -1;
    }
    if (cu) {
        layout.memory = KVF_MEMORY_GPU;
        layout.gpu_device = (uint32_t)gpu;
    }
    uint32_t *u = as_u32(toks, n);
    if (!u) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    uint32_t rc = (uint32_t)kvf_client_fetch(r->client, model_id, u, n, &layout, &f);
    free(u);
    if (rc != KVF_OK) {
        kvf_reason(rc, "fetch", err, err_len);
        return -1;
    }
    rc = (uint32_t)kvf_fetch_shape(f, &shape);
    if (rc != KVF_OK) {
        kvf_reason(rc, "fetch shape", err, err_len);
        return fetch_fail(f, out);
    }
    if (shape.num_layers != g->n_layer || shape.kv_heads != g->kv_heads ||
        shape.head_dim != g->head_dim || shape.tokens == 0 || shape.tokens > n) {
        snprintf(err, err_len,
                 "stored kv has shape %u layers x %u tokens x %u heads x %u dims; the model needs "
                 "%u x <=%u x %u x %u",
                 shape.num_layers, shape.tokens, shape.kv_heads, shape.head_dim, g->n_layer, n,
                 g->kv_heads, g->head_dim);
        return fetch_fail(f, out);
    }
    const size_t layer_len = kvs_host_size(g, shape.tokens) / g->n_layer;
    out->layers = calloc(g->n_layer, sizeof(*out->layers));
    if (!out->layers) {
        snprintf(err, err_len, "out of memory");
        return fetch_fail(f, out);
    }
    if (cu) {
        out->cu = cu;
        out->staging = cuda_host_alloc(cu, layer_len * g->n_layer, err, err_len);
        if (!out->staging) {
            return fetch_fail(f, out);
        }
    }
    /* Layer by layer as they become ready: host, kvf_fetch_layer_ptr waits for its layer; GPU,
     * the thread waits for the daemon's announcement and the stream for the restore, then the
     * layer's copy is queued behind it (the next layer may still be arriving). */
    for (uint32_t l = 0; l < g->n_layer; l++) {
        const uint8_t *p = NULL;
        uint64_t dp = 0;
        size_t len = 0;
        if (cu) {
            rc = (uint32_t)kvf_fetch_stream_wait_layer(f, l, cuda_stream(cu));
            if (rc == KVF_OK) {
                rc = (uint32_t)kvf_fetch_layer_device_ptr(f, l, &dp, &len);
            }
        } else {
            rc = (uint32_t)kvf_fetch_layer_ptr(f, l, &p, &len);
        }
        if (rc != KVF_OK) {
            kvf_reason(rc, "fetch layer", err, err_len);
            return fetch_fail(f, out);
        }
        if (len != layer_len) {
            snprintf(err, err_len, "layer %u has %zu bytes, expected %zu", l, len, layer_len);
            return fetch_fail(f, out);
        }
        if (cu) {
            uint8_t *dst = out->staging + (size_t)l * layer_len;
            if (cuda_copy_to_host(cu, dst, dp, len, err, err_len) != 0) {
                return fetch_fail(f, out);
            }
            p = dst;
        }
        out->layers[l] = p;
    }
    if (cu && cuda_sync(cu, err, err_len) != 0) {
        return fetch_fail(f, out);
    }
    rc = (uint32_t)kvf_fetch_wait_all(f, &tokens);
    if (rc != KVF_OK || tokens != shape.tokens) {
        if (rc != KVF_OK) {
            kvf_reason(rc, "fetch", err, err_len);
        } else {
            snprintf(err, err_len, "fetch restored %u tokens of %u", tokens, shape.tokens);
        }
        return fetch_fail(f, out);
    }
    out->handle = f;
    out->layer_len = layer_len;
    out->tokens = shape.tokens;
    return 0;
}

void remote_fetch_free(remote_fetch *f) {
    kvf_fetch_free((kvf_fetch *)f->handle);
    cuda_host_free(f->cu, f->staging);
    free(f->layers);
    memset(f, 0, sizeof(*f));
}

int remote_save_kv(remote *r, const char *model_id, const int32_t *toks, uint32_t tokens,
                   const kvs_geometry *g, const uint8_t *host, size_t host_len, uint32_t *chunks,
                   char *err, size_t err_len) {
    kvf_layout layout;
    if (layout_of(g, &layout) != 0) {
        snprintf(err, err_len, "kv cache type %d has no kvfetcher dtype", g->ggml_type);
        return -1;
    }
    kvf_shape shape = {g->n_layer, tokens, g->kv_heads, g->head_dim};
    uint32_t *u = as_u32(toks, tokens);
    if (!u) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    uint32_t got = 0;
    uint32_t rc = (uint32_t)kvf_client_save(r->client, model_id, u, tokens, &layout, &shape, host,
                                            host_len, &got);
    free(u);
    if (rc != KVF_OK) {
        kvf_reason(rc, "save", err, err_len);
        return -1;
    }
    *chunks = got;
    return 0;
}
