//! What containerd writes on the shim's stdin at `start`, and what it reads
//! back from stdout, across containerd versions:
//!
//! * containerd 1.6 to 2.2: stdin holds the runtime options as a marshalled
//!   `google.protobuf.Any` (or nothing); stdout must hold the socket address
//!   (1.6 reads it as a plain string, 1.7 to 2.2 also accept JSON).
//! * containerd 2.3+: stdin holds `containerd.runtime.bootstrap.v1.BootstrapParams`
//!   (`pkg/shim/util.go` `Command`, for every shim not named `*shim-runc-v1`);
//!   the runtime options travel as an `Extension` wrapping the same `Any`.
//!   containerd parses stdout as a `BootstrapResult` protobuf first and falls
//!   back to the legacy string when that fails (`parseStartResponse`).
//!
//! Both inputs are protobuf with a string in field 1, so an `Any` and
//! `BootstrapParams` cannot be told apart by decoding alone: an `Any` has only
//! fields 1 and 2, while containerd always sets `containerd_version`,
//! `containerd_binary` and the addresses (fields 4 to 7) of `BootstrapParams`.
//! The containerd-shim 0.11 crate knows only the first shape and hands stdin to
//! the shim untouched, so the shim decodes both here.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};

use crate::error::{Error, Result};
use crate::options::RuntimeOptions;

/// Shim protocol version reported to containerd 2.3+: task API v2 with
/// `shim delete` per task (version 3 would claim the sandbox API and
/// streaming I/O).
pub const SHIM_VERSION: i32 = 2;
const PROTOCOL: &str = "ttrpc";

/// The decoded `start` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartInput {
    /// containerd 1.6 to 2.2: only the runtime options.
    Legacy(RuntimeOptions),
    /// containerd 2.3+: bootstrap parameters.
    Bootstrap(BootstrapParams),
}

/// The fields of `BootstrapParams` the shim uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapParams {
    pub instance_id: String,
    pub namespace: String,
    pub containerd_version: String,
    pub ttrpc_address: String,
    pub grpc_address: String,
    /// Directory for the shim's socket (containerd's `socket_dir`).
    pub socket_dir: Option<String>,
    /// The runtime options from the first extension of a known type.
    pub options: RuntimeOptions,
}

impl StartInput {
    pub fn options(&self) -> &RuntimeOptions {
        match self {
            StartInput::Legacy(o) => o,
            StartInput::Bootstrap(b) => &b.options,
        }
    }

    /// Decodes `start`'s stdin. `id` and `namespace` are the command-line
    /// flags, which containerd also puts in fields 1 and 2 of `BootstrapParams`.
    pub fn parse(raw: &[u8], id: &str, namespace: &str) -> Result<StartInput> {
        if raw.is_empty() {
            return Ok(StartInput::Legacy(RuntimeOptions::default()));
        }
        if looks_like_bootstrap(raw, id, namespace) {
            return BootstrapParams::decode(raw).map(StartInput::Bootstrap);
        }
        RuntimeOptions::from_any_bytes(raw).map(StartInput::Legacy)
    }

    /// What to print on stdout for socket `address`.
    pub fn response(&self, address: &str) -> Vec<u8> {
        match self {
            StartInput::Legacy(_) => address.as_bytes().to_vec(),
            StartInput::Bootstrap(_) => bootstrap_result(address),
        }
    }
}

/// Top-level (field number, first string value) pairs, `None` when `raw` is
/// not well-formed protobuf.
fn top_level_fields(raw: &[u8]) -> Option<Vec<(u32, Option<Vec<u8>>)>> {
    let mut input = CodedInputStream::from_bytes(raw);
    let mut fields = Vec::new();
    while let Some(tag) = input.read_raw_tag_or_eof().ok()? {
        let (num, wire) = (tag >> 3, tag & 7);
        if wire == 2 {
            fields.push((num, Some(input.read_bytes().ok()?)));
        } else {
            let wire = containerd_shim::protos::protobuf::rt::WireType::new(wire)?;
            input.skip_field(wire).ok()?;
            fields.push((num, None));
        }
    }
    Some(fields)
}

fn looks_like_bootstrap(raw: &[u8], id: &str, namespace: &str) -> bool {
    let Some(fields) = top_level_fields(raw) else {
        return false;
    };
    if fields.iter().any(|(num, _)| *num > 2) {
        return true;
    }
    let value = |n: u32| {
        fields
            .iter()
            .find(|(num, _)| *num == n)
            .and_then(|(_, v)| v.as_deref())
    };
    !id.is_empty() && value(1) == Some(id.as_bytes()) && value(2) == Some(namespace.as_bytes())
}

