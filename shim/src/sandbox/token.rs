//! The pod's service-account token, as the kubelet projects it on the node.
//! The shim finds it through the node config's `token.path_template`, learns
//! the service-account name from the token's claims (the name is nowhere in
//! the CRI request), and keeps a copy the proxy user can read inside the
//! proxy's state directory, re-copied as the kubelet rotates it.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::config::expand;

/// Expands the template for a pod and resolves a single `*` component.
pub fn locate(template: &str, pod_uid: &str, namespace: &str, name: &str) -> Option<PathBuf> {
    let path = expand(template, |k| match k {
        "pod_uid" => Some(pod_uid.to_owned()),
        "pod_namespace" => Some(namespace.to_owned()),
        "pod_name" => Some(name.to_owned()),
        _ => None,
    })
    .ok()?;
    let Some((before, after)) = path.split_once("/*/") else {
        return Path::new(&path).is_file().then(|| PathBuf::from(path));
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(before)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|d| d.join(after))
        .find(|p| p.is_file())
}

/// The service account named in a Kubernetes service-account JWT.
pub fn service_account(jwt: &str) -> Option<String> {
    let payload = jwt.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if let Some(sa) = claims
        .pointer("/kubernetes.io/serviceaccount/name")
        .and_then(|v| v.as_str())
    {
        return Some(sa.to_owned());
    }
    let sub = claims.get("sub")?.as_str()?;
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    rest.split_once(':').map(|(_, sa)| sa.to_owned())
}

/// Copies `from` to `to` (mode 0600, owned by `uid:gid`) if the content
/// changed; returns the token text.
pub fn copy(from: &Path, to: &Path, uid: u32, gid: u32) -> std::io::Result<String> {
    let text = std::fs::read_to_string(from)?;
    if std::fs::read_to_string(to).ok().as_deref() == Some(text.as_str()) {
        return Ok(text);
    }
    let tmp = to.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
    std::fs::rename(&tmp, to)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(b"{\"alg\":\"RS256\"}"),
            e.encode(claims)
        )
    }

    #[test]
    fn service_account_from_claims() {
        let t = jwt(
            r#"{"kubernetes.io":{"namespace":"ns","serviceaccount":{"name":"web","uid":"1"}}}"#,
        );
        assert_eq!(service_account(&t).as_deref(), Some("web"));
        let t = jwt(r#"{"sub":"system:serviceaccount:ns:api"}"#);
        assert_eq!(service_account(&t).as_deref(), Some("api"));
        assert_eq!(service_account(&jwt(r#"{"sub":"user"}"#)), None);
        assert_eq!(service_account("garbage"), None);
    }

    #[test]
    fn locates_through_a_wildcard_component() {
        let d = tempfile::tempdir().unwrap();
        let vol = d
            .path()
            .join("pods/u1/volumes/kubernetes.io~projected/kube-api-access-x1");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("token"), "t").unwrap();
        let tpl = format!(
            "{}/pods/{{pod_uid}}/volumes/kubernetes.io~projected/*/token",
            d.path().display()
        );
        assert_eq!(locate(&tpl, "u1", "ns", "p"), Some(vol.join("token")));
        assert_eq!(locate(&tpl, "u2", "ns", "p"), None);
        let exact = format!(
            "{}/pods/{{pod_uid}}/volumes/kubernetes.io~projected/kube-api-access-x1/token",
            d.path().display()
        );
        assert_eq!(locate(&exact, "u1", "ns", "p"), Some(vol.join("token")));
    }

    #[test]
    fn copies_only_on_change() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::write(&src, "one").unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        assert_eq!(copy(&src, &dst, uid, gid).unwrap(), "one");
        assert_eq!(
            std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&src, "two").unwrap();
        copy(&src, &dst, uid, gid).unwrap();
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), "two");
    }
}
