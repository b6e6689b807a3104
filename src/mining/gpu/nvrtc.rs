//! The scan kernel compiled by NVRTC, called directly rather than through cudarc's
//! `compile_ptx`, because that gives PTX only. For a real architecture (`sm_90`) NVRTC makes
//! the cubin itself: loading it skips the driver's JIT (so `compile_ms` is the whole cost) and
//! cannot fail with `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`, which PTX does when the `libnvrtc`
//! found at run time is newer than the driver. The PTX is kept as the fallback, for a driver
//! that refuses the cubin. Compiling needs no GPU: this runs, and is tested, on any machine
//! with `libnvrtc`.

use std::ffi::{c_char, CString};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::nvrtc::sys;

use super::launcher::LaunchError;

/// What the launcher loads: the cubin when NVRTC made one, unless PTX is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Cubin,
    Ptx,
}

impl ImageKind {
    /// `IDLERIG_KERNEL_IMAGE=ptx` forces the PTX path (to test the fallback on a GPU).
    pub fn preferred() -> Self {
        match std::env::var("IDLERIG_KERNEL_IMAGE").as_deref() {
            Ok("ptx") => ImageKind::Ptx,
            _ => ImageKind::Cubin,
        }
    }
}

/// One compilation's outputs.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The device code for the architecture asked for; `None` if NVRTC gave none.
    pub cubin: Option<Vec<u8>>,
    /// The PTX, NUL-terminated as the driver's loader wants it.
    pub ptx: Option<Vec<u8>>,
    pub compile_ms: f64,
    /// NVRTC's own version, `major.minor`.
    pub nvrtc_version: String,
}

impl Compiled {
    /// The image to load for `want`, and which it is: the cubin, or the PTX when it is asked
    /// for or there is no cubin.
    pub fn image(&self, want: ImageKind) -> Option<(ImageKind, &[u8])> {
        let cubin = self.cubin.as_deref().map(|c| (ImageKind::Cubin, c));
        let ptx = self.ptx.as_deref().map(|p| (ImageKind::Ptx, p));
        match want {
            ImageKind::Cubin => cubin.or(ptx),
            ImageKind::Ptx => ptx.or(cubin),
        }
    }
}

fn check(what: &str, r: sys::nvrtcResult) -> Result<(), LaunchError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(LaunchError::Compile(format!("{what}: {r:?}")))
    }
}

/// NVRTC's version, `major.minor`, or NVRTC's error. (The build links `libnvrtc`: where it
/// is missing, the binary does not start at all, and `scripts/gpu-check` says which library
/// it could not find.)
pub fn version() -> Result<String, LaunchError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    check("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok(format!("{major}.{minor}"))
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once, here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

impl Program {
    /// One of NVRTC's size-then-copy outputs; `None` when it has none (size 0, or an error).
    fn output(
        &self,
        size: unsafe fn(sys::nvrtcProgram, *mut usize) -> sys::nvrtcResult,
        copy: unsafe fn(sys::nvrtcProgram, *mut c_char) -> sys::nvrtcResult,
    ) -> Option<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: a live program and a valid out-pointer.
        if unsafe { size(self.0, &mut n) } != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
            return None;
        }
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` holds the `n` bytes NVRTC said it would write.
        let r = unsafe { copy(self.0, buf.as_mut_ptr().cast()) };
        (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some(buf)
    }
}

/// Compiles `source` (its file name `name`, for NVRTC's messages) for `arch` (`sm_90`): the
/// cubin and the PTX, or NVRTC's log when the source does not compile.
pub fn compile(source: &str, name: &str, arch: &str) -> Result<Compiled, LaunchError> {
    let nvrtc_version = version()?;
    let started = Instant::now();
    let src = CString::new(source).map_err(|e| LaunchError::Compile(e.to_string()))?;
    let name = CString::new(name).map_err(|e| LaunchError::Compile(e.to_string()))?;
    let mut prog = Program(std::ptr::null_mut());
    // SAFETY: valid NUL-terminated strings that outlive the call, no headers.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(
            &mut prog.0,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    })?;
    let opts = [format!("--gpu-architecture={arch}")]
        .map(|o| CString::new(o).expect("no NUL in an option"));
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: a live program and `ptrs.len()` valid option strings.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, ptrs.len() as i32, ptrs.as_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        let log = prog
            .output(sys::nvrtcGetProgramLogSize, sys::nvrtcGetProgramLog)
            .map(|l| {
                String::from_utf8_lossy(&l)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_default();
        return Err(LaunchError::Compile(format!("{r:?}: {log}")));
    }
    let cubin = prog.output(sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN);
    let ptx = prog.output(sys::nvrtcGetPTXSize, sys::nvrtcGetPTX);
    if cubin.is_none() && ptx.is_none() {
        return Err(LaunchError::Compile(
            "NVRTC compiled the kernel but gave neither a cubin nor PTX".into(),
        ));
    }
    Ok(Compiled {
        cubin,
        ptx,
        compile_ms: started.elapsed().as_secs_f64() * 1e3,
        nvrtc_version,
    })
}
