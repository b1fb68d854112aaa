/*
 * cuda_drv: CUDA driver entry points through dlopen (see cuda_drv.h). Types as in cuda.h on
 * 64-bit Linux; only the handful of calls below, so no CUDA headers are needed to build.
 */
#define _POSIX_C_SOURCE 200809L
#include "cuda_drv.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;

struct cuda_drv {
    void *lib;
    CUdevice dev;
    int retained;
    CUcontext ctx;
    CUstream stream;
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
    CUresult (*get_error_string)(CUresult, const char **);
};

static int fail(const cuda_drv *c, const char *what, CUresult r, char *err, size_t err_len) {
    const char *s = NULL;
    if (c && c->get_error_string) {
        c->get_error_string(r, &s);
    }
    snprintf(err, err_len, "%s failed: CUresult %d (%s)", what, (int)r, s ? s : "?");
    return -1;
}

cuda_drv *cuda_open(int device, char *err, size_t err_len) {
    cuda_drv *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    c->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!c->lib) {
        snprintf(err, err_len, "no CUDA driver (dlopen libcuda.so.1: %s)", dlerror());
        free(c);
        return NULL;
    }
    static const char *const names[] = {
        "cuInit",          "cuDeviceGet",         "cuDevicePrimaryCtxRetain",
        "cuDevicePrimaryCtxRelease_v2",           "cuCtxSetCurrent",
        "cuStreamCreate",  "cuStreamDestroy_v2",  "cuStreamSynchronize",
        "cuMemAllocHost_v2", "cuMemFreeHost",     "cuMemcpyDtoHAsync_v2",
        "cuGetErrorString"};
    void *syms[sizeof names / sizeof names[0]];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        syms[i] = dlsym(c->lib, names[i]);
        if (!syms[i]) {
            snprintf(err, err_len, "libcuda.so.1 lacks %s", names[i]);
            cuda_close(c);
            return NULL;
        }
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
    memcpy(&c->get_error_string, &syms[11], sizeof(void *));
    CUresult r;
    if ((r = c->init(0)) != 0) {
        fail(c, "cuInit", r, err, err_len);
    } else if ((r = c->device_get(&c->dev, device)) != 0) {
        fail(c, "cuDeviceGet", r, err, err_len);
    } else if ((r = c->primary_ctx_retain(&c->ctx, c->dev)) != 0) {
        fail(c, "cuDevicePrimaryCtxRetain", r, err, err_len);
    } else if ((c->retained = 1, r = c->ctx_set_current(c->ctx)) != 0) {
        fail(c, "cuCtxSetCurrent", r, err, err_len);
    } else if ((r = c->stream_create(&c->stream, 0)) != 0) {
        fail(c, "cuStreamCreate", r, err, err_len);
    } else {
        return c;
    }
    cuda_close(c);
    return NULL;
}

void cuda_close(cuda_drv *c) {
    if (!c) {
        return;
    }
    if (c->stream) {
        c->stream_destroy(c->stream);
    }
    if (c->retained) {
        c->primary_ctx_release(c->dev);
    }
    if (c->lib) {
        dlclose(c->lib);
    }
    free(c);
}

void *cuda_stream(const cuda_drv *c) { return c->stream; }

uint8_t *cuda_host_alloc(cuda_drv *c, size_t len, char *err, size_t err_len) {
    void *p = NULL;
    CUresult r = c->mem_alloc_host(&p, len ? len : 1);
    if (r != 0) {
        fail(c, "cuMemAllocHost", r, err, err_len);
        return NULL;
    }
    return p;
}

void cuda_host_free(cuda_drv *c, uint8_t *p) {
    if (c && p) {
        c->mem_free_host(p);
    }
}

int cuda_copy_to_host(cuda_drv *c, uint8_t *dst, uint64_t src_device_ptr, size_t len, char *err,
                      size_t err_len) {
    CUresult r = c->memcpy_dtoh_async(dst, (CUdeviceptr)src_device_ptr, len, c->stream);
    return r == 0 ? 0 : fail(c, "cuMemcpyDtoHAsync", r, err, err_len);
}

int cuda_sync(cuda_drv *c, char *err, size_t err_len) {
    CUresult r = c->stream_synchronize(c->stream);
    return r == 0 ? 0 : fail(c, "cuStreamSynchronize", r, err, err_len);
}
