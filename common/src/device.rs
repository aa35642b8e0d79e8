//! The compute backends splitee can run on, named for command lines and config files.
//!
//! Binaries turn a [`BackendChoice`] into a burn [`Device`] once, at start-up; everything
//! below them takes `&Device` and never names a backend.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

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

impl BackendChoice {
    pub const ALL: [BackendChoice; 3] = [Self::Flex, Self::Ndarray, Self::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
        }
    }

    /// The burn device, or an explanation of why this build cannot provide it.
    pub fn device(self) -> Result<Device, String> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[allow(deprecated)] // ndarray is deprecated upstream; we still offer it by choice
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Wgpu => wgpu_device(),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, String> {
    Ok(Device::wgpu(DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, String> {
    Err("this build has no GPU support: rebuild with `--features wgpu`".to_owned())
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
