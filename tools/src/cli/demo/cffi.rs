//! The C client (`libkvfetcher.so`) loaded at run time, so the demo fetches exactly as a C
//! engine would. Raw FFI stays in this module: the rest of the demo calls [`CClient`].
//!
//! Declarations mirror `include/kvfetcher.h`: `kvf_layout`, `kvf_shape`, and the
//! functions used here, each returning a `kvf_error` (`uint32_t`, 0 = success).

use std::ffi::{c_char, CString};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use libloading::Library;

/// `kvf_layout` of the C header.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvfLayout {
    pub(crate) dtype: u32,
    pub(crate) order: u32,
    pub(crate) block_tokens: u32,
    pub(crate) memory: u32,
    pub(crate) gpu_device: u32,
}

/// `kvf_shape` of the C header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KvfShape {
    pub(crate) num_layers: u32,
    pub(crate) tokens: u32,
    pub(crate) kv_heads: u32,
    pub(crate) head_dim: u32,
}

type Connect = unsafe extern "C" fn(*const c_char, *mut *mut u8) -> u32;
type Fetch = unsafe extern "C" fn(
    *const u8,
    *const c_char,
    *const u32,
    usize,
    *const KvfLayout,
    *mut *mut u8,
) -> u32;
type WaitLayer = unsafe extern "C" fn(*const u8, u32) -> u32;
type WaitAll = unsafe extern "C" fn(*const u8, *mut u32) -> u32;
type Shape = unsafe extern "C" fn(*const u8, *mut KvfShape) -> u32;
type LayerPtr = unsafe extern "C" fn(*const u8, u32, *mut *const u8, *mut usize) -> u32;
type Free = unsafe extern "C" fn(*mut u8);

/// The loaded library and the functions the demo uses.
pub(crate) struct CClient {
    _lib: Library,
    connect: Connect,
    fetch: Fetch,
    wait_layer: WaitLayer,
    wait_all: WaitAll,
    shape: Shape,
    layer_ptr: LayerPtr,
    fetch_free: Free,
    client_free: Free,
}

/// What one fetch through the C client returned.
pub(crate) struct CFetched {
    /// The shape the daemon restored.
    pub(crate) shape: KvfShape,
    /// Tokens restored.
    pub(crate) tokens: u32,
    /// The whole buffer (every layer's bytes in order).
    pub(crate) bytes: Vec<u8>,
    /// Time from the fetch call until layer 0 was ready.
    pub(crate) first_layer: std::time::Duration,
}

fn check(what: &str, code: u32) -> anyhow::Result<()> {
    if code != 0 {
        bail!("C client: {what} failed with kvf_error {code}");
    }
    Ok(())
}

impl CClient {
    /// Loads `libkvfetcher.so` from `path`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<CClient> {
        // SAFETY: loading our own C client library runs no initialisers beyond Rust's std.
        let lib =
            unsafe { Library::new(path) }.with_context(|| format!("loading {}", path.display()))?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                // SAFETY: the symbol's C signature is the one declared in include/kvfetcher.h,
                // which `$ty` mirrors; the pointer stays valid while `lib` is loaded (we keep it).
                *unsafe { lib.get::<$ty>($name) }.map_err(|e| anyhow!("{}: {e}", path.display()))?
            };
        }
        Ok(CClient {
            connect: sym!(b"kvf_client_connect\0", Connect),
            fetch: sym!(b"kvf_client_fetch\0", Fetch),
            wait_layer: sym!(b"kvf_fetch_wait_layer\0", WaitLayer),
            wait_all: sym!(b"kvf_fetch_wait_all\0", WaitAll),
            shape: sym!(b"kvf_fetch_shape\0", Shape),
            layer_ptr: sym!(b"kvf_fetch_layer_ptr\0", LayerPtr),
            fetch_free: sym!(b"kvf_fetch_free\0", Free),
            client_free: sym!(b"kvf_client_free\0", Free),
            _lib: lib,
        })
    }

    /// Connects to `socket`, fetches `token_ids` of `model` in `layout`, waits for layer 0
    /// (timed) and then for everything, and copies the buffer out.
    pub(crate) fn fetch(
        &self,
        socket: &Path,
        model: &str,
        token_ids: &[u32],
        layout: KvfLayout,
    ) -> anyhow::Result<CFetched> {
        let path = CString::new(socket.as_os_str().as_encoded_bytes())?;
        let model = CString::new(model)?;
        let mut client: *mut u8 = std::ptr::null_mut();
        // SAFETY: `path` is NUL-terminated; `client` is writable.
        check("connect", unsafe {
            (self.connect)(path.as_ptr(), &mut client)
        })?;
        let result = self.fetch_with(client, &model, token_ids, layout);
        // SAFETY: `client` came from kvf_client_connect and is not used afterwards.
        unsafe { (self.client_free)(client) };
        result
    }

    fn fetch_with(
        &self,
        client: *mut u8,
        model: &CString,
        token_ids: &[u32],
        layout: KvfLayout,
    ) -> anyhow::Result<CFetched> {
        let start = std::time::Instant::now();
        let mut fetch: *mut u8 = std::ptr::null_mut();
        // SAFETY: live client; NUL-terminated model; `token_ids` holds its length; `layout` and
        // `fetch` point to valid storage.
        check("fetch", unsafe {
            (self.fetch)(
                client,
                model.as_ptr(),
                token_ids.as_ptr(),
                token_ids.len(),
                &layout,
                &mut fetch,
            )
        })?;
        let read = || -> anyhow::Result<CFetched> {
            // SAFETY: `fetch` is live until freed below.
            check("wait layer 0", unsafe { (self.wait_layer)(fetch, 0) })?;
            let first_layer = start.elapsed();
            let mut tokens = 0u32;
            // SAFETY: live fetch; writable out-parameter.
            check("wait all", unsafe { (self.wait_all)(fetch, &mut tokens) })?;
            let mut shape = KvfShape::default();
            // SAFETY: live fetch; writable out-parameter.
            check("shape", unsafe { (self.shape)(fetch, &mut shape) })?;
            let mut bytes = Vec::new();
            for layer in 0..shape.num_layers {
                let (mut p, mut len) = (std::ptr::null::<u8>(), 0usize);
                // SAFETY: live fetch; writable out-parameters.
                check("layer ptr", unsafe {
                    (self.layer_ptr)(fetch, layer, &mut p, &mut len)
                })?;
                // SAFETY: the library hands out `len` readable bytes at `p`, valid until
                // kvf_fetch_free, which happens after this copy.
                bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
            }
            Ok(CFetched {
                shape,
                tokens,
                bytes,
                first_layer,
            })
        };
        let out = read();
        // SAFETY: `fetch` came from kvf_client_fetch and is not used afterwards.
        unsafe { (self.fetch_free)(fetch) };
        out
    }
}
