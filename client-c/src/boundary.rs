//! The library boundary: the panic guard every exported function runs inside, the thread-local
//! detail of the last error, and the helpers that turn C pointers into Rust references (every
//! raw-pointer dereference of the crate happens here).

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::types::kvf_error;

thread_local! {
    /// The detailed message of the last error on this thread.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `detail` as this thread's last error message.
pub(crate) fn set_detail(detail: String) {
    LAST_ERROR.with(|l| *l.borrow_mut() = detail);
}

/// This thread's last error message.
pub(crate) fn detail() -> String {
    LAST_ERROR.with(|l| l.borrow().clone())
}

/// Runs `f`, turning its error or a panic into a code and recording the detail.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), kvf_error>) -> kvf_error {
    // AssertUnwindSafe: after a panic the caller gets KVF_ERR_PANIC and every output is left
    // unwritten; the handles a panic could leave inconsistent are documented as unusable then.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => kvf_error::KVF_OK,
        Ok(Err(e)) => e,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_detail(format!("panic: {msg}"));
            kvf_error::KVF_ERR_PANIC
        }
    }
}

/// Records the detail of a client error and returns its code.
pub(crate) fn client_error(e: kvfetcher_client::ClientError) -> kvf_error {
    set_detail(e.to_string());
    kvf_error::of(&e)
}

/// Records a detail for an argument error and returns `code`.
pub(crate) fn arg_error(code: kvf_error, detail: &str) -> kvf_error {
    set_detail(detail.to_string());
    code
}

/// A shared reference from a pointer the caller promises valid for `'a` if non-null.
///
/// # Safety
/// `p` is null or points to a live, aligned `T` not mutated during `'a`.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T, kvf_error> {
    // SAFETY: the caller guarantees `p` is null or valid; `as_ref` handles null.
    unsafe { p.as_ref() }.ok_or_else(|| arg_error(kvf_error::KVF_ERR_NULL_ARGUMENT, name))
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid during `'a`.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str, kvf_error> {
    if p.is_null() {
        return Err(arg_error(kvf_error::KVF_ERR_NULL_ARGUMENT, name));
    }
    // SAFETY: non-null and NUL-terminated per the caller's guarantee.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| arg_error(kvf_error::KVF_ERR_INVALID_UTF8, name))
}

/// A slice argument `(p, n)`; `p` may be null only when `n` is 0.
///
/// # Safety
/// If `n > 0`, `p` points to `n` initialized, aligned `T`s valid during `'a`.
pub(crate) unsafe fn arg_slice<'a, T>(
    p: *const T,
    n: usize,
    name: &str,
) -> Result<&'a [T], kvf_error> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(arg_error(kvf_error::KVF_ERR_NULL_ARGUMENT, name));
    }
    let fits =
        matches!(n.checked_mul(std::mem::size_of::<T>()), Some(b) if b <= isize::MAX as usize);
    if !fits {
        return Err(arg_error(kvf_error::KVF_ERR_INVALID_ARGUMENT, name));
    }
    // SAFETY: non-null, and the caller guarantees `n` valid elements; the size fits isize.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// An output pointer, checked before any work so that outputs are written only on success.
pub(crate) struct Out<T>(*mut T);

impl<T> Out<T> {
    /// Checks that `p` is non-null.
    pub(crate) fn new(p: *mut T, name: &str) -> Result<Out<T>, kvf_error> {
        if p.is_null() {
            return Err(arg_error(kvf_error::KVF_ERR_NULL_ARGUMENT, name));
        }
        Ok(Out(p))
    }

    /// Writes the output.
    ///
    /// # Safety
    /// The pointer given to [`Out::new`] points to writable, aligned memory for a `T`.
    pub(crate) unsafe fn write(self, v: T) {
        // SAFETY: non-null (checked in `new`), writable and aligned per the caller; `write`
        // does not drop the (possibly uninitialized) old value.
        unsafe { self.0.write(v) }
    }
}

/// Copies `msg` into `buf` (NUL-terminated, truncated to fit) and returns its full length in
/// bytes without the NUL, like `snprintf`.
///
/// # Safety
/// `buf` is null (then `len` must be 0) or points to `len` writable bytes.
pub(crate) unsafe fn copy_message(msg: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let n = msg.len().min(len - 1);
        // SAFETY: `buf` has `len` writable bytes and `n + 1 <= len`; `msg` is a distinct Rust
        // string, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    msg.len()
}
