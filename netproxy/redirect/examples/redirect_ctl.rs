//! Manual driver: `redirect_ctl install|remove|show NETNS_PATH [CONFIG_JSON]`.
//! The operator-facing command is `sidetunnel-proxy redirect show`; this
//! example exists to try rulesets by hand.

use std::path::Path;

use sidetunnel_redirect::{RedirectConfig, install, remove, show};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(ns)) = (args.get(1), args.get(2)) else {
        return Err("usage: redirect_ctl install|remove|show NETNS_PATH [CONFIG_JSON]".into());
    };
    let cfg: RedirectConfig = match args.get(3) {
        Some(json) => serde_json::from_str(json)?,
        None => RedirectConfig::default(),
    };
    let ns = Path::new(ns);
    match cmd.as_str() {
        "install" => install(ns, &cfg)?,
        "remove" => remove(ns, &cfg)?,
        "show" => print!("{}", show(ns)?),
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
