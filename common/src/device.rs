//! The compute backends splitee can run on, named for command lines and config files.
//!
//! Binaries turn a [`BackendChoice`] into a burn [`Device`] once, at start-up; everything
//! below them takes `&Device` and never names a backend.
//!
//! * [`BackendChoice::select`] is how a binary does it, with its policy for a backend that
//!   cannot run here ([`WhenUnavailable`]): fall back to the flex CPU backend and say why (the
//!   edge agent), or refuse and say why (the cloud worker, the offline tools). `wgpu` is
//!   unusable without a GPU adapter (no Vulkan driver, no adapter, device creation refused),
//!   and a software rasterizer such as Mesa's lavapipe counts as none unless
//!   [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1`.
//! * [`BackendChoice::device`] is the bare backend, for tests and benchmarks: the backend
//!   asked for (any wgpu adapter, software included), or why this build or machine cannot
//!   provide it.
//!
//! The wgpu adapter is probed once per process, without panicking: burn's
//! `Device::wgpu_options().init_with_setup()` acquires the adapter and the logical device
//! and returns cubecl's `WgpuInitError` instead of panicking on first use, as the lazy
//! `Device::wgpu(..)` would.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// Set to `1` to let [`BackendChoice::select`] use a software rasterizer (Mesa's
/// lavapipe/llvmpipe, WARP) as the wgpu adapter. Off by default: on a CPU, flex is faster
/// (docs/performance.md).
pub const ALLOW_SOFTWARE_ADAPTER_ENV: &str = "SPLITEE_WGPU_ALLOW_SOFTWARE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// burn's pure-Rust CPU backend; the default because it measured fastest here
    /// (docs/performance.md).
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

    /// The device a binary runs on, by the binary's policy for a backend that cannot run here
    /// (the one selection function; each binary states its policy once). A software
    /// rasterizer counts as no GPU unless [`ALLOW_SOFTWARE_ADAPTER_ENV`] is `1`. Logs the
    /// outcome a user needs to see: a fallback (warn) and the GPU adapter chosen (info).
    pub fn select(self, policy: WhenUnavailable) -> Result<SelectedDevice, String> {
        let selected = self.select_with(policy, software_adapter_allowed());
        match &selected {
            Ok(SelectedDevice {
                fell_back_because: Some(why),
                ..
            }) => tracing::warn!("{why}"),
            Ok(SelectedDevice {
                backend: BackendChoice::Wgpu,
                ..
            }) => {
                if let Ok(adapter) = gpu_adapter() {
                    tracing::info!(%adapter, "computing on the GPU");
                }
            }
            _ => {}
        }
        selected
    }

    /// [`Self::select`] with the software-rasterizer rule given instead of read from the
    /// environment, and nothing logged.
    pub fn select_with(
        self,
        policy: WhenUnavailable,
        allow_software_adapter: bool,
    ) -> Result<SelectedDevice, String> {
        let usable = match self {
            Self::Wgpu => usable_gpu_adapter(allow_software_adapter).map(|_| wgpu_device()),
            cpu => cpu.device(),
        };
        match (usable, policy) {
            (Ok(device), _) => Ok(SelectedDevice {
                device,
                backend: self,
                fell_back_because: None,
            }),
            (Err(why), WhenUnavailable::Refuse) => Err(why),
            (Err(why), WhenUnavailable::FallBackToCpu) => Ok(SelectedDevice {
                device: Device::flex(),
                backend: Self::Flex,
                fell_back_because: Some(format!("{why}; falling back to the flex CPU backend")),
            }),
        }
    }
}

/// What a binary does when the backend it is asked for cannot run here. Each binary states
/// its choice once, as a constant next to its entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnavailable {
    /// Run on the flex CPU backend and say why: a device in the field should answer slowly
    /// rather than not at all (the edge agent).
    FallBackToCpu,
    /// Do not start, and say why: a service sized for a GPU, or a long offline run, must not
    /// quietly run many times slower (the cloud worker, the offline tools).
    Refuse,
}

/// The device [`BackendChoice::select`] settled on.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    /// The backend actually used: the one asked for, or flex after a fallback.
    pub backend: BackendChoice,
    /// Why it fell back, when it did.
    pub fell_back_because: Option<String>,
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
            "this build has no GPU support: rebuild with `--features splitee-model/wgpu` \
             (or `--features wgpu` for the splitee-model crate itself)"
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

    /// `(backend used, why it fell back)` under the fallback policy.
    fn fall_back(choice: BackendChoice, allow_software: bool) -> (BackendChoice, Option<String>) {
        let selected = choice
            .select_with(WhenUnavailable::FallBackToCpu, allow_software)
            .expect("falling back never fails");
        (selected.backend, selected.fell_back_because)
    }

    #[test]
    fn cpu_backends_never_fall_back() {
        for choice in [BackendChoice::Flex, BackendChoice::Ndarray] {
            assert_eq!(fall_back(choice, false), (choice, None));
        }
    }

    /// Without the feature, or on a machine with no adapter, wgpu falls back to flex and says
    /// why; with an adapter (real, or software when allowed) it is used.
    #[test]
    fn wgpu_falls_back_to_flex_with_a_reason_or_runs_on_an_adapter() {
        let (used, why) = fall_back(BackendChoice::Wgpu, true);
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
        let (used, why) = fall_back(BackendChoice::Wgpu, false);
        let refused = BackendChoice::Wgpu.select_with(WhenUnavailable::Refuse, false);
        if gpu_adapter().is_ok_and(|adapter| adapter.software) {
            assert_eq!(used, BackendChoice::Flex);
            let why = why.unwrap();
            println!("fell back: {why}");
            assert!(why.contains(ALLOW_SOFTWARE_ADAPTER_ENV), "{why}");
            let refused = refused.err().expect("a software adapter is refused");
            assert!(refused.contains(ALLOW_SOFTWARE_ADAPTER_ENV), "{refused}");
            assert!(!refused.contains("falling back"), "{refused}");
            assert!(
                BackendChoice::Wgpu
                    .select_with(WhenUnavailable::Refuse, true)
                    .is_ok()
            );
        }
    }

    /// Refusing never substitutes another backend: the CPU ones are what they are, and wgpu is
    /// either wgpu or an error saying why not.
    #[test]
    fn refusing_gives_the_backend_asked_for_or_why_not() {
        for choice in [BackendChoice::Flex, BackendChoice::Ndarray] {
            let selected = choice.select_with(WhenUnavailable::Refuse, false).unwrap();
            assert_eq!(
                (selected.backend, selected.fell_back_because),
                (choice, None)
            );
        }
        match (
            gpu_adapter(),
            BackendChoice::Wgpu.select_with(WhenUnavailable::Refuse, true),
        ) {
            (Ok(_), Ok(selected)) => assert_eq!(selected.backend, BackendChoice::Wgpu),
            (Err(reason), Err(why)) => {
                assert!(
                    why.contains(&reason) && why.contains("wgpu unavailable"),
                    "{why}"
                )
            }
            (adapter, device) => panic!(
                "probe {adapter:?} and refusal {:?} disagree",
                device.map(|selected| selected.backend)
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
