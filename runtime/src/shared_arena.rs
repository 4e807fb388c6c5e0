//! One CPU memory arena shared by the sessions of a phase that holds many of them at once
//! (calibration's graph segments).
//!
//! Each ONNX Runtime session owns an arena by default and keeps its peak for the session's
//! life, so eighteen segment sessions would hold eighteen peaks. Without arenas every tensor
//! goes to malloc, which either fragments glibc's heaps (the resident peak climbs sample after
//! sample) or, with large blocks mapped one by one, pays page faults on every tensor of every
//! run (calibration of a 640x640 detector took 1.8x as long). An arena registered on the
//! environment and used by all the segment sessions holds what the largest segment needs, is
//! reused across segments and samples, and is released when the last user lets go.

use std::ffi::{CStr, c_char};
use std::ptr;
use std::sync::Mutex;

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

use crate::error::RuntimeError;

/// How many [`SharedArena`] guards are alive: the arena is registered while any is.
static USERS: Mutex<usize> = Mutex::new(0);

/// While alive, sessions opened with [`crate::CpuMemory::SharedArena`] allocate from one arena
/// registered on the environment. Guards nest and may be held by several threads; the arena
/// is unregistered when the last one drops (sessions still open keep it until they close).
pub struct SharedArena<'e> {
    environment: &'e Environment,
}

impl<'e> SharedArena<'e> {
    pub fn acquire(environment: &'e Environment) -> Result<Self, RuntimeError> {
        let mut users = USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *users == 0 {
            register(environment)?;
        }
        *users += 1;
        Ok(Self { environment })
    }
}

impl Drop for SharedArena<'_> {
    fn drop(&mut self) {
        let mut users = USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *users -= 1;
        if *users == 0
            && let Err(err) = unregister(self.environment)
        {
            tracing::warn!(error = %err, "could not unregister the shared CPU arena");
        }
    }
}

fn arena_memory_info() -> Result<MemoryInfo<'static>, RuntimeError> {
    MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)
        .map_err(|err| RuntimeError::Session(format!("shared CPU arena: {err}")))
}

fn register(environment: &Environment) -> Result<(), RuntimeError> {
    let api = ort::api();
    let info = arena_memory_info()?;
    // Grow by what is asked for rather than by powers of two: the arena's size is what the
    // largest segment needs, not up to twice that.
    let keys: [*const c_char; 1] = [c"arena_extend_strategy".as_ptr()];
    let values: [usize; 1] = [1];
    let mut config = ptr::null_mut();
    // SAFETY: keys and values are valid for the call; `config` receives an owned pointer.
    check(unsafe { (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut config) })?;
    // SAFETY: the environment and memory info are live; ONNX Runtime copies the config.
    let status = unsafe { (api.CreateAndRegisterAllocator)(environment.ptr().cast_mut(), info.ptr(), config) };
    // SAFETY: created above and no longer used.
    unsafe { (api.ReleaseArenaCfg)(config) };
    check(status)
}

fn unregister(environment: &Environment) -> Result<(), RuntimeError> {
    let info = arena_memory_info()?;
    // SAFETY: the environment and memory info are live for the call.
    check(unsafe { (ort::api().UnregisterAllocator)(environment.ptr().cast_mut(), info.ptr()) })
}

/// Turns a C API status into a result, releasing the status.
fn check(status: ort::sys::OrtStatusPtr) -> Result<(), RuntimeError> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status carries a NUL-terminated message owned by the status.
    let message = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }.to_string_lossy().into_owned();
    // SAFETY: the status is owned here and released once.
    unsafe { (api.ReleaseStatus)(status.0) };
    Err(RuntimeError::Session(format!("shared CPU arena: {message}")))
}