impl BootstrapParams {
    /// ```text
    /// message BootstrapParams {
    ///   string instance_id = 1; string namespace = 2; LogLevel log_level = 3;
    ///   string containerd_version = 4; string containerd_ttrpc_address = 5;
    ///   string containerd_grpc_address = 6; string containerd_binary = 7;
    ///   repeated Extension extensions = 8; optional string socket_dir = 9;
    /// }
    /// message Extension { google.protobuf.Any value = 1; }
    /// ```
    pub fn decode(raw: &[u8]) -> Result<BootstrapParams> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("bad containerd BootstrapParams: {e}"))
        };
        let mut p = BootstrapParams::default();
        let mut extensions = Vec::new();
        let mut input = CodedInputStream::from_bytes(raw);
        while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| bad(&e))? {
            let mut string = || input.read_string().map_err(|e| bad(&e));
            match (tag >> 3, tag & 7) {
                (1, 2) => p.instance_id = string()?,
                (2, 2) => p.namespace = string()?,
                (4, 2) => p.containerd_version = string()?,
                (5, 2) => p.ttrpc_address = string()?,
                (6, 2) => p.grpc_address = string()?,
                (9, 2) => p.socket_dir = Some(string()?).filter(|s| !s.is_empty()),
                (8, 2) => extensions.push(input.read_bytes().map_err(|e| bad(&e))?),
                (_, wire) => {
                    let wire = containerd_shim::protos::protobuf::rt::WireType::new(wire)
                        .ok_or_else(|| bad(&format!("wire type {wire}")))?;
                    input.skip_field(wire).map_err(|e| bad(&e))?;
                }
            }
        }
        for ext in extensions {
            let Some(any) = extension_value(&ext).map_err(|e| bad(&e))? else {
                continue;
            };
            // Extensions of other types are for other consumers: skip them.
            if RuntimeOptions::is_known_type(&any.type_url) {
                p.options = RuntimeOptions::from_any(Some(&any))?;
                break;
            }
        }
        Ok(p)
    }
}

