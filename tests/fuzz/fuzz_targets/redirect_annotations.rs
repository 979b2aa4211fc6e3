//! Pod annotations as the JSON object they arrive in (the OCI spec's
//! `annotations`; untrusted: any pod author sets them) → the in-pod
//! redirect configuration → the nftables script the shim installs. Must
//! never panic; what is accepted must validate, survive the JSON form the
//! shim hands over, and render a deterministic script in which no
//! annotation text appears verbatim (values are parsed, never pasted).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use sidetunnel_redirect::{
    DNS_CAPTURE, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS, ISTIO_DNS_CAPTURE, PROBE_PORTS, RedirectConfig, install_script,
};

/// Keys the parser consumes.
const KEYS: [&str; 7] = [
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    ISTIO_DNS_CAPTURE,
    DNS_CAPTURE,
    PROBE_PORTS,
];

fuzz_target!(|data: &[u8]| {
    let Ok(annotations) = serde_json::from_slice::<BTreeMap<String, String>>(data) else {
        return;
    };
    let Ok(cfg) = RedirectConfig::from_annotations(&annotations) else {
        return;
    };
    cfg.validate().expect("accepted configuration validates");
    let json = serde_json::to_string(&cfg).expect("serializes");
    let back: RedirectConfig = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, cfg, "JSON round trip changed the configuration");
    let script = install_script(&cfg);
    assert_eq!(script, install_script(&back));
    for (k, v) in &annotations {
        // Values of the keys the parser consumes, when they hold nftables
        // syntax (never part of a number, address or keyword): finding them
        // in the script would mean a value was pasted into it.
        if KEYS.contains(&k.as_str()) && v.len() >= 4 && v.contains(|c: char| "\"{};#".contains(c))
        {
            assert!(
                !script.contains(v.as_str()),
                "annotation {v:?} pasted into the ruleset"
            );
        }
    }
});
