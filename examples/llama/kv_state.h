/*
 * kv_state: converts between llama.cpp's per-sequence state blob (llama_state_seq_get_data /
 * llama_state_seq_set_data) and KVFetcher's host KV layout.
 *
 * KVFetcher's host layout (TargetLayout { dtype, order: NHD, paging: contiguous, memory: host }):
 * for each layer in model order, K then V, each one [tokens, kv_heads, head_dim] tensor, K after
 * RoPE. llama.cpp's K cache row for one cell is exactly [kv_heads, head_dim] of K after RoPE
 * (for a llama2.c checkpoint converted without Q/K permutation, see
 * scripts/convert-stories-gguf.py), so the mapping is a copy of rows, ordered by position.
 *
 * The blob format is the one of the pinned llama.cpp (llama-cpp-python 0.3.36,
 * LLAMA_STATE_SEQ_VERSION 3; src/llama-kv-cache.cpp state_write/state_read):
 *
 *   u32 magic 0xaf143cd8, i32 seq_id  (llama-context.cpp io_magic; the source sequence)
 *   u32 n_stream                      (1: one sequence, unified cache)
 *   per stream: u32 cell_count; if cell_count > 0:
 *     per cell: i32 pos, u32 n_seq_id (= 1), i32 seq_id
 *     u32 v_trans, u32 n_layer
 *     per layer: i32 k_type, u64 k_row_bytes, cell_count rows of K
 *     v_trans == 0: per layer: i32 v_type, u64 v_row_bytes, cell_count rows of V
 *     v_trans == 1: per layer: i32 v_type, u32 v_elem_bytes, u32 n_embd_v,
 *                   then for each of the n_embd_v channels: cell_count elements
 *
 * Models with per-cell extensions (M-RoPE, PLE) or a quantized cache (llama.cpp then rotates K
 * with a Hadamard transform) are outside this mapping and rejected.
 *
 * Pure C, no llama.cpp calls: testable on its own.
 */
#ifndef KVF_LLAMA_KV_STATE_H
#define KVF_LLAMA_KV_STATE_H

#include <stddef.h>
#include <stdint.h>

/* ggml type ids (ggml.h enum ggml_type) of the cache types this mapping supports. */
#define KVS_GGML_TYPE_F32 0
#define KVS_GGML_TYPE_F16 1
#define KVS_GGML_TYPE_BF16 30

/* Why a conversion failed. Values are stable. */
typedef enum kvs_error {
    KVS_OK = 0,
    KVS_ERR_TRUNCATED = 1,    /* the blob ends early */
    KVS_ERR_TRAILING = 2,     /* bytes after the end of the state */
    KVS_ERR_STREAMS = 3,      /* not exactly one non-empty stream */
    KVS_ERR_SEQ = 4,          /* a cell shared by several sequences */
    KVS_ERR_POSITIONS = 5,    /* positions are not 0..n-1, each once */
    KVS_ERR_TYPE = 6,         /* a cache type other than f32/f16/bf16, or mixed types */
    KVS_ERR_SHAPE = 7,        /* layer count or row size differ from the model's */
    KVS_ERR_BUFFER = 8,       /* the caller's buffer has the wrong size */
    KVS_ERR_NOMEM = 9,        /* allocation failed */
    KVS_ERR_MAGIC = 10,       /* not a llama.cpp sequence state (wrong magic) */
} kvs_error;

/* The model's KV geometry and the cache's element type and V orientation. */
typedef struct kvs_geometry {
    uint32_t n_layer;
    uint32_t kv_heads;
    uint32_t head_dim;
    int32_t ggml_type; /* KVS_GGML_TYPE_* */
    uint32_t v_trans;  /* 1 when llama.cpp stores V transposed (flash attention off) */
} kvs_geometry;

/* The magic that opens every llama.cpp sequence state (src/llama-context.cpp io_magic). */
#define KVS_STATE_MAGIC 0xaf143cd8u

/* Bytes of one element of a supported ggml type, 0 for others. */
size_t kvs_elem_size(int32_t ggml_type);

/* Bytes of the KVFetcher host buffer for `tokens` tokens: n_layer * 2 * tokens * heads * dim. */
size_t kvs_host_size(const kvs_geometry *g, uint32_t tokens);

/* Bytes of the llama.cpp blob kvs_build writes for `tokens` tokens. */
size_t kvs_blob_size(const kvs_geometry *g, uint32_t tokens);

/*
 * Reads a blob from llama_state_seq_get_data. On success writes the cache's type and V
 * orientation into g->ggml_type / g->v_trans, the token count into *tokens, and (when
 * host != NULL) the KV of positions 0..tokens-1 into host (host_len must be
 * kvs_host_size(g, *tokens)); pass host = NULL first to learn the size.
 * g->n_layer, kv_heads, head_dim are inputs and are checked against the blob.
 */
kvs_error kvs_parse(const uint8_t *blob, size_t blob_len, kvs_geometry *g, uint32_t *tokens,
                    uint8_t *host, size_t host_len);

/*
 * Writes into blob (blob_len == kvs_blob_size(g, tokens)) a state for sequence 0 holding
 * positions 0..tokens-1 with the KV in host (host_len == kvs_host_size(g, tokens)), in the
 * type and V orientation given by g (they must match the context's, llama.cpp checks).
 */
kvs_error kvs_build(const kvs_geometry *g, uint32_t tokens, const uint8_t *host, size_t host_len,
                    uint8_t *blob, size_t blob_len);

/*
 * kvs_build over one pointer per layer (layers[l]: that layer's K then V, each
 * [tokens, kv_heads, head_dim], layer_len bytes == kvs_host_size(g, tokens) / n_layer), as a
 * fetch hands them out layer by layer.
 */
kvs_error kvs_build_layers(const kvs_geometry *g, uint32_t tokens, const uint8_t *const *layers,
                           size_t layer_len, uint8_t *blob, size_t blob_len);

/*
 * Copies the first `prefix` tokens of a host buffer of `tokens` tokens into out
 * (out_len == kvs_host_size(g, prefix)): the KV of a shorter prefix.
 */
kvs_error kvs_host_prefix(const kvs_geometry *g, uint32_t tokens, const uint8_t *host,
                          size_t host_len, uint32_t prefix, uint8_t *out, size_t out_len);

/* A short lowercase message for an error. */
const char *kvs_strerror(kvs_error e);

#endif
