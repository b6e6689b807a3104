//! The CUDA launcher: `kernels/sha256d.cu` compiled by NVRTC for the device's own compute
//! capability and launched on a stream of its own. It uses its own `CudaContext` handle on
//! the device's primary context (the one candle serves on): a second stream made on candle's
//! handle would switch candle to multi-stream event tracking on every op. The stop word lives
//! in host-mapped pinned memory (`cuMemHostAlloc` with DEVICEMAP | PORTABLE), so a raise on
//! the host is seen by the running kernel at its next checkpoint with no copy or launch.
//! Its stream has the device's lowest priority, so inference blocks are scheduled first. The
//! kernel is loaded as the cubin NVRTC makes ([`super::nvrtc`]), PTX only as the fallback.
//! Everything but these calls is in the shared miner code, tested on the CPU stand-in.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc;
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::job::GpuJob;
use super::launcher::{Geometry, Launch, LaunchError, LaunchResult, ScanLauncher};
use super::nvrtc::{self, ImageKind};
use crate::mining::HostWord;

/// The kernel's source, built into the binary: NVRTC compiles it where it runs.
pub const KERNEL_SOURCE: &str = include_str!("../../../kernels/sha256d.cu");

// SAFETY: `GpuJob` is `#[repr(C)]` of 23 `u32`s, the layout of the kernel's `struct Job`.
unsafe impl DeviceRepr for GpuJob {}

/// How the grid is sized, and which image of the kernel is loaded.
#[derive(Debug, Clone)]
pub struct CudaConfig {
    pub threads_per_block: u32,
    /// Blocks per multiprocessor; `None`: as many as the kernel's registers allow.
    pub blocks_per_sm: Option<u32>,
    /// The cubin NVRTC made (PTX if the driver refuses it), or PTX first.
    pub image: ImageKind,
}

impl Default for CudaConfig {
    fn default() -> Self {
        Self {
            threads_per_block: 256,
            blocks_per_sm: None,
            image: ImageKind::preferred(),
        }
    }
}

/// What NVRTC and the device said, for logs and `gpu-check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelInfo {
    pub device: String,
    pub compute_capability: String,
    pub multiprocessors: u32,
    pub clock_mhz: f64,
    pub total_memory_mib: u64,
    pub compile_ms: f64,
    /// The image loaded (`cubin`, or `ptx`), and why it is not the one asked for, if not.
    pub image: ImageKind,
    pub image_fallback: Option<String>,
    pub nvrtc_version: String,
    /// The driver's CUDA version (`cuDriverGetVersion`), `major.minor`.
    pub driver_version: Option<String>,
    pub registers: i32,
    pub spill_bytes: i32,
    pub blocks_per_sm: u32,
    pub blocks: u32,
    pub threads_per_block: u32,
}

fn driver(e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Driver(e.to_string())
}

/// A word of host-mapped pinned memory: the host writes it, the kernel reads it over the bus.
struct MappedWord {
    ctx: Arc<CudaContext>,
    host: *mut std::ffi::c_void,
    device: sys::CUdeviceptr,
}

// SAFETY: the allocation is process-wide (PORTABLE) and only ever accessed as an atomic.
unsafe impl Send for MappedWord {}
unsafe impl Sync for MappedWord {}

impl MappedWord {
    fn new(ctx: &Arc<CudaContext>) -> Result<Self, LaunchError> {
        ctx.bind_to_thread().map_err(driver)?;
        let mut host = std::ptr::null_mut();
        // SAFETY: plain driver calls with valid out-pointers, the context current. Once the
        // allocation exists it is owned by `word`, whose drop frees it on any later error.
        unsafe {
            sys::cuMemHostAlloc(
                &mut host,
                std::mem::size_of::<u32>(),
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
            .result()
            .map_err(driver)?;
            let mut word = Self {
                ctx: ctx.clone(),
                host,
                device: 0,
            };
            word.word().store(0, std::sync::atomic::Ordering::SeqCst);
            sys::cuMemHostGetDevicePointer_v2(&mut word.device, host, 0)
                .result()
                .map_err(driver)?;
            Ok(word)
        }
    }
}

impl HostWord for MappedWord {
    fn word(&self) -> &AtomicU32 {
        // SAFETY: `host` is a live, 4-byte aligned allocation of at least 4 bytes, accessed
        // only atomically on the host.
        unsafe { &*(self.host as *const AtomicU32) }
    }
}

impl Drop for MappedWord {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc above; the launcher that could use it on the
            // device holds an Arc to it, so no kernel is running with it any more.
            unsafe {
                let _ = sys::cuMemFreeHost(self.host);
            }
        }
    }
}

