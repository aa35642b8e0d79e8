//! The compute backends splitee can run on, named for command lines and config files.
//!
//! Binaries turn a [`BackendChoice`] into a burn [`Device`] once, at start-up; everything
//! below them takes `&Device` and never names a backend.
//!
//! Two ways to do that:
//!
//! * [`BackendChoice::device`] is strict: the backend asked for, or an error saying why this
//!   build or this machine cannot provide it.
//! * [`BackendChoice::device_or_refuse`] is as strict, and also refuses a software rasterizer
//!   unless [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1`: the cloud worker's choice.
//! * [`BackendChoice::device_with_fallback`] never fails: asked for `wgpu` where there is no
//!   usable GPU adapter (no Vulkan driver, no adapter, device creation refused, or — unless
//!   [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1` — only a software rasterizer such as Mesa's
//!   lavapipe), it hands back the flex CPU backend and the reason, for the binary to print.
//!
//! The wgpu adapter is probed once per process, without panicking: burn's
//! `Device::wgpu_options().init_with_setup()` acquires the adapter and the logical device
//! and returns cubecl's `WgpuInitError` instead of panicking on first use, as the lazy
//! `Device::wgpu(..)` would.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// Set to `1` to let [`BackendChoice::device_with_fallback`] use a software rasterizer (Mesa's
/// lavapipe/llvmpipe, WARP) as the wgpu adapter. Off by default: on a CPU, flex is faster (README,
/// "Performance").
pub const ALLOW_SOFTWARE_ADAPTER_ENV: &str = "SPLITEE_WGPU_ALLOW_SOFTWARE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// burn's pure-Rust CPU backend; the default because it measured fastest here (README,
    /// "Performance").
    #[default]
    Flex,
    /// burn's ndarray CPU backend (deprecated upstream, kept for comparison and old boards).
    Ndarray,
    /// A GPU through wgpu (Vulkan, Metal, DX12), when built with the `wgpu` feature.
    Wgpu,
}

/// The adapter wgpu settled on, as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAdapter {
    /// The driver's name for it, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)` or `NVIDIA Tegra Orin`.
    pub name: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` or `Other`, as wgpu reports it.
    pub kind: String,
    /// The graphics API: `Vulkan`, `Metal`, `Dx12`, `Gl`.
    pub api: String,
    /// Driver name and version, e.g. `llvmpipe Mesa 22.3.6 (LLVM 15.0.6)`.
    pub driver: String,
    /// A software rasterizer running on the CPU (lavapipe, llvmpipe, WARP).
    pub software: bool,
}

impl fmt::Display for GpuAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.kind, self.api)?;
        if !self.driver.trim().is_empty() {
            write!(f, ", driver {}", self.driver.trim())?;
        }
        f.write_str(")")
    }
}

impl BackendChoice {
    pub const ALL: [BackendChoice; 3] = [Self::Flex, Self::Ndarray, Self::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
        }
    }

    /// The burn device, or an explanation of why this build or machine cannot provide it.
    ///
    /// For `wgpu` this probes for an adapter (once per process) and accepts any, software
    /// rasterizers included: asking for wgpu by name is asking for it.
    pub fn device(self) -> Result<Device, String> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[allow(deprecated)] // ndarray is deprecated upstream; we still offer it by choice
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Wgpu => gpu_adapter().map(|_| wgpu_device()),
        }
    }

    /// The device to run on, never failing: `wgpu` without a usable GPU adapter falls back to
    /// flex. Returns the device, the backend actually used, and why it fell back (`None` when
    /// it did not), for the binary to print.
    ///
    /// A software rasterizer counts as unusable unless [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1`.
    pub fn device_with_fallback(self) -> (Device, BackendChoice, Option<String>) {
        self.device_with_fallback_policy(software_adapter_allowed())
    }

    /// The device asked for, or why it is not usable here — never another one. Like
    /// [`Self::device`], but a software rasterizer counts as no adapter unless
    /// [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1`, as in [`Self::device_with_fallback`]. For
    /// services that must not quietly run slower than they were sized for (the cloud worker).
    pub fn device_or_refuse(self) -> Result<Device, String> {
        self.device_or_refuse_policy(software_adapter_allowed())
    }

    /// [`Self::device_or_refuse`] with the software-rasterizer policy given explicitly.
    pub fn device_or_refuse_policy(self, allow_software_adapter: bool) -> Result<Device, String> {
        match self {
            Self::Wgpu => usable_gpu_adapter(allow_software_adapter).map(|_| wgpu_device()),
            cpu => cpu.device(),
        }
    }

    /// [`Self::device_with_fallback`] with the software-rasterizer policy given explicitly
    /// instead of read from the environment.
    pub fn device_with_fallback_policy(
        self,
        allow_software_adapter: bool,
    ) -> (Device, BackendChoice, Option<String>) {
        let fall_back = |why: String| {
            (
                Device::flex(),
                Self::Flex,
                Some(format!("{why}; falling back to the flex CPU backend")),
            )
        };
        match self {
            Self::Wgpu => match usable_gpu_adapter(allow_software_adapter) {
                Err(why) => fall_back(why),
                Ok(_) => (wgpu_device(), Self::Wgpu, None),
            },
            cpu => match cpu.device() {
                Ok(device) => (device, cpu, None),
                Err(why) => fall_back(why),
            },
        }
    }
}

