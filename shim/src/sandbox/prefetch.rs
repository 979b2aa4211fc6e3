//! The pod annotation `sidetunnel.io/prefetch` (destinations the proxy
//! subscribes to at start), checked here with the proxy's own grammar
//! ([`prefetch_names`], from the contract both share) so a bad entry fails
//! RunPodSandbox with a message naming the annotation, instead of starting a
//! proxy that exits at every restart; then handed to the proxy as [`FLAG`].

use sidetunnel_contract::prefetch::{FLAG, prefetch_names};
use sidetunnel_oci::settings::PREFETCH;

/// The proxy argument carrying `entries` (none for an empty list), or why
/// an entry is refused.
pub fn proxy_arg(entries: &[String]) -> Result<Option<String>, String> {
    if entries.is_empty() {
        return Ok(None);
    }
    // The network only changes how IPs are spelled, not what is valid.
    prefetch_names(entries, "").map_err(|e| format!("annotation {PREFETCH}: {e}"))?;
    Ok(Some(format!("{FLAG}={}", entries.join(","))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(entries: &[&str]) -> Result<Option<String>, String> {
        proxy_arg(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn valid_entries_become_one_flag() {
        assert_eq!(arg(&[]), Ok(None));
        assert_eq!(
            arg(&[
                "reviews.shop.svc",
                "10.96.0.10",
                "istio-system/api.example.com"
            ]),
            Ok(Some(
                "--xds-prefetch=reviews.shop.svc,10.96.0.10,istio-system/api.example.com".into()
            ))
        );
    }

    #[test]
    fn a_bad_entry_is_refused_naming_the_annotation_and_entry() {
        for bad in ["api.example.com", "reviews", "ns/", "/x"] {
            let e = arg(&["10.0.0.1", bad]).unwrap_err();
            assert!(e.starts_with("annotation sidetunnel.io/prefetch: "), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
