//! The control-plane transport (xDS and CA): tonic channels whose TCP
//! sockets carry the proxy's packet mark, so the pod's redirection ruleset
//! lets them through instead of capturing the proxy's own traffic (no
//! control-plane exclusion needed in the ruleset), with TLS on top.
//!
//! tonic applies the endpoint's `ClientTlsConfig` over whatever IO a custom
//! connector returns (for `https` URIs), so the connector only creates,
//! marks and connects the socket; the connect timeout set on the endpoint
//! still bounds it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{HBONE_ALPN, TlsError};
use crate::crypto::provider;

/// A tonic/hyper connector opening TCP connections from sockets marked with
/// `mark` (0: unmarked). Resolves the URI's host and tries each address in
/// turn.
#[derive(Clone, Copy, Debug)]
pub struct MarkedConnector {
    mark: u32,
}

impl MarkedConnector {
    pub fn new(mark: u32) -> Self {
        Self { mark }
    }

    /// Connects to the host and port of `uri` (default port 443 for
    /// `https`, 80 otherwise).
    pub async fn connect(self, uri: Uri) -> io::Result<TcpStream> {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .collect();
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host}:{port} resolved to no address"),
        );
        for addr in addrs {
            let attempt = async {
                crate::socket::marked_socket(addr, self.mark)?
                    .connect(addr)
                    .await
            };
            match attempt.await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    }
}

impl tower::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = *self;
        Box::pin(async move { this.connect(uri).await.map(TokioIo::new) })
    }
}

/// A rustls client config for the control plane (xDS / CA) that trusts
/// `root_pem` and speaks `h2`, for callers that drive their own transport.
pub fn control_plane_client_config(root_pem: &[u8]) -> Result<ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = crate::identity::parse_pem_certificates(root_pem)
        .map_err(|e| TlsError::ControlPlane(e.to_string()))?;
    for c in certs {
        roots.add(c)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    Ok(cfg)
}

/// A lazily connecting tonic channel to the control plane over TLS: trusts
/// `root_pem`, verifies the server as `server_name` (default: the host of
/// `address`), and connects from sockets marked with `mark`. Used by the CA
/// client.
pub fn control_plane_channel(
    address: &str,
    root_pem: &[u8],
    server_name: Option<&str>,
    mark: u32,
) -> Result<Channel, TlsError> {
    let err = |e: &dyn std::fmt::Display| TlsError::ControlPlane(format!("{address}: {e}"));
    let endpoint = Endpoint::from_shared(address.to_owned()).map_err(|e| err(&e))?;
    let host = endpoint
        .uri()
        .host()
        .ok_or_else(|| err(&"address has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(server_name.map(str::to_owned).unwrap_or(host));
    Ok(endpoint
        .tls_config(tls)
        .map_err(|e| err(&e))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(MarkedConnector::new(mark)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[tokio::test]
    async fn connector_marks_its_socket() {
        // SO_MARK needs CAP_NET_ADMIN; unprivileged runs check mark 0.
        let mark = if nix::unistd::geteuid().is_root() {
            0x539
        } else {
            0
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let uri: Uri = format!("https://{addr}").parse().unwrap();
        let s = MarkedConnector::new(mark).connect(uri).await.unwrap();
        assert_eq!(SockRef::from(&s).mark().unwrap(), mark);
        assert_eq!(s.peer_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn connector_reports_refused_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let uri: Uri = format!("https://{addr}").parse().unwrap();
        let e = MarkedConnector::new(0).connect(uri).await.unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
