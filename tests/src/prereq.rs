//! Prerequisite gates. Outside CI a test whose prerequisite is missing skips
//! with a printed reason; under `CI=true` the same situation is a failure,
//! because CI installs everything the suite needs.

use std::path::Path;

/// True when running under CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns `true` when the test may proceed. When `ok` is false it prints why
/// and returns `false` outside CI, and panics under CI.
pub fn check(test: &str, ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{test}: prerequisite missing under CI=true: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// The test needs root (network namespaces, nftables, containerd).
pub fn root(test: &str) -> bool {
    check(test, nix::unistd::geteuid().is_root(), "needs root")
}

/// The test needs `binary` on PATH (or at an absolute path).
pub fn binary(test: &str, binary: &str) -> bool {
    let found = if binary.contains('/') {
        Path::new(binary).exists()
    } else {
        which(binary).is_some()
    };
    check(test, found, &format!("`{binary}` not found"))
}

/// Locates an executable on PATH.
pub fn which(binary: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}
