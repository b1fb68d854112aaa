/*
 * cuda_drv: the few CUDA driver calls kvf-llama's GPU mode needs, opened with
 * dlopen("libcuda.so.1") at run time so the example builds, and its CPU mode runs, on hosts
 * without an NVIDIA driver (as examples/c/fetch.c does).
 */
#ifndef KVF_LLAMA_CUDA_DRV_H
#define KVF_LLAMA_CUDA_DRV_H

#include <stddef.h>
#include <stdint.h>

typedef struct cuda_drv cuda_drv;

/*
 * Loads the driver, makes GPU `device`'s primary context (the one the CUDA runtime, hence
 * llama.cpp's CUDA backend, uses) current on this thread and creates a stream on it.
 * Returns NULL with a reason in err.
 */
cuda_drv *cuda_open(int device, char *err, size_t err_len);

/* Destroys the stream, releases the context and closes the library; NULL is fine. */
void cuda_close(cuda_drv *c);

/* The stream (a CUstream), for kvf_fetch_stream_wait_layer. */
void *cuda_stream(const cuda_drv *c);

/* Page-locked host memory (fast device-to-host copies). NULL with a reason in err. */
uint8_t *cuda_host_alloc(cuda_drv *c, size_t len, char *err, size_t err_len);
void cuda_host_free(cuda_drv *c, uint8_t *p);

/* Queues a device-to-host copy on the stream. 0 or -1 (err). */
int cuda_copy_to_host(cuda_drv *c, uint8_t *dst, uint64_t src_device_ptr, size_t len, char *err,
                      size_t err_len);

/* Waits until everything queued on the stream is done. 0 or -1 (err). */
int cuda_sync(cuda_drv *c, char *err, size_t err_len);

#endif
