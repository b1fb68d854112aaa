/* Fetch a KV prefix from the local KVFetcher daemon and use it layer by layer.
 *
 *   cc fetch.c $(pkg-config --cflags --libs kvfetcher) -o fetch
 *   ./fetch /run/kvfetcher/kvfetcher.sock MODEL TOKEN_ID...
 *
 * Prints the shape found, then a checksum of each layer as soon as that layer is ready: an
 * engine would start its forward pass on layer 0 while later layers still arrive. */
#include <stdio.h>
#include <stdlib.h>

#include "kvfetcher.h"

static int fail(const char *what, kvf_error e) {
    char msg[128], detail[512];
    kvf_error_message(e, msg, sizeof msg);
    kvf_last_error_detail(detail, sizeof detail);
    fprintf(stderr, "%s: %s (%u): %s\n", what, msg, (unsigned)e, detail);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET MODEL TOKEN_ID...\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)(argc - 3);
    uint32_t *ids = malloc(n * sizeof *ids);
    if (!ids) return 1;
    for (size_t i = 0; i < n; i++) ids[i] = (uint32_t)strtoul(argv[3 + i], NULL, 10);

    kvf_client *client = NULL;
    kvf_error e = kvf_client_connect(argv[1], &client);
    if (e != KVF_OK) return free(ids), fail("connect", e);

    uint32_t avail = 0;
    e = kvf_client_lookup(client, argv[2], ids, n, &avail);
    if (e != KVF_OK) return kvf_client_free(client), free(ids), fail("lookup", e);
    printf("available: %u of %zu tokens\n", avail, n);

    kvf_layout layout = {KVF_DTYPE_F16, KVF_ORDER_NHD, 16, KVF_MEMORY_HOST, 0};
    kvf_fetch *fetch = NULL;
    e = kvf_client_fetch(client, argv[2], ids, n, &layout, &fetch);
    free(ids);
    if (e != KVF_OK) return kvf_client_free(client), fail("fetch", e);

    kvf_shape s;
    kvf_fetch_shape(fetch, &s);
    printf("shape: %u layers, %u tokens, %u kv heads, head_dim %u\n", s.num_layers, s.tokens,
           s.kv_heads, s.head_dim);
    for (uint32_t l = 0; l < s.num_layers; l++) {
        const uint8_t *p;
        size_t len;
        e = kvf_fetch_layer_ptr(fetch, l, &p, &len); /* waits for layer l */
        if (e != KVF_OK) break;
        uint64_t sum = 0;
        for (size_t i = 0; i < len; i++) sum = sum * 31 + p[i];
        printf("layer %u: %zu bytes, checksum %016llx\n", l, len, (unsigned long long)sum);
    }
    kvf_fetch_free(fetch);   /* releases the fetch in the daemon */
    kvf_client_free(client);
    return e == KVF_OK ? 0 : fail("layer", e);
}
