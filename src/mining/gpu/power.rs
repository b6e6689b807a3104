//! The GPU's power for the earnings estimate. A SHA-256d kernel at full occupancy runs the
//! board at its power limit, so the estimate takes NVML's enforced limit for GPU `ordinal`.
//! NVML is the driver's library, loaded at run time: a machine or build without it falls back
//! to [`FALLBACK_WATTS`], and `--mining-watts` overrides either.

/// Watts assumed for a mining GPU when NVML cannot say (an H100 PCIe's limit).
pub const FALLBACK_WATTS: f64 = 350.0;

/// The board power the miner will draw on GPU `ordinal`, and where the figure came from.
pub fn mining_watts(ordinal: usize) -> (f64, &'static str) {
    match nvml_power_limit(ordinal) {
        Some(w) => (w, "nvml power limit"),
        None => (FALLBACK_WATTS, "default (NVML not available)"),
    }
}

#[cfg(feature = "cuda")]
fn nvml_power_limit(ordinal: usize) -> Option<f64> {
    let nvml = nvml_wrapper::Nvml::init()
        .map_err(|e| tracing::warn!(error = %e, "NVML not available"))
        .ok()?;
    let device = nvml.device_by_index(ordinal as u32).ok()?;
    let milliwatts = device.enforced_power_limit().ok()?;
    Some(f64::from(milliwatts) / 1000.0)
}

#[cfg(not(feature = "cuda"))]
fn nvml_power_limit(_ordinal: usize) -> Option<f64> {
    None
}