/// The `Any` in field 1 of an `Extension`.
fn extension_value(bytes: &[u8]) -> std::result::Result<Option<Any>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut value = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        if tag == (1 << 3) | 2 {
            let b = input.read_bytes().map_err(|e| e.to_string())?;
            value = Some(Any::parse_from_bytes(&b).map_err(|e| e.to_string())?);
        } else {
            let wire = containerd_shim::protos::protobuf::rt::WireType::new(tag & 7)
                .ok_or_else(|| format!("wire type {}", tag & 7))?;
            input.skip_field(wire).map_err(|e| e.to_string())?;
        }
    }
    Ok(value)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_string(out: &mut Vec<u8>, field: u8, s: &str) {
    out.push((field << 3) | 2);
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// `BootstrapResult { int32 version = 1; string address = 2; string protocol = 3; }`
pub fn bootstrap_result(address: &str) -> Vec<u8> {
    let mut out = vec![1 << 3];
    put_varint(&mut out, SHIM_VERSION as u64);
    put_string(&mut out, 2, address);
    put_string(&mut out, 3, PROTOCOL);
    out
}

/// `address` (`unix://<dir>/<name>`) moved into `socket_dir`.
pub fn in_socket_dir(address: &str, socket_dir: Option<&str>) -> String {
    match (socket_dir, address.rsplit_once('/')) {
        (Some(dir), Some((_, name))) => {
            format!("unix://{}/{name}", dir.trim_end_matches('/'))
        }
        _ => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::tests::any;
    use containerd_shim::api::Options as RuncOptions;

    fn put_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
        out.push((field << 3) | 2);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    /// `BootstrapParams` as containerd 2.3's `pkg/shim` `Command` builds it.
    fn params(extensions: &[Any], socket_dir: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, 1, "a3f0c1");
        put_string(&mut out, 2, "k8s.io");
        // log_level = LOG_LEVEL_DEBUG (-4): a negative int32 is a 10-byte varint.
        out.push(3 << 3);
        put_varint(&mut out, -4i64 as u64);
        put_string(&mut out, 4, "v2.3.4");
        put_string(&mut out, 5, "/run/containerd/containerd.sock.ttrpc");
        put_string(&mut out, 6, "/run/containerd/containerd.sock");
        put_string(&mut out, 7, "/usr/bin/containerd");
        for a in extensions {
            let mut ext = Vec::new();
            put_bytes(&mut ext, 1, &a.write_to_bytes().unwrap());
            put_bytes(&mut out, 8, &ext);
        }
        if let Some(d) = socket_dir {
            put_string(&mut out, 9, d);
        }
        out
    }

    fn runc_any() -> Any {
        let o = RuncOptions {
            binary_name: "crun".into(),
            ..Default::default()
        };
        any("containerd.runc.v1.Options", o.write_to_bytes().unwrap())
    }

    #[test]
    fn empty_stdin_is_legacy_defaults() {
        assert_eq!(
            StartInput::parse(&[], "a3f0c1", "k8s.io").unwrap(),
            StartInput::Legacy(RuntimeOptions::default())
        );
    }

    #[test]
    fn a_marshalled_any_is_legacy() {
        let raw = runc_any().write_to_bytes().unwrap();
        let input = StartInput::parse(&raw, "a3f0c1", "k8s.io").unwrap();
        assert!(matches!(input, StartInput::Legacy(_)));
        assert_eq!(input.options().binary_name.as_deref(), Some("crun"));
        assert_eq!(input.response("unix:///x/s/1"), b"unix:///x/s/1");
    }

    #[test]
    fn bootstrap_params_without_options() {
        let raw = params(&[], None);
        let StartInput::Bootstrap(p) = StartInput::parse(&raw, "a3f0c1", "k8s.io").unwrap() else {
            panic!("not recognised as BootstrapParams")
        };
        assert_eq!(p.instance_id, "a3f0c1");
        assert_eq!(p.namespace, "k8s.io");
        assert_eq!(p.containerd_version, "v2.3.4");
        assert_eq!(p.ttrpc_address, "/run/containerd/containerd.sock.ttrpc");
        assert_eq!(p.grpc_address, "/run/containerd/containerd.sock");
        assert_eq!(p.socket_dir, None);
        assert_eq!(p.options, RuntimeOptions::default());
    }

    #[test]
    fn bootstrap_params_carry_runc_options_in_an_extension() {
        let raw = params(
            &[any("example.com/Other", vec![1, 2, 3]), runc_any()],
            Some("/run/c/s"),
        );
        let input = StartInput::parse(&raw, "a3f0c1", "k8s.io").unwrap();
        assert_eq!(input.options().binary_name.as_deref(), Some("crun"));
        let StartInput::Bootstrap(p) = &input else {
            panic!("not bootstrap")
        };
        assert_eq!(p.socket_dir.as_deref(), Some("/run/c/s"));
    }

    #[test]
    fn bootstrap_params_carry_generic_options() {
        // runtimeoptions.v1.Options { config_path = 2 }
        let mut generic = Vec::new();
        put_string(&mut generic, 2, "/etc/st/node.toml");
        let raw = params(&[any("runtimeoptions.v1.Options", generic)], None);
        let input = StartInput::parse(&raw, "a3f0c1", "k8s.io").unwrap();
        assert_eq!(
            input.options().config_path.as_deref(),
            Some(std::path::Path::new("/etc/st/node.toml"))
        );
    }

    #[test]
    fn minimal_bootstrap_params_are_told_by_id_and_namespace() {
        let mut raw = Vec::new();
        put_string(&mut raw, 1, "a3f0c1");
        put_string(&mut raw, 2, "k8s.io");
        assert!(matches!(
            StartInput::parse(&raw, "a3f0c1", "k8s.io").unwrap(),
            StartInput::Bootstrap(_)
        ));
    }

    #[test]
    fn bootstrap_result_encoding() {
        let addr = format!("unix:///run/containerd/s/{}", "a".repeat(64));
        let out = bootstrap_result(&addr);
        // version = 2, address, protocol = "ttrpc"
        let mut want = vec![0x08, 0x02, 0x12, addr.len() as u8];
        want.extend_from_slice(addr.as_bytes());
        want.extend_from_slice(&[0x1a, 5]);
        want.extend_from_slice(b"ttrpc");
        assert_eq!(out, want);
        // A long address needs a two-byte length.
        let long = "x".repeat(200);
        let out = bootstrap_result(&long);
        assert_eq!(&out[2..5], &[0x12, 0xc8, 0x01]);
    }

    #[test]
    fn socket_dir_moves_the_socket() {
        assert_eq!(
            in_socket_dir("unix:///run/containerd/s/abc", Some("/run/c/s/")),
            "unix:///run/c/s/abc"
        );
        assert_eq!(
            in_socket_dir("unix:///run/containerd/s/abc", None),
            "unix:///run/containerd/s/abc"
        );
    }
}
