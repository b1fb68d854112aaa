/* Fetch a KV prefix from the local KVFetcher daemon and use it layer by layer.
 *
 *   cc fetch.c $(pkg-config --cflags --libs kvfetcher) -ldl -o fetch
 *   ./fetch [--gpu N] [--hold-ms MS] /run/kvfetcher/kvfetcher.sock MODEL TOKEN_ID...
 *
 * Host mode (default): prints the shape found, then a checksum of each layer as soon as that
 * layer is ready: an engine would start its forward pass on layer 0 while later layers still
 * arrive.
 *
 * --gpu N: fetches the same prefix twice, into host memory and into the memory of GPU N. For
 * each layer it makes a CUDA stream wait for that layer (kvf_fetch_stream_wait_layer: the
 * thread waits for the daemon's announcement, the stream for the GPU restore) and queues a copy
 * of the layer to the host on that stream, then synchronizes once and compares the copies with
 * the host fetch byte for byte. Prints "gpu verified: <layers> layers, <bytes> bytes" and exits
 * 0, or prints the first differing byte and exits 1; exits 77 when this host or daemon has no
 * GPU support. The CUDA driver is opened with dlopen at run time, so the program builds and its
 * host mode runs without one.
 *
 * --hold-ms MS: sleeps MS milliseconds after the fetch started, before waiting for any layer
 * (lets a test kill the process mid-fetch). */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvfetcher.h"

static int fail(const char *what, kvf_error e) {
    char msg[128], detail[512];
    kvf_error_message(e, msg, sizeof msg);
    kvf_last_error_detail(detail, sizeof detail);
    fprintf(stderr, "%s: %s (%u): %s\n", what, msg, (unsigned)e, detail);
    return 1;
}

static void hold(long ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The few CUDA driver entry points the GPU mode needs (types as in cuda.h, 64-bit). */
typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;
struct cuda {
    void *lib;
    CUresult (*init)(unsigned);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*primary_ctx_retain)(CUcontext *, CUdevice);
    CUresult (*primary_ctx_release)(CUdevice);
    CUresult (*ctx_set_current)(CUcontext);
    CUresult (*stream_create)(CUstream *, unsigned);
    CUresult (*stream_destroy)(CUstream);
    CUresult (*stream_synchronize)(CUstream);
    CUresult (*mem_alloc_host)(void **, size_t);
    CUresult (*mem_free_host)(void *);
    CUresult (*memcpy_dtoh_async)(void *, CUdeviceptr, size_t, CUstream);
};

static int cuda_load(struct cuda *c) {
    c->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!c->lib) return fprintf(stderr, "dlopen libcuda.so.1: %s\n", dlerror()), -1;
    const char *names[] = {"cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                           "cuDevicePrimaryCtxRelease_v2", "cuCtxSetCurrent", "cuStreamCreate",
                           "cuStreamDestroy_v2", "cuStreamSynchronize", "cuMemAllocHost_v2",
                           "cuMemFreeHost", "cuMemcpyDtoHAsync_v2"};
    void *syms[sizeof names / sizeof names[0]];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        syms[i] = dlsym(c->lib, names[i]);
        if (!syms[i]) return fprintf(stderr, "libcuda.so.1 lacks %s\n", names[i]), -1;
    }
    /* POSIX guarantees that object pointers from dlsym convert to function pointers. */
    memcpy(&c->init, &syms[0], sizeof(void *));
    memcpy(&c->device_get, &syms[1], sizeof(void *));
    memcpy(&c->primary_ctx_retain, &syms[2], sizeof(void *));
    memcpy(&c->primary_ctx_release, &syms[3], sizeof(void *));
    memcpy(&c->ctx_set_current, &syms[4], sizeof(void *));
    memcpy(&c->stream_create, &syms[5], sizeof(void *));
    memcpy(&c->stream_destroy, &syms[6], sizeof(void *));
    memcpy(&c->stream_synchronize, &syms[7], sizeof(void *));
    memcpy(&c->mem_alloc_host, &syms[8], sizeof(void *));
    memcpy(&c->mem_free_host, &syms[9], sizeof(void *));
    memcpy(&c->memcpy_dtoh_async, &syms[10], sizeof(void *));
    return 0;
}

