//! The exported `kvf_` functions. Each one runs inside [`guard`], takes its pointers through the
//! helpers of `boundary`, and writes its outputs only on success.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

use kvfetcher_client::{Client, ClientError, FetchHandle};

use crate::boundary::{
    arg_error, arg_ref, arg_slice, arg_str, client_error, copy_message, detail, guard, Out,
};
use crate::types::{kvf_error, kvf_layout, kvf_shape, KVF_SAVE_REPLACE};

/// A connection to the daemon (opaque). Thread-safe: calls on one client are serialized.
pub struct kvf_client {
    inner: Client,
}

/// A fetch: its mapped buffer and readiness (opaque). Thread-safe.
pub struct kvf_fetch {
    inner: FetchHandle,
}

/// Records a client error like `client_error`, with the C names in the wrong-memory detail.
fn fetch_error(e: ClientError) -> kvf_error {
    match e {
        ClientError::WrongMemory(m) if m.contains("GPU") => arg_error(
            kvf_error::KVF_ERR_WRONG_MEMORY,
            "buffer is in GPU memory: use kvf_fetch_device_ptr() or kvf_fetch_layer_device_ptr()",
        ),
        ClientError::WrongMemory(_) => arg_error(
            kvf_error::KVF_ERR_WRONG_MEMORY,
            "buffer is in host memory: use kvf_fetch_layer_ptr() or kvf_fetch_tensor_ptr()",
        ),
        e => client_error(e),
    }
}

/// Writes the library version (for example "0.1.0") into `buf` like `kvf_error_message`.
///
/// # Safety
/// `buf` is NULL (then `len` must be 0) or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvf_version(buf: *mut c_char, len: usize) -> usize {
    // SAFETY: forwarded caller guarantee.
    unsafe { copy_message(env!("CARGO_PKG_VERSION"), buf, len) }
}

/// Writes the message of `code` into `buf` (NUL-terminated, truncated to `len` bytes) and
/// returns the message's full length without the NUL. An unknown code gives "unknown error".
///
/// # Safety
/// `buf` is NULL (then `len` must be 0) or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvf_error_message(code: u32, buf: *mut c_char, len: usize) -> usize {
    let msg = kvf_error::ALL
        .iter()
        .find(|e| **e as u32 == code)
        .map_or("unknown error", |e| e.message());
    // SAFETY: forwarded caller guarantee.
    unsafe { copy_message(msg, buf, len) }
}

/// Writes the detailed message of the last error returned on this thread (for example the
/// daemon's explanation) into `buf`, like `kvf_error_message`.
///
/// # Safety
/// `buf` is NULL (then `len` must be 0) or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvf_last_error_detail(buf: *mut c_char, len: usize) -> usize {
    let d = detail();
    // SAFETY: forwarded caller guarantee.
    unsafe { copy_message(&d, buf, len) }
}

/// Writes the model id of the model file at `path` into `buf`, like `kvf_error_message`, and
/// its full length (without the NUL) into `*out_len`. The id is `sha256:` and the SHA-256 of
/// the file's bytes: a renamed copy keeps it, different content never shares it. Use it (plus
/// the engine's settings that change the KV) as the `model` of lookups, fetches and saves. The
/// first call for a file hashes it (seconds for a large model); later calls read a per-user
/// cache while the file is unchanged.
///
/// # Safety
/// `path` is a NUL-terminated string; `buf` is NULL (then `len` must be 0) or points to `len`
/// writable bytes; `out_len` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_model_id_from_file(
    path: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out_len, "out_len")?;
        // SAFETY: caller guarantee.
        let path = unsafe { arg_str(path, "path") }?;
        let id = kvfetcher_client::model_id::model_id_from_file(std::path::Path::new(path))
            .map_err(|e| arg_error(kvf_error::KVF_ERR_FILE, &format!("{path}: {e}")))?;
        // SAFETY: forwarded caller guarantee.
        let full = unsafe { copy_message(&id, buf, len) };
        // SAFETY: `out` was checked non-null; the caller guarantees it is writable.
        unsafe { out.write(full) };
        Ok(())
    })
}

