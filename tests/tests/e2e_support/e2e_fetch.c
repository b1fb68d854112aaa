/* e2e_fetch: fetches KV through the C client (libkvfetcher) and writes the restored buffer.
 *
 * usage: e2e_fetch SOCKET MODEL TOKENS_FILE DTYPE ORDER BLOCK_TOKENS OUT_FILE
 *   TOKENS_FILE: token ids as uint32 little-endian; DTYPE 0 f16, 1 bf16, 2 f32; ORDER 0 NHD,
 *   1 HND; BLOCK_TOKENS 0 for contiguous. Prints "tokens=N lookup=M layers=L" and writes every
 *   layer's bytes (K then V, in order: the whole buffer) to OUT_FILE. Exit status 0 on success,
 *   otherwise the kvf_error code's low byte with its message on stderr.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvfetcher.h"

static int fail(const char *what, kvf_error e) {
    char msg[256];
    char detail[512];
    kvf_error_message((uint32_t)e, msg, sizeof msg);
    kvf_last_error_detail(detail, sizeof detail);
    fprintf(stderr, "e2e_fetch: %s: %s (%u): %s\n", what, msg, (unsigned)e, detail);
    return (int)(e & 0xff) ? (int)(e & 0xff) : 1;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: e2e_fetch SOCKET MODEL TOKENS_FILE DTYPE ORDER BLOCK_TOKENS OUT_FILE\n");
        return 2;
    }
    FILE *tf = fopen(argv[3], "rb");
    if (!tf) { perror("tokens file"); return 2; }
    fseek(tf, 0, SEEK_END);
    long tbytes = ftell(tf);
    fseek(tf, 0, SEEK_SET);
    size_t n_tokens = (size_t)tbytes / 4;
    uint32_t *ids = malloc(n_tokens * 4 + 4);
    if (fread(ids, 4, n_tokens, tf) != n_tokens) { perror("read tokens"); return 2; }
    fclose(tf);

    kvf_client *client = NULL;
    kvf_error e = kvf_client_connect(argv[1], &client);
    if (e != KVF_OK) return fail("connect", e);
    uint32_t found = 0;
    e = kvf_client_lookup(client, argv[2], ids, n_tokens, &found);
    if (e != KVF_OK) return fail("lookup", e);

    kvf_layout layout = {0};
    layout.dtype = (uint32_t)atoi(argv[4]);
    layout.order = (uint32_t)atoi(argv[5]);
    layout.block_tokens = (uint32_t)atoi(argv[6]);
    layout.memory = KVF_MEMORY_HOST;
    kvf_fetch *fetch = NULL;
    e = kvf_client_fetch(client, argv[2], ids, n_tokens, &layout, &fetch);
    if (e != KVF_OK) return fail("fetch", e);
    /* Layer 0 first, as an engine would, then everything. */
    e = kvf_fetch_wait_layer(fetch, 0);
    if (e != KVF_OK) return fail("wait layer 0", e);
    uint32_t tokens = 0;
    e = kvf_fetch_wait_all(fetch, &tokens);
    if (e != KVF_OK) return fail("wait all", e);
    kvf_shape shape;
    e = kvf_fetch_shape(fetch, &shape);
    if (e != KVF_OK) return fail("shape", e);

    FILE *out = fopen(argv[7], "wb");
    if (!out) { perror("out file"); return 2; }
    for (uint32_t l = 0; l < shape.num_layers; l++) {
        const uint8_t *p = NULL;
        size_t len = 0;
        e = kvf_fetch_layer_ptr(fetch, l, &p, &len);
        if (e != KVF_OK) return fail("layer ptr", e);
        if (fwrite(p, 1, len, out) != len) { perror("write"); return 2; }
    }
    fclose(out);
    printf("tokens=%u lookup=%u layers=%u\n", tokens, found, shape.num_layers);
    kvf_fetch_free(fetch);
    kvf_client_free(client);
    free(ids);
    return 0;
}
