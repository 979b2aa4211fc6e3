//! Certificate files provisioned by the platform (cert chain, key, roots in
//! PEM), polled and hot-reloaded. Polling rather than inotify: the files are
//! often Kubernetes secret/projected volumes, updated by symlink swaps that
//! inotify watches on the file itself miss, and a stat every few seconds
//! costs nothing.

use std::path::PathBuf;
use std::time::Duration;

use super::CertSourceError;
use crate::identity::{CertificateManager, WorkloadCertificate};

/// Paths of the PEM files and how often to look at them.
#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    /// Leaf certificate followed by intermediates.
    pub cert_chain: PathBuf,
    /// Private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Mesh trust anchors.
    pub roots: PathBuf,
    /// Poll interval (default 5 s).
    pub poll_interval: Duration,
}

impl FileSourceConfig {
    /// Files with the default poll interval.
    pub fn new(cert_chain: PathBuf, key: PathBuf, roots: PathBuf) -> Self {
        Self {
            cert_chain,
            key,
            roots,
            poll_interval: Duration::from_secs(5),
        }
    }
}

async fn read(path: &PathBuf) -> Result<Vec<u8>, CertSourceError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| CertSourceError::Io {
            path: path.clone(),
            source,
        })
}

/// Loads the three files once.
pub(super) async fn load(
    cfg: &FileSourceConfig,
) -> Result<(Vec<u8>, WorkloadCertificate), CertSourceError> {
    let chain = read(&cfg.cert_chain).await?;
    let key = read(&cfg.key).await?;
    let roots = read(&cfg.roots).await?;
    let cert = WorkloadCertificate::from_pem(&chain, &key, &roots)?;
    // Fingerprint of all three inputs: a change to any one triggers a reload.
    let mut fingerprint = chain;
    fingerprint.extend_from_slice(&key);
    fingerprint.extend_from_slice(&roots);
    Ok((fingerprint, cert))
}

/// Polls the files forever, installing every new valid certificate. A
/// half-written update (files replaced one at a time) fails to parse or has
/// a key that does not match the leaf; the previous certificate stays and the
/// next poll tries again.
pub(super) async fn run(cfg: FileSourceConfig, manager: CertificateManager) {
    let mut last: Option<Vec<u8>> = None;
    let mut last_error: Option<String> = None;
    loop {
        match load(&cfg).await {
            Ok((fingerprint, cert)) => {
                if last.as_ref() != Some(&fingerprint) {
                    match manager.install(cert) {
                        Ok(_) => {
                            last = Some(fingerprint);
                            last_error = None;
                        }
                        Err(e) => report(&mut last_error, e.to_string()),
                    }
                }
            }
            Err(e) => report(&mut last_error, e.to_string()),
        }
        tokio::time::sleep(cfg.poll_interval).await;
    }
}

/// Logs an error once per distinct message so a persistent problem does not
/// flood the log every poll.
fn report(last_error: &mut Option<String>, msg: String) {
    if last_error.as_deref() != Some(msg.as_str()) {
        tracing::warn!(error = %msg, "certificate files not usable; keeping the current certificate");
        *last_error = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testca::TestCa;

    #[tokio::test]
    async fn loads_and_hot_reloads_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FileSourceConfig {
            poll_interval: Duration::from_millis(50),
            ..FileSourceConfig::new(
                dir.path().join("cert-chain.pem"),
                dir.path().join("key.pem"),
                dir.path().join("root-cert.pem"),
            )
        };
        let write = |i: &crate::identity::testca::Issued| {
            std::fs::write(&cfg.cert_chain, &i.chain).unwrap();
            std::fs::write(&cfg.key, &i.key).unwrap();
            std::fs::write(&cfg.roots, &i.roots).unwrap();
        };
        let ca = TestCa::new();
        let uri = "spiffe://td/ns/a/sa/b";
        let id: crate::identity::Identity = uri.parse().unwrap();
        let (manager, task) = crate::cert_source::CertSource::Files(cfg.clone())
            .spawn(id)
            .unwrap();
        // Missing files: not ready, no crash.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!manager.is_ready());

        let first = ca.issue(&[uri], false);
        write(&first);
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, manager.wait_ready())
            .await
            .unwrap();
        let serial1 = manager.current().unwrap().info().serial;

        // A half-written update (new chain, old key) is ignored…
        let second = ca.issue(&[uri], false);
        std::fs::write(&cfg.cert_chain, &second.chain).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(manager.current().unwrap().info().serial, serial1);
        // …and picked up once complete.
        let mut rx = manager.subscribe();
        rx.mark_unchanged();
        std::fs::write(&cfg.key, &second.key).unwrap();
        tokio::time::timeout(deadline, rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(manager.current().unwrap().info().serial, serial1);
        task.abort();
    }
}