/// Connects to the daemon's socket at `path` (for example "/run/kvfetcher/kvfetcher.sock").
/// On success `*out` is a new client: the caller owns it and must call `kvf_client_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_connect(
    path: *const c_char,
    out: *mut *mut kvf_client,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out, "out")?;
        // SAFETY: caller guarantee.
        let path = unsafe { arg_str(path, "path") }?;
        let inner = Client::connect(path).map_err(client_error)?;
        let c = Box::into_raw(Box::new(kvf_client { inner }));
        // SAFETY: `out` was checked non-null; the caller guarantees it is writable.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Closes the connection and frees `client`. NULL is fine. Fetches made through it stay
/// valid (each keeps the connection open until freed).
///
/// # Safety
/// `client` is NULL or came from `kvf_client_connect` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_free(client: *mut kvf_client) {
    if client.is_null() {
        return;
    }
    let _ = guard(|| {
        // SAFETY: the caller hands back ownership of a pointer from `Box::into_raw`.
        drop(unsafe { Box::from_raw(client) });
        Ok(())
    });
}

/// Asks how many leading tokens of `token_ids[0..n_tokens]` the daemon can fetch for `model`;
/// writes the count to `*out_tokens`.
///
/// # Safety
/// `client` is a live client; `model` a NUL-terminated string; `token_ids` points to
/// `n_tokens` values (may be NULL if `n_tokens` is 0); `out_tokens` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_lookup(
    client: *const kvf_client,
    model: *const c_char,
    token_ids: *const u32,
    n_tokens: usize,
    out_tokens: *mut u32,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out_tokens, "out_tokens")?;
        // SAFETY: caller guarantees for each pointer.
        let (c, model, ids) = unsafe {
            (
                arg_ref(client, "client")?,
                arg_str(model, "model")?,
                arg_slice(token_ids, n_tokens, "token_ids")?,
            )
        };
        let n = c.inner.lookup(model, ids).map_err(client_error)?;
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Starts fetching the longest available prefix of `token_ids` for `model` in `*layout`.
/// Returns once the buffer is mapped, before its layers are ready: call `kvf_fetch_wait_layer`
/// before reading a layer. Nothing available is `KVF_ERR_NOT_FOUND`. On success `*out` is a
/// new fetch: the caller owns it and must call `kvf_fetch_free`.
///
/// With `layout->memory == KVF_MEMORY_GPU` the buffer is the daemon's memory on GPU
/// `layout->gpu_device`, opened in this process over CUDA IPC: read it through
/// `kvf_fetch_device_ptr` / `kvf_fetch_layer_device_ptr` after `kvf_fetch_stream_wait_layer`
/// (or `kvf_fetch_wait_layer`). A process without the NVIDIA driver gets
/// `KVF_ERR_GPU_UNSUPPORTED`.
///
/// # Safety
/// As `kvf_client_lookup`; `layout` points to a `kvf_layout`; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_fetch(
    client: *const kvf_client,
    model: *const c_char,
    token_ids: *const u32,
    n_tokens: usize,
    layout: *const kvf_layout,
    out: *mut *mut kvf_fetch,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out, "out")?;
        // SAFETY: caller guarantees for each pointer.
        let (c, model, ids, layout) = unsafe {
            (
                arg_ref(client, "client")?,
                arg_str(model, "model")?,
                arg_slice(token_ids, n_tokens, "token_ids")?,
                arg_ref(layout, "layout")?,
            )
        };
        let layout = layout
            .to_rust()
            .map_err(|e| arg_error(e, "layout has an unknown dtype, order or memory"))?;
        let inner = c.inner.fetch(model, ids, &layout).map_err(client_error)?;
        let f = Box::into_raw(Box::new(kvf_fetch { inner }));
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write(f) };
        Ok(())
    })
}