#define CU(call)                                                              \
    do {                                                                      \
        CUresult r_ = (call);                                                 \
        if (r_ != 0) {                                                        \
            fprintf(stderr, "%s failed: CUresult %d\n", #call, (int)r_);      \
            goto out;                                                         \
        }                                                                     \
    } while (0)

/* Copies every layer of the GPU fetch `g` to the host on one stream, each copy ordered behind
 * that layer's restore, and compares with the host fetch `h`. Returns the exit status. */
static int verify_gpu(kvf_fetch *h, kvf_fetch *g, int device) {
    struct cuda cu;
    memset(&cu, 0, sizeof cu);
    int rc = 1;
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    CUstream stream = NULL;
    unsigned char *copy = NULL;
    int retained = 0;
    uint64_t base = 0;
    size_t total = 0;
    kvf_shape s;
    if (cuda_load(&cu) != 0) goto out;
    CU(cu.init(0));
    CU(cu.device_get(&dev, device));
    CU(cu.primary_ctx_retain(&ctx, dev));
    retained = 1;
    CU(cu.ctx_set_current(ctx));
    CU(cu.stream_create(&stream, 0));
    kvf_error e = kvf_fetch_device_ptr(g, &base, &total);
    if (e != KVF_OK) {
        rc = fail("device_ptr", e);
        goto out;
    }
    CU(cu.mem_alloc_host((void **)&copy, total));
    kvf_fetch_shape(g, &s);
    size_t off = 0;
    for (uint32_t l = 0; l < s.num_layers; l++) {
        uint64_t p;
        size_t n;
        e = kvf_fetch_stream_wait_layer(g, l, stream); /* announcement, then stream wait */
        if (e == KVF_OK) e = kvf_fetch_layer_device_ptr(g, l, &p, &n);
        if (e != KVF_OK) {
            rc = fail("gpu layer", e);
            goto out;
        }
        CU(cu.memcpy_dtoh_async(copy + off, (CUdeviceptr)p, n, stream));
        off += n;
    }
    CU(cu.stream_synchronize(stream));
    off = 0;
    for (uint32_t l = 0; l < s.num_layers; l++) {
        const uint8_t *p;
        size_t n;
        e = kvf_fetch_layer_ptr(h, l, &p, &n);
        if (e != KVF_OK) {
            rc = fail("host layer", e);
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            if (p[i] != copy[off + i]) {
                printf("gpu differs: layer %u byte %zu (buffer offset %zu): host %02x, gpu %02x\n",
                       l, i, off + i, p[i], copy[off + i]);
                goto out;
            }
        }
        off += n;
    }
    printf("gpu verified: %u layers, %zu bytes\n", s.num_layers, off);
    rc = 0;
out:
    if (copy) cu.mem_free_host(copy);
    if (stream) cu.stream_destroy(stream);
    if (retained) cu.primary_ctx_release(dev);
    if (cu.lib) dlclose(cu.lib);
    return rc;
}

int main(int argc, char **argv) {
    int gpu = -1;
    long hold_ms = 0;
    kvf_layout layout = {KVF_DTYPE_F16, KVF_ORDER_NHD, 16, KVF_MEMORY_HOST, 0};
    int a = 1;
    while (a + 1 < argc && strncmp(argv[a], "--", 2) == 0) {
        const char *opt = argv[a], *val = argv[a + 1];
        if (strcmp(opt, "--gpu") == 0) gpu = atoi(val);
        else if (strcmp(opt, "--hold-ms") == 0) hold_ms = atol(val);
        else if (strcmp(opt, "--block-tokens") == 0) layout.block_tokens = (uint32_t)atoi(val);
        else if (strcmp(opt, "--order") == 0)
            layout.order = strcmp(val, "hnd") == 0 ? KVF_ORDER_HND : KVF_ORDER_NHD;
        else if (strcmp(opt, "--dtype") == 0)
            layout.dtype = strcmp(val, "f32") == 0    ? KVF_DTYPE_F32
                           : strcmp(val, "bf16") == 0 ? KVF_DTYPE_BF16
                                                      : KVF_DTYPE_F16;
        else break;
        a += 2;
    }
    if (argc - a < 3) {
        fprintf(stderr,
                "usage: %s [--gpu N] [--hold-ms MS] [--dtype f16|bf16|f32] [--order nhd|hnd]\n"
                "          [--block-tokens N (0: contiguous; default 16)] SOCKET MODEL TOKEN_ID...\n",
                argv[0]);
        return 2;
    }
    const char *sock = argv[a], *model = argv[a + 1];
    size_t n = (size_t)(argc - a - 2);
    uint32_t *ids = malloc(n * sizeof *ids);
    if (!ids) return 1;
    for (size_t i = 0; i < n; i++) ids[i] = (uint32_t)strtoul(argv[a + 2 + i], NULL, 10);

    kvf_client *client = NULL;
    kvf_error e = kvf_client_connect(sock, &client);
    if (e != KVF_OK) return free(ids), fail("connect", e);

    uint32_t avail = 0;
    e = kvf_client_lookup(client, model, ids, n, &avail);
    if (e != KVF_OK) return kvf_client_free(client), free(ids), fail("lookup", e);
    printf("available: %u of %zu tokens\n", avail, n);

    kvf_fetch *fetch = NULL;
    e = kvf_client_fetch(client, model, ids, n, &layout, &fetch);
    if (e != KVF_OK) return kvf_client_free(client), free(ids), fail("fetch", e);

    if (gpu >= 0) {
        kvf_layout gl = layout;
        gl.memory = KVF_MEMORY_GPU;
        gl.gpu_device = (uint32_t)gpu;
        kvf_fetch *g = NULL;
        e = kvf_client_fetch(client, model, ids, n, &gl, &g);
        free(ids);
        int rc;
        if (e == KVF_ERR_GPU_UNSUPPORTED) {
            rc = 77;
            fail("skipped: gpu fetch", e);
        } else if (e != KVF_OK) {
            rc = fail("gpu fetch", e);
        } else {
            hold(hold_ms);
            rc = verify_gpu(fetch, g, gpu);
        }
        kvf_fetch_free(g); /* closes the CUDA IPC mapping, then releases the fetch */
        kvf_fetch_free(fetch);
        kvf_client_free(client);
        return rc;
    }
    free(ids);
    hold(hold_ms);

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
