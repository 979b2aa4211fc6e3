//! Istio CA requests (`IstioCertificateService/CreateCertificate`) as any
//! workload holding a token sends them: protobuf `IstioCertificateRequest`
//! (CSR text, requested validity, metadata such as `ImpersonatedIdentity`)
//! → meshd's CA service with the fixture caller's valid token. Checks:
//! never panics; refusals are InvalidArgument or PermissionDenied (never a
//! credential error for a valid token, never an internal error); whatever
//! is issued is for the caller only, whatever the metadata asks, and no
//! longer-lived than requested and than meshd's cap.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sidetunnel_fuzz::{MAX_CERT_TTL, assert_issued, ca_service, caller_token};
use sidetunnel_proto::istio::ca::IstioCertificateRequest;
use sidetunnel_proto::istio::ca::istio_certificate_service_server::IstioCertificateService;
use tonic::{Code, Request};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn bearer() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| format!("Bearer {}", caller_token(Duration::from_secs(24 * 3600))))
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = IstioCertificateRequest::decode(data) else {
        return;
    };
    let mut request = Request::new(req.clone());
    request
        .metadata_mut()
        .insert("authorization", bearer().parse().expect("ASCII token"));
    match runtime().block_on(ca_service().create_certificate(request)) {
        Ok(resp) => {
            let ttl = match u64::try_from(req.validity_duration) {
                Ok(s) if s > 0 => Duration::from_secs(s).min(MAX_CERT_TTL),
                _ => MAX_CERT_TTL,
            };
            assert_issued(&resp.into_inner().cert_chain, &req.csr, ttl);
        }
        Err(status) => assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::PermissionDenied
            ),
            "unexpected refusal {status:?}"
        ),
    }
});