/// Hands KV to the daemon to store for `model` and `token_ids`: `data[0..len]` holds `*shape`
/// in the host `*layout` (`shape->tokens` must equal `n_tokens`; a GPU layout is
/// `KVF_ERR_INVALID_ARGUMENT`: use `kvf_client_save_gpu`). The bytes are copied before the call
/// returns; the caller keeps ownership of `data`. Writes the number of chunks stored to
/// `*out_chunks`. Chunks already stored count as stored and are kept as they are (write-once);
/// `kvf_client_save_with_flags` with `KVF_SAVE_REPLACE` asks to overwrite them.
///
/// # Safety
/// As `kvf_client_lookup`; `layout` and `shape` point to their structs; `data` points to `len`
/// readable bytes; `out_chunks` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_save(
    client: *const kvf_client,
    model: *const c_char,
    token_ids: *const u32,
    n_tokens: usize,
    layout: *const kvf_layout,
    shape: *const kvf_shape,
    data: *const u8,
    len: usize,
    out_chunks: *mut u32,
) -> kvf_error {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        kvf_client_save_with_flags(
            client, model, token_ids, n_tokens, layout, shape, data, len, 0, out_chunks,
        )
    }
}

/// `kvf_client_save` with `flags`: 0, or `KVF_SAVE_REPLACE` to overwrite chunks already
/// stored (refused with `KVF_ERR_BAD_REQUEST` unless the daemon's `[save] replace_uids` /
/// `replace_gids` allow this process; the detail says why). Unknown flag bits are
/// `KVF_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// As `kvf_client_save`.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_save_with_flags(
    client: *const kvf_client,
    model: *const c_char,
    token_ids: *const u32,
    n_tokens: usize,
    layout: *const kvf_layout,
    shape: *const kvf_shape,
    data: *const u8,
    len: usize,
    flags: u32,
    out_chunks: *mut u32,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out_chunks, "out_chunks")?;
        if flags & !KVF_SAVE_REPLACE != 0 {
            return Err(arg_error(
                kvf_error::KVF_ERR_INVALID_ARGUMENT,
                &format!("unknown save flags {flags:#x} (known: KVF_SAVE_REPLACE)"),
            ));
        }
        // SAFETY: caller guarantees for each pointer.
        let (c, model, ids, layout, shape, data) = unsafe {
            (
                arg_ref(client, "client")?,
                arg_str(model, "model")?,
                arg_slice(token_ids, n_tokens, "token_ids")?,
                arg_ref(layout, "layout")?,
                arg_ref(shape, "shape")?,
                arg_slice(data, len, "data")?,
            )
        };
        let layout = layout
            .to_rust()
            .map_err(|e| arg_error(e, "layout has an unknown dtype, order or memory"))?;
        let replace = flags & KVF_SAVE_REPLACE != 0;
        let n = c
            .inner
            .save_replacing(model, ids, &layout, &(*shape).into(), data, replace)
            .map_err(client_error)?;
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Hands KV in GPU memory to the daemon to store for `model` and `token_ids`: `len` bytes at
/// device address `device_ptr` (a `CUdeviceptr` / CUDA runtime device pointer of this process
/// on GPU `layout->gpu_device`) hold `*shape` in `*layout`, whose `memory` must be
/// `KVF_MEMORY_GPU`. The allocation containing the pointer is exported over CUDA IPC and the
/// daemon copies the bytes out before the call returns: the caller keeps ownership of the
/// memory and may reuse it afterwards. The bytes must be written before the call (synchronize
/// the stream that wrote them). A pointer that is not device memory of that GPU, or `len`
/// bytes that overrun its allocation, are `KVF_ERR_INVALID_ARGUMENT`; a process without the
/// NVIDIA driver gets `KVF_ERR_GPU_UNSUPPORTED`. Writes the number of chunks stored to
/// `*out_chunks`.
///
/// # Safety
/// As `kvf_client_lookup`; `layout` and `shape` point to their structs; `out_chunks` is
/// writable. `device_ptr` is only passed to the CUDA driver, never dereferenced on the host.
#[no_mangle]
pub unsafe extern "C" fn kvf_client_save_gpu(
    client: *const kvf_client,
    model: *const c_char,
    token_ids: *const u32,
    n_tokens: usize,
    layout: *const kvf_layout,
    shape: *const kvf_shape,
    device_ptr: u64,
    len: usize,
    out_chunks: *mut u32,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out_chunks, "out_chunks")?;
        // SAFETY: caller guarantees for each pointer.
        let (c, model, ids, layout, shape) = unsafe {
            (
                arg_ref(client, "client")?,
                arg_str(model, "model")?,
                arg_slice(token_ids, n_tokens, "token_ids")?,
                arg_ref(layout, "layout")?,
                arg_ref(shape, "shape")?,
            )
        };
        let layout = layout
            .to_rust()
            .map_err(|e| arg_error(e, "layout has an unknown dtype, order or memory"))?;
        let n = c
            .inner
            .save_gpu(model, ids, &layout, &(*shape).into(), device_ptr, len)
            .map_err(client_error)?;
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Writes the shape being restored (its `tokens` is the prefix found) to `*out`.
///
/// # Safety
/// `fetch` is a live fetch; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_shape(
    fetch: *const kvf_fetch,
    out: *mut kvf_shape,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out, "out")?;
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write((*f.inner.shape()).into()) };
        Ok(())
    })
}

