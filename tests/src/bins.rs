//! Paths of the workspace's binaries. `cargo xtask test` builds them before
//! running tests; they live next to the test executable's `deps/` folder.

use std::path::PathBuf;

/// Directory holding the workspace binaries of the current profile.
pub fn dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of workspace binary `name`; panics with a build hint when missing.
pub fn path(name: &str) -> PathBuf {
    let p = dir().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` (cargo xtask test does)",
        p.display()
    );
    p
}
