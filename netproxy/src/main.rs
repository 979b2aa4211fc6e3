//! `sidetunnel-proxy`: the per-pod L4 mesh proxy.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("sidetunnel-proxy: not yet implemented")
}