fn software_adapter_allowed() -> bool {
    std::env::var(ALLOW_SOFTWARE_ADAPTER_ENV).is_ok_and(|value| value.trim() == "1")
}

/// [`gpu_adapter`], where a software rasterizer counts as none unless allowed; the error says
/// why there is no usable adapter.
fn usable_gpu_adapter(allow_software_adapter: bool) -> Result<GpuAdapter, String> {
    match gpu_adapter() {
        Err(why) => Err(format!("wgpu unavailable: {why}")),
        Ok(adapter) if adapter.software && !allow_software_adapter => Err(format!(
            "wgpu found only a software rasterizer, {adapter}, which is slower than the CPU \
             backends (set {ALLOW_SOFTWARE_ADAPTER_ENV}=1 to use it anyway)"
        )),
        Ok(adapter) => Ok(adapter),
    }
}

/// The GPU adapter this process runs wgpu on, or why there is none. Probed once per process
/// (acquiring the adapter and creating the logical device, which then serves every
/// `Device::wgpu(DeviceKind::DefaultDevice)`); later calls return the same answer.
///
/// The adapter is wgpu's default choice: a real GPU before a software one, and
/// `CUBECL_WGPU_DEFAULT_DEVICE` (e.g. `IntegratedGpu(0)`, `Cpu`) overrides it.
pub fn gpu_adapter() -> Result<GpuAdapter, String> {
    #[cfg(feature = "wgpu")]
    {
        static PROBE: std::sync::OnceLock<Result<GpuAdapter, String>> = std::sync::OnceLock::new();
        PROBE.get_or_init(probe_gpu).clone()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        Err(
            "this build has no GPU support: rebuild with `--features splitee-common/wgpu` \
             (or `--features wgpu` for the splitee-common crate itself)"
                .to_owned(),
        )
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Device {
    unreachable!("gpu_adapter() is always an error without the wgpu feature")
}

#[cfg(feature = "wgpu")]
fn probe_gpu() -> Result<GpuAdapter, String> {
    use burn::tensor::wgpu::{WgpuInitError, wgpu::DeviceType};

    // wgpu and the drivers below it report failures as errors, but a broken driver can still
    // panic inside them; that must not take the binary down before it can fall back.
    let acquired = std::panic::catch_unwind(|| {
        Device::wgpu_options()
            .device_kind(DeviceKind::DefaultDevice)
            .init_with_setup()
    });
    let setup = match acquired {
        Ok(Ok((_, setup))) => setup,
        // The default device was already brought up (by a tensor operation on
        // `Device::wgpu(DefaultDevice)` before this probe): an adapter exists, but its
        // handles are not ours to read; describe what wgpu lists instead.
        Ok(Err(WgpuInitError::Registration { message })) => {
            return Ok(GpuAdapter {
                name: format!("already-initialised wgpu default device ({message})"),
                kind: "unknown".into(),
                api: "unknown".into(),
                driver: String::new(),
                software: false,
            });
        }
        Ok(Err(error)) => return Err(no_adapter_hint(error.to_string())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            return Err(no_adapter_hint(format!(
                "the wgpu runtime panicked while acquiring an adapter: {message}"
            )));
        }
    };
    let info = setup.adapter.get_info();
    Ok(GpuAdapter {
        name: info.name.clone(),
        kind: format!("{:?}", info.device_type),
        api: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info),
        software: info.device_type == DeviceType::Cpu,
    })
}

/// The error, plus what usually fixes it on Linux.
#[cfg(feature = "wgpu")]
fn no_adapter_hint(error: String) -> String {
    if cfg!(target_os = "linux") {
        format!(
            "{error} (is a Vulkan driver installed? `vulkaninfo --summary` lists the adapters; \
             Debian/Ubuntu: mesa-vulkan-drivers, Jetson: the NVIDIA L4T driver)"
        )
    } else {
        error
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?} (expected flex, ndarray or wgpu)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_backends_never_fall_back() {
        for choice in [BackendChoice::Flex, BackendChoice::Ndarray] {
            let (_, used, why) = choice.device_with_fallback_policy(false);
            assert_eq!(used, choice);
            assert_eq!(why, None);
        }
    }

    /// Without the feature, or on a machine with no adapter, wgpu falls back to flex and says
    /// why; with an adapter (real, or software when allowed) it is used.
    #[test]
    fn wgpu_falls_back_to_flex_with_a_reason_or_runs_on_an_adapter() {
        let (_, used, why) = BackendChoice::Wgpu.device_with_fallback_policy(true);
        match gpu_adapter() {
            Ok(adapter) => {
                assert_eq!(used, BackendChoice::Wgpu, "adapter {adapter}");
                assert_eq!(why, None);
            }
            Err(reason) => {
                assert_eq!(used, BackendChoice::Flex);
                let why = why.expect("a fallback always says why");
                println!("fell back: {why}");
                assert!(why.contains(&reason) && why.contains("flex"), "{why}");
                assert!(BackendChoice::Wgpu.device().is_err());
            }
        }
    }

    #[test]
    fn a_software_adapter_is_refused_unless_allowed() {
        let (_, used, why) = BackendChoice::Wgpu.device_with_fallback_policy(false);
        let refused = BackendChoice::Wgpu.device_or_refuse_policy(false);
        if gpu_adapter().is_ok_and(|adapter| adapter.software) {
            assert_eq!(used, BackendChoice::Flex);
            let why = why.unwrap();
            println!("fell back: {why}");
            assert!(why.contains(ALLOW_SOFTWARE_ADAPTER_ENV), "{why}");
            let refused = refused.err().expect("a software adapter is refused");
            assert!(refused.contains(ALLOW_SOFTWARE_ADAPTER_ENV), "{refused}");
            assert!(!refused.contains("falling back"), "{refused}");
            assert!(BackendChoice::Wgpu.device_or_refuse_policy(true).is_ok());
        }
    }

    /// Refusing never substitutes another backend: the CPU ones are what they are, and wgpu is
    /// either wgpu or an error saying why not.
    #[test]
    fn refusing_gives_the_backend_asked_for_or_why_not() {
        for choice in [BackendChoice::Flex, BackendChoice::Ndarray] {
            assert!(choice.device_or_refuse_policy(false).is_ok());
        }
        match (
            gpu_adapter(),
            BackendChoice::Wgpu.device_or_refuse_policy(true),
        ) {
            (Ok(_), Ok(_)) => {}
            (Err(reason), Err(why)) => {
                assert!(
                    why.contains(&reason) && why.contains("wgpu unavailable"),
                    "{why}"
                )
            }
            (adapter, device) => panic!(
                "probe {adapter:?} and refusal {:?} disagree",
                device.map(|_| "a device")
            ),
        }
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn without_the_feature_the_error_says_how_to_rebuild() {
        let error = BackendChoice::Wgpu.device().unwrap_err();
        assert!(error.contains("--features"), "{error}");
    }
}
