//! `sidetunnel-meshd` entry point.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("sidetunnel-meshd: not yet implemented")
}
