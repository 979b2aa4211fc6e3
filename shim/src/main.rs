//! `containerd-shim-sidetunnel-v1` entry point.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("containerd-shim-sidetunnel-v1: not yet implemented")
}
