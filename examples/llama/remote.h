/*
 * remote: the example's use of the KVFetcher C client (include/kvfetcher.h, kvf_ functions):
 * connect to the node daemon, look a prefix up, fetch its KV into host memory, save KV.
 * Every kvf_ call of the example is in remote.c. Errors come back as a message, for the
 * engine's "falling back to prefill" log line.
 */
#ifndef KVF_LLAMA_REMOTE_H
#define KVF_LLAMA_REMOTE_H

#include <stddef.h>
#include <stdint.h>

#include "cuda_drv.h"
#include "kv_state.h"

/* A connection to the daemon. */
typedef struct remote remote;

/* A finished fetch: layers[l] points to layer l's K then V ([tokens, heads, dim] each,
 * layer_len bytes), valid until remote_fetch_free: in the daemon's buffer mapped read-only (host
 * fetch), or in a page-locked copy of the daemon's GPU buffer (GPU fetch, see remote_fetch_kv). */
typedef struct remote_fetch {
    void *handle;
    const uint8_t **layers;
    size_t layer_len;
    uint32_t tokens;
    cuda_drv *cu;     /* GPU fetch: the driver that owns staging */
    uint8_t *staging; /* GPU fetch: page-locked host copy of every layer */
} remote_fetch;

/* Connects to the daemon socket. Returns NULL with a reason in err. */
remote *remote_connect(const char *socket_path, char *err, size_t err_len);

/* Closes the connection; NULL is fine. */
void remote_close(remote *r);

/* How many leading tokens of toks[0..n) the daemon can fetch for model_id. 0 or -1 (err). */
int remote_lookup(remote *r, const char *model_id, const int32_t *toks, uint32_t n,
                  uint32_t *available, char *err, size_t err_len);

/*
 * Fetches the longest available prefix of toks[0..n) in the layout of g (the cache's type, NHD,
 * contiguous) and waits until every layer is restored; checks the shape against g.
 * cu NULL: into host memory. cu set: into the memory of GPU `gpu` over CUDA IPC; each layer is
 * then copied to page-locked host memory on cu's stream, ordered behind that layer's restore
 * (kvf_fetch_stream_wait_layer), because llama.h takes sequence state as host bytes only.
 * 0 or -1 (err; nothing to free).
 */
int remote_fetch_kv(remote *r, const char *model_id, const int32_t *toks, uint32_t n,
                    const kvs_geometry *g, cuda_drv *cu, int gpu, remote_fetch *out, char *err,
                    size_t err_len);

/* Releases a fetch's buffer in the daemon; a zeroed remote_fetch is fine. */
void remote_fetch_free(remote_fetch *f);

/* Saves the KV of toks[0..tokens) (host layout of g). 0 with *chunks stored, or -1 (err). */
int remote_save_kv(remote *r, const char *model_id, const int32_t *toks, uint32_t tokens,
                   const kvs_geometry *g, const uint8_t *host, size_t host_len, uint32_t *chunks,
                   char *err, size_t err_len);

#endif