/// Blocks until `layer` is restored (the thread sleeps on the socket; no polling). Fails with
/// the daemon's code if the fetch failed. For a fetch in GPU memory this then also blocks until
/// the GPU finished writing the layer (`cuEventSynchronize`), so host copies of it are safe; an
/// engine should rather use `kvf_fetch_stream_wait_layer`, which does not block on the GPU.
///
/// # Safety
/// `fetch` is a live fetch.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_wait_layer(fetch: *const kvf_fetch, layer: u32) -> kvf_error {
    guard(|| {
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        f.inner.wait_layer(layer).map_err(client_error)
    })
}

/// For a fetch in GPU memory: blocks until the daemon announced `layer` (on the socket, as
/// `kvf_fetch_wait_layer`; no polling, no GPU wait), then makes the work queued on `cu_stream`
/// after this call wait for the layer's restore on the GPU (`cuStreamWaitEvent`). Work queued on
/// the stream before the call is not ordered. `cu_stream` is the engine's `CUstream` /
/// `cudaStream_t`; NULL is the legacy default stream of the device's primary context (the CUDA
/// runtime's default stream on that device). A host fetch is `KVF_ERR_WRONG_MEMORY`.
///
/// # Safety
/// `fetch` is a live fetch; `cu_stream` is NULL or a live CUDA stream of this process.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_stream_wait_layer(
    fetch: *const kvf_fetch,
    layer: u32,
    cu_stream: *mut c_void,
) -> kvf_error {
    guard(|| {
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        // SAFETY: the caller guarantees the stream is NULL or live.
        unsafe { f.inner.stream_wait_layer(layer, cu_stream) }.map_err(fetch_error)
    })
}

/// For a fetch in GPU memory: writes the device address (`CUdeviceptr`, usable as a CUDA
/// runtime device pointer on GPU `layout.gpu_device` in this process) of the whole buffer and
/// its length in bytes. The memory belongs to `fetch`: valid until `kvf_fetch_free(fetch)`;
/// read a layer only after `kvf_fetch_stream_wait_layer` (or `kvf_fetch_wait_layer`) for it,
/// and do not write it. Does not wait. A host fetch is `KVF_ERR_WRONG_MEMORY`.
///
/// # Safety
/// `fetch` is a live fetch; `out_ptr` and `out_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_device_ptr(
    fetch: *const kvf_fetch,
    out_ptr: *mut u64,
    out_len: *mut usize,
) -> kvf_error {
    guard(|| {
        let (op, ol) = (Out::new(out_ptr, "out_ptr")?, Out::new(out_len, "out_len")?);
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        let p = f
            .inner
            .device_ptr()
            .ok_or_else(|| fetch_error(ClientError::WrongMemory("buffer is in host memory")))?;
        // SAFETY: both checked non-null; writable per the caller.
        unsafe {
            op.write(p);
            ol.write(f.inner.len());
        }
        Ok(())
    })
}

/// For a fetch in GPU memory: writes the device address of `layer` (K tensor, then V tensor;
/// the V tensor starts at half the length) and its length in bytes. Does NOT wait: call
/// `kvf_fetch_stream_wait_layer` before queuing reads of it. Same lifetime as
/// `kvf_fetch_device_ptr`. A host fetch is `KVF_ERR_WRONG_MEMORY`.
///
/// # Safety
/// `fetch` is a live fetch; `out_ptr` and `out_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_layer_device_ptr(
    fetch: *const kvf_fetch,
    layer: u32,
    out_ptr: *mut u64,
    out_len: *mut usize,
) -> kvf_error {
    guard(|| {
        let (op, ol) = (Out::new(out_ptr, "out_ptr")?, Out::new(out_len, "out_len")?);
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        let p = f.inner.layer_device_ptr(layer).map_err(fetch_error)?;
        let n = f.inner.layout().layer_len(f.inner.shape());
        // SAFETY: both checked non-null; writable per the caller.
        unsafe {
            op.write(p);
            ol.write(n);
        }
        Ok(())
    })
}

