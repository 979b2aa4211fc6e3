//! Reads OCI bundles for the shim: tells a pod sandbox from an app container by
//! CRI annotations (containerd and CRI-O) and extracts pod information and
//! per-pod settings.
//!
//! ```no_run
//! # fn main() -> Result<(), sidetunnel_oci::Error> {
//! match sidetunnel_oci::classify_bundle(std::path::Path::new("/run/bundle"))? {
//!     sidetunnel_oci::Role::Sandbox(pod) if !pod.host_network => {
//!         let _settings = pod.settings()?;
//!     }
//!     _ => {}
//! }
//! # Ok(()) }
//! ```

mod cgroup;
mod error;
pub mod keys;
mod pod;
pub mod settings;
mod spec;

pub use cgroup::CgroupsPath;
pub use error::{Error, Result};
pub use pod::{ContainerInfo, CriRuntime, PodInfo, Role, classify, classify_bundle};
pub use settings::PodSettings;
pub use spec::{Linux, MAX_SPEC_BYTES, Namespace, Root, Spec};
