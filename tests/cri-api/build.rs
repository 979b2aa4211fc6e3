//! Compiles Kubernetes' CRI `api.proto` (runtime.v1) with protox, so the test
//! harness and xtask build on a machine without `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a cached build script compiled in
    // another checkout (CI shares its target dir) must still find this one.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(["runtime/v1/api.proto"], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