/// Blocks until the whole fetch is done (for a GPU fetch, also on the GPU); writes the tokens
/// restored to `*out_tokens`.
///
/// # Safety
/// `fetch` is a live fetch; `out_tokens` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_wait_all(
    fetch: *const kvf_fetch,
    out_tokens: *mut u32,
) -> kvf_error {
    guard(|| {
        let out = Out::new(out_tokens, "out_tokens")?;
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        let d = f.inner.wait_done().map_err(client_error)?;
        // SAFETY: checked non-null; writable per the caller.
        unsafe { out.write(d.tokens) };
        Ok(())
    })
}

/// Waits for `layer` (as `kvf_fetch_wait_layer`), then writes the address and length of its
/// bytes (K tensor, then V tensor) to `*out_ptr` and `*out_len`. The memory is read-only and
/// belongs to `fetch`: valid until `kvf_fetch_free(fetch)`. Host fetches only: a fetch in GPU
/// memory is `KVF_ERR_WRONG_MEMORY` (use `kvf_fetch_layer_device_ptr`).
///
/// # Safety
/// `fetch` is a live fetch; `out_ptr` and `out_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_layer_ptr(
    fetch: *const kvf_fetch,
    layer: u32,
    out_ptr: *mut *const u8,
    out_len: *mut usize,
) -> kvf_error {
    guard(|| {
        let (op, ol) = (Out::new(out_ptr, "out_ptr")?, Out::new(out_len, "out_len")?);
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        let s = f.inner.layer(layer).map_err(fetch_error)?;
        // SAFETY: both checked non-null; writable per the caller.
        unsafe {
            op.write(s.as_ptr());
            ol.write(s.len());
        }
        Ok(())
    })
}

/// Waits for `layer`, then writes the address and length of one of its tensors (`kv`: 0 = K,
/// 1 = V). Same ownership and memory kind as `kvf_fetch_layer_ptr`.
///
/// # Safety
/// `fetch` is a live fetch; `out_ptr` and `out_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_tensor_ptr(
    fetch: *const kvf_fetch,
    layer: u32,
    kv: u32,
    out_ptr: *mut *const u8,
    out_len: *mut usize,
) -> kvf_error {
    guard(|| {
        let (op, ol) = (Out::new(out_ptr, "out_ptr")?, Out::new(out_len, "out_len")?);
        // SAFETY: caller guarantee.
        let f = unsafe { arg_ref(fetch, "fetch") }?;
        let s = f.inner.tensor(layer, kv).map_err(fetch_error)?;
        // SAFETY: both checked non-null; writable per the caller.
        unsafe {
            op.write(s.as_ptr());
            ol.write(s.len());
        }
        Ok(())
    })
}

/// Unmaps the fetch's buffer (host) or closes its CUDA IPC mapping and events (GPU), then
/// releases the fetch in the daemon (cancelling it if still running) and frees `fetch`. NULL is
/// fine. Pointers from `kvf_fetch_layer_ptr` / `kvf_fetch_tensor_ptr` and device addresses
/// from `kvf_fetch_device_ptr` / `kvf_fetch_layer_device_ptr` become invalid: for GPU memory,
/// first make sure no queued GPU work still reads them (synchronize the streams).
///
/// # Safety
/// `fetch` is NULL or came from `kvf_client_fetch` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvf_fetch_free(fetch: *mut kvf_fetch) {
    if fetch.is_null() {
        return;
    }
    let _ = guard(|| {
        // SAFETY: the caller hands back ownership of a pointer from `Box::into_raw`.
        let f = unsafe { Box::from_raw(fetch) };
        // Best effort: a dead connection has released everything already.
        let _ = f.inner.release();
        Ok(())
    });
}
