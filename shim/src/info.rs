//! `containerd-shim-sidetunnel-v1 -info`: containerd 2.x asks every runtime
//! for its `RuntimeInfo` (CRI's feature probe at start-up, and before a
//! container with idmapped mounts), writing the runtime options on stdin and
//! reading the protobuf from stdout. The shim answers with its name and
//! version and, as runc's shim does, the OCI runtime's `features` JSON. The
//! containerd-shim 0.11 crate's runner ignores `-info` (it then fails for the
//! missing `TTRPC_ADDRESS`), so the shim handles it before the crate runs.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::config::NodeConfig;
use crate::options::RuntimeOptions;

/// containerd's type URL for the runtime-spec `Features` JSON.
const FEATURES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";
const FEATURES_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles `-info`; returns the process exit code.
pub fn main(runtime_id: &str) -> i32 {
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut raw) {
        eprintln!("{runtime_id}: read runtime options: {e}");
        return 1;
    }
    let opts = match RuntimeOptions::from_any_bytes(&raw) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{runtime_id}: {e}");
            return 1;
        }
    };
    let binary = opts.binary_name.clone().unwrap_or_else(|| {
        NodeConfig::load(&NodeConfig::path(opts.config_path.as_deref()))
            .map_or_else(|_| "runc".to_owned(), |n| n.runtime.binary)
    });
    let info = RuntimeInfo {
        name: runtime_id.to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        }),
        features: features(&binary)
            .map(|json| Any {
                type_url: FEATURES_TYPE.to_owned(),
                value: json,
                ..Default::default()
            })
            .into(),
        ..Default::default()
    };
    let bytes = match info.write_to_bytes() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{runtime_id}: encode RuntimeInfo: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{runtime_id}: write RuntimeInfo: {e}");
            1
        }
    }
}

/// `<binary> features` output when it is a JSON object (crun before 1.9 and
/// runc before 1.1 have no such command: then no features are reported).
fn features(binary: &str) -> Option<Vec<u8>> {
    let mut child = Command::new(binary)
        .arg("features")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + FEATURES_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().ok()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut json = Vec::new();
    child.stdout.take()?.read_to_end(&mut json).ok()?;
    let is_object = serde_json::from_slice::<serde_json::Value>(&json).is_ok_and(|v| v.is_object());
    (status.success() && is_object).then_some(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runtime_has_no_features() {
        assert_eq!(features("/nonexistent/runc"), None);
        // Exits 0 without JSON.
        assert_eq!(features("true"), None);
    }
}
