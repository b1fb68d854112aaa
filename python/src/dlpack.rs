//! DLPack (the legacy, unversioned `DLManagedTensor` of DLPack 0.8, which every PyTorch since
//! 1.10 reads and writes): tensors over fetched buffers, exported as `"dltensor"` capsules, and
//! tensors handed in for a save, imported from such capsules.
//!
//! This is the package's only module with raw pointers. An exported tensor owns a reference to
//! whatever keeps its memory alive (the fetch handle) until its consumer calls the deleter.

use std::any::Any;
use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvfetcher_client::DType;
use pyo3::ffi;
use pyo3::prelude::*;

/// The name of a capsule nobody consumed yet.
const DLTENSOR: &CStr = c"dltensor";
/// The name a consumer gives a capsule it took the tensor from.
const USED_DLTENSOR: &CStr = c"used_dltensor";

/// `kDLCPU`.
pub(crate) const DEVICE_CPU: i32 = 1;
/// `kDLCUDA`.
pub(crate) const DEVICE_CUDA: i32 = 2;

/// `DLDevice`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DlDevice {
    pub(crate) device_type: i32,
    pub(crate) device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
#[derive(Debug)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// `DLManagedTensor`.
#[repr(C)]
#[derive(Debug)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// `kDLFloat`, `kDLBfloat`.
const CODE_FLOAT: u8 = 2;
const CODE_BFLOAT: u8 = 4;

fn dl_dtype(d: DType) -> DlDataType {
    match d {
        DType::F16 => DlDataType {
            code: CODE_FLOAT,
            bits: 16,
            lanes: 1,
        },
        DType::BF16 => DlDataType {
            code: CODE_BFLOAT,
            bits: 16,
            lanes: 1,
        },
        DType::F32 => DlDataType {
            code: CODE_FLOAT,
            bits: 32,
            lanes: 1,
        },
    }
}

fn dtype_name(t: DlDataType) -> String {
    match (t.code, t.bits, t.lanes) {
        (CODE_FLOAT, 16, 1) => "float16".into(),
        (CODE_BFLOAT, 16, 1) => "bfloat16".into(),
        (CODE_FLOAT, 32, 1) => "float32".into(),
        (CODE_FLOAT, 64, 1) => "float64".into(),
        (0, b, 1) => format!("int{b}"),
        (1, b, 1) => format!("uint{b}"),
        (c, b, l) => format!("dtype(code={c}, bits={b}, lanes={l})"),
    }
}

/// Row-major strides (in elements) of `shape`.
pub(crate) fn compact_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// An exported tensor with the arrays its `DLTensor` points into and the owner of its memory.
/// `managed` is the first field, so a `*mut DlManagedTensor` is a `*mut Exported`.
#[repr(C)]
struct Exported {
    managed: DlManagedTensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _owner: Box<dyn Any + Send>,
}

/// Frees an [`Exported`]: the deleter a consumer calls once it no longer needs the memory (from
/// any thread, with or without the GIL). Dropping the owner may release a fetch (a socket write)
/// and close a CUDA IPC mapping; neither touches Python.
unsafe extern "C" fn delete_exported(p: *mut DlManagedTensor) {
    if p.is_null() {
        return;
    }
    // A panic must not unwind into the consumer's C code: it is contained (and the owner then
    // leaks rather than running its drop twice).
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `p` is the pointer `export` made with Box::into_raw of an Exported (whose
        // first field it is); DLPack consumers call the deleter exactly once.
        drop(unsafe { Box::from_raw(p.cast::<Exported>()) });
    }));
}

/// The destructor of an exported capsule: frees the tensor unless a consumer took it (and
/// renamed the capsule `used_dltensor`; the consumer then calls the deleter itself).
unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    // SAFETY: called by Python with the GIL held on a capsule object; PyCapsule_IsValid sets no
    // exception and PyCapsule_GetPointer succeeds on a capsule IsValid accepted.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()).cast::<DlManagedTensor>();
            if let Some(deleter) = p.as_ref().and_then(|m| m.deleter) {
                deleter(p);
            }
        }
    }
}

/// What an exported tensor looks like.
#[derive(Debug, Clone)]
pub(crate) struct TensorSpec {
    /// The address of its first element (host or device).
    pub(crate) data: u64,
    /// Its device.
    pub(crate) device: DlDevice,
    /// Its element type.
    pub(crate) dtype: DType,
    /// Its shape; it is compact row-major.
    pub(crate) shape: Vec<i64>,
}

