//! Compiles the vendored-by-hand `.proto` files with protox, so building the
//! product never needs `protoc` on the machine.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/ca/ca.proto",
    "envoy/service/discovery/v3/discovery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a cached build script compiled in
    // another checkout (CI shares its target dir) must still find this one.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(FILES, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