/// Loads the image `want` names, or the other one when the driver refuses it: the module,
/// which image it is, and why it is not the one asked for (if not).
fn load(
    ctx: &Arc<CudaContext>,
    compiled: &nvrtc::Compiled,
    want: ImageKind,
) -> Result<(Arc<cudarc::driver::CudaModule>, ImageKind, Option<String>), LaunchError> {
    let (kind, bytes) = compiled
        .image(want)
        .ok_or_else(|| LaunchError::Compile("no image to load".into()))?;
    let first = ctx.load_module(Ptx::from_binary(bytes.to_vec()));
    let why_not = (kind != want).then(|| format!("NVRTC gave no {want:?}"));
    let refused = match first {
        Ok(m) => return Ok((m, kind, why_not)),
        Err(e) => e,
    };
    let other = match kind {
        ImageKind::Cubin => ImageKind::Ptx,
        ImageKind::Ptx => ImageKind::Cubin,
    };
    let Some((_, bytes)) = compiled.image(other).filter(|(k, _)| *k == other) else {
        return Err(driver(refused));
    };
    tracing::warn!(error = %refused, "the driver refused the {kind:?} image; loading the {other:?}");
    let m = ctx
        .load_module(Ptx::from_binary(bytes.to_vec()))
        .map_err(driver)?;
    Ok((
        m,
        other,
        Some(format!("the driver refused the {kind:?}: {refused}")),
    ))
}