/// A `"dltensor"` capsule over memory that `owner` keeps alive: the capsule (or, once consumed,
/// the tensor made from it) owns `owner` until the tensor is freed.
///
/// # Safety
/// `spec` must describe memory (`data` up to `data` + the shape's bytes) that stays valid for
/// reading and writing while `owner` lives.
pub(crate) unsafe fn export<'py>(
    py: Python<'py>,
    spec: TensorSpec,
    owner: Box<dyn Any + Send>,
) -> PyResult<Bound<'py, PyAny>> {
    let strides = compact_strides(&spec.shape);
    let mut e = Box::new(Exported {
        managed: DlManagedTensor {
            dl_tensor: DlTensor {
                data: spec.data as *mut c_void,
                device: spec.device,
                ndim: spec.shape.len() as i32,
                dtype: dl_dtype(spec.dtype),
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_exported),
        },
        shape: spec.shape,
        strides,
        _owner: owner,
    });
    // The vectors' heap buffers do not move when the box is turned into a raw pointer.
    e.managed.dl_tensor.shape = e.shape.as_mut_ptr();
    e.managed.dl_tensor.strides = e.strides.as_mut_ptr();
    let raw = Box::into_raw(e);
    // SAFETY: `raw` is a valid, uniquely owned Exported whose first field is the managed tensor.
    unsafe {
        (*raw).managed.manager_ctx = raw.cast();
        let cap = ffi::PyCapsule_New(raw.cast(), DLTENSOR.as_ptr(), Some(capsule_destructor));
        if cap.is_null() {
            delete_exported(raw.cast());
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap))
    }
}

/// A tensor taken from a `"dltensor"` capsule: the capsule is renamed `used_dltensor` and the
/// producer's deleter is called when this is dropped (hold the GIL then: some producers' deleters
/// touch Python objects).
pub(crate) struct Imported {
    managed: *mut DlManagedTensor,
}

impl Imported {
    /// Takes the tensor out of `capsule` (`tensor.__dlpack__()`).
    pub(crate) fn take(py: Python<'_>, capsule: &Bound<'_, PyAny>) -> PyResult<Imported> {
        let cap = capsule.as_ptr();
        // SAFETY: `cap` is a live object (borrowed from `capsule`); the PyCapsule calls accept
        // any object and report a mismatch by their result.
        unsafe {
            if ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) != 1 {
                return Err(crate::errors::invalid(
                    py,
                    "expected an unconsumed DLPack capsule (tensor.__dlpack__())",
                ));
            }
            let managed =
                ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()).cast::<DlManagedTensor>();
            if managed.is_null() {
                return Err(PyErr::fetch(py));
            }
            if ffi::PyCapsule_SetName(cap, USED_DLTENSOR.as_ptr()) != 0 {
                return Err(PyErr::fetch(py));
            }
            Ok(Imported { managed })
        }
    }

    fn tensor(&self) -> &DlTensor {
        // SAFETY: the producer keeps the managed tensor valid until its deleter is called,
        // which only our Drop does.
        unsafe { &(*self.managed).dl_tensor }
    }

    /// The tensor's device.
    pub(crate) fn device(&self) -> DlDevice {
        self.tensor().device
    }

    /// The tensor's shape.
    pub(crate) fn shape(&self) -> &[i64] {
        let t = self.tensor();
        if t.ndim <= 0 || t.shape.is_null() {
            return &[];
        }
        // SAFETY: DLPack: `shape` points to `ndim` elements, valid while the tensor is.
        unsafe { std::slice::from_raw_parts(t.shape, t.ndim as usize) }
    }

    /// The tensor's strides in elements (`None`: compact row-major).
    fn strides(&self) -> Option<&[i64]> {
        let t = self.tensor();
        if t.ndim <= 0 || t.strides.is_null() {
            return None;
        }
        // SAFETY: DLPack: non-null `strides` points to `ndim` elements.
        Some(unsafe { std::slice::from_raw_parts(t.strides, t.ndim as usize) })
    }

    /// Whether the elements are compact and row-major (dimensions of size 1 may have any
    /// stride, as PyTorch reports them).
    pub(crate) fn is_compact(&self) -> bool {
        let Some(strides) = self.strides() else {
            return true;
        };
        let want = compact_strides(self.shape());
        self.shape()
            .iter()
            .zip(strides.iter().zip(want))
            .all(|(&n, (&s, w))| n == 1 || s == w)
    }

    /// The element type, if it is one the protocol carries; else its name.
    pub(crate) fn kv_dtype(&self) -> Result<DType, String> {
        let t = self.tensor().dtype;
        match (t.code, t.bits, t.lanes) {
            (CODE_FLOAT, 16, 1) => Ok(DType::F16),
            (CODE_BFLOAT, 16, 1) => Ok(DType::BF16),
            (CODE_FLOAT, 32, 1) => Ok(DType::F32),
            _ => Err(dtype_name(t)),
        }
    }

    /// The number of elements (0 for a negative dimension).
    pub(crate) fn numel(&self) -> usize {
        self.shape()
            .iter()
            .try_fold(1usize, |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
            .unwrap_or(0)
    }

    /// The address of the first element (host or device).
    pub(crate) fn data(&self) -> u64 {
        let t = self.tensor();
        (t.data as u64).wrapping_add(t.byte_offset)
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: `managed` came from an unconsumed capsule that we renamed, so we are its one
        // consumer and call its deleter exactly once.
        unsafe {
            if let Some(deleter) = (*self.managed).deleter {
                deleter(self.managed);
            }
        }
    }
}