/// The driver's CUDA version, `major.minor` (`None` where the driver does not answer).
pub fn driver_version() -> Option<String> {
    let mut v = 0i32;
    // SAFETY: a valid out-pointer.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::cudaError_enum::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

pub struct CudaLauncher {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    func: CudaFunction,
    geometry: Geometry,
    capacity: u32,
    out: CudaSlice<u32>,
    resume: CudaSlice<u32>,
    progress: CudaSlice<u32>,
    stop: Arc<MappedWord>,
    in_flight: Option<CudaEvent>,
    info: KernelInfo,
}

impl CudaLauncher {
    /// Compiles the kernel for GPU `ordinal`, loads it, and sizes the grid to fill it.
    pub fn new(ordinal: usize, cfg: CudaConfig) -> Result<Self, LaunchError> {
        let ctx = CudaContext::new(ordinal).map_err(|e| LaunchError::NoDevice(e.to_string()))?;
        // This handle's slices are used by one stream only: no per-op event bookkeeping.
        // SAFETY: nothing has been allocated on this handle yet.
        unsafe { ctx.disable_event_tracking() };
        // The lowest priority the device has: when an inference block and a scan block are
        // both waiting for a multiprocessor, the inference block is scheduled first.
        ctx.bind_to_thread().map_err(driver)?;
        let (least, _greatest) =
            cudarc::driver::result::stream::get_priority_range().map_err(driver)?;
        let stream = ctx.new_stream_with_priority(least).map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let started = Instant::now();
        let compiled = nvrtc::compile(KERNEL_SOURCE, "sha256d.cu", &format!("sm_{major}{minor}"))?;
        let (module, image, image_fallback) = load(&ctx, &compiled, cfg.image)?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let func = module.load_function("sha256d_scan").map_err(driver)?;
        let attr = |a| ctx.attribute(a).map_err(driver);
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let clock_khz = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?;
        let tpb = cfg.threads_per_block.clamp(32, 1024);
        let per_sm = match cfg.blocks_per_sm {
            Some(n) => n.max(1),
            None => func
                .occupancy_max_active_blocks_per_multiprocessor(tpb, 0, None)
                .map_err(driver)?
                .max(1),
        };
        let geometry = Geometry {
            blocks: sms * per_sm,
            threads_per_block: tpb,
        };
        // One whole wave of the grid always fits: an overflow can only come from waves
        // beyond the first after a launch starts, so every rescan makes progress.
        let capacity = geometry.threads().max(1 << 16);
        let out = stream
            .alloc_zeros::<u32>(capacity as usize + 1)
            .map_err(driver)?;
        let resume = stream
            .alloc_zeros::<u32>(geometry.blocks as usize)
            .map_err(driver)?;
        let progress = stream
            .alloc_zeros::<u32>(geometry.blocks as usize)
            .map_err(driver)?;
        let stop = Arc::new(MappedWord::new(&ctx)?);
        let info = KernelInfo {
            device: ctx.name().map_err(driver)?,
            compute_capability: format!("{major}.{minor}"),
            multiprocessors: sms,
            clock_mhz: f64::from(clock_khz) / 1e3,
            total_memory_mib: (ctx.total_mem().map_err(driver)? >> 20) as u64,
            compile_ms,
            image,
            image_fallback,
            nvrtc_version: compiled.nvrtc_version.clone(),
            driver_version: driver_version(),
            registers: func.num_regs().map_err(driver)?,
            spill_bytes: func.local_size_bytes().map_err(driver)?,
            blocks_per_sm: per_sm,
            blocks: geometry.blocks,
            threads_per_block: tpb,
        };
        tracing::info!(?info, "CUDA scan kernel compiled");
        Ok(Self {
            ctx,
            stream,
            func,
            geometry,
            capacity,
            out,
            resume,
            progress,
            stop,
            in_flight: None,
            info,
        })
    }

    pub fn info(&self) -> &KernelInfo {
        &self.info
    }
}

impl ScanLauncher for CudaLauncher {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn stop_word(&self) -> Arc<dyn HostWord> {
        self.stop.clone()
    }

    fn launch(&mut self, l: &Launch<'_>) -> Result<(), LaunchError> {
        l.check(self.geometry, self.in_flight.is_some())?;
        self.ctx.bind_to_thread().map_err(driver)?;
        self.stream
            .memcpy_htod(l.resume, &mut self.resume)
            .map_err(driver)?;
        self.stream
            .memcpy_htod(&[0u32], &mut self.out.slice_mut(0..1))
            .map_err(driver)?;
        let (job, cap, stop) = (*l.job, self.capacity, self.stop.device);
        let every = l.every.max(1);
        let cfg = LaunchConfig {
            grid_dim: (self.geometry.blocks, 1, 1),
            block_dim: (self.geometry.threads_per_block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.func);
        b.arg(&job)
            .arg(&l.start)
            .arg(&l.last)
            .arg(&l.end_wave)
            .arg(&self.resume)
            .arg(&every)
            .arg(&mut self.out)
            .arg(&cap)
            .arg(&stop)
            .arg(&mut self.progress);
        // SAFETY: the arguments match the kernel's signature in order and type (GpuJob is the
        // kernel's struct Job; the buffers hold 1 + cap, blocks and blocks words).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        let done = self.stream.record_event(None).map_err(driver)?;
        self.in_flight = Some(done);
        Ok(())
    }

    fn poll(&mut self) -> Result<bool, LaunchError> {
        match &self.in_flight {
            Some(ev) => ev.try_is_complete().map_err(driver),
            None => Err(LaunchError::Misuse("no launch in flight")),
        }
    }

    fn finish(&mut self) -> Result<LaunchResult, LaunchError> {
        let ev = self
            .in_flight
            .take()
            .ok_or(LaunchError::Misuse("no launch in flight"))?;
        ev.synchronize().map_err(driver)?;
        let mut found = [0u32];
        self.stream
            .memcpy_dtoh(&self.out.slice(0..1), &mut found)
            .map_err(driver)?;
        let kept = found[0].min(self.capacity) as usize;
        let mut candidates = vec![0u32; kept];
        if kept > 0 {
            self.stream
                .memcpy_dtoh(&self.out.slice(1..1 + kept), &mut candidates)
                .map_err(driver)?;
        }
        let mut progress = vec![0u32; self.geometry.blocks as usize];
        self.stream
            .memcpy_dtoh(&self.progress, &mut progress)
            .map_err(driver)?;
        self.stream.synchronize().map_err(driver)?;
        Ok(LaunchResult {
            progress,
            candidates,
            found: found[0],
        })
    }
}

impl Drop for CudaLauncher {
    fn drop(&mut self) {
        if let Some(ev) = self.in_flight.take() {
            self.stop
                .word()
                .store(1, std::sync::atomic::Ordering::SeqCst);
            let _ = ev.synchronize();
        }
    }
}
