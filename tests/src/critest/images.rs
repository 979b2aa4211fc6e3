//! The images critest pulls, built offline from busybox-static under their
//! upstream names: what each spec needs of them (a shell and the usual
//! applets, a web server on port 80 whose process is called `nginx`, an
//! `httpd` that says its name in its log, a set-uid program printing its
//! effective uid, images with a `User`, different and identical images
//! under several tags). Only `test-image-digest@sha256:9700f9…` cannot be
//! built: its digest names upstream bytes.

use anyhow::Result;

use crate::image::{Entry, ImageDef, busybox};

/// `framework.DefaultRegistryE2ETestImagesPrefix`.
pub const E2E: &str = "registry.k8s.io/e2e-test-images/";
/// cri-tools' own test images (`pkg/validate/consts.go`, `registry`).
pub const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools/";
/// The spec image critest pulls by a digest of upstream content.
pub const UNBUILDABLE: &str = "gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf";

fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Entry {
    Entry::File {
        path: path.into(),
        mode,
        data: data.into(),
    }
}

fn dir(path: &str) -> Entry {
    Entry::Dir {
        path: path.into(),
        mode: 0o755,
    }
}

/// busybox with extra entries (replacing same-path ones), a new name, a
/// command and a user.
fn derive(
    name: &str,
    extra: Vec<Entry>,
    entrypoint: &[&str],
    cmd: &[&str],
    user: &str,
) -> Result<ImageDef> {
    let mut def = busybox()?;
    let path = |e: &Entry| match e {
        Entry::Dir { path, .. }
        | Entry::File { path, .. }
        | Entry::Symlink { path, .. }
        | Entry::Hardlink { path, .. } => path.clone(),
    };
    let replaced: Vec<String> = extra.iter().map(path).collect();
    def.entries.retain(|e| !replaced.contains(&path(e)));
    // Applets are hard links, as in the upstream busybox images: masking
    // one path (MaskedPaths `/bin/ls`) must not mask the shell.
    for e in &mut def.entries {
        if let Entry::Symlink { path, target } = e
            && target == "/bin/busybox"
        {
            *e = Entry::Hardlink {
                path: path.clone(),
                target: "bin/busybox".into(),
            };
        }
    }
    def.entries.extend(tools());
    def.entries.extend(extra);
    def.entries.push(identity(name));
    def.name = name.into();
    def.entrypoint = entrypoint.iter().map(|s| (*s).into()).collect();
    def.cmd = cmd.iter().map(|s| (*s).into()).collect();
    def.user = user.into();
    Ok(def)
}

/// Applets critest runs that Debian's busybox-static lacks, as scripts
/// over /proc: `pgrep NAME` (pids whose command name contains NAME) and
/// `ipcs -m` (System V shared memory segments).
fn tools() -> Vec<Entry> {
    vec![
        file(
            "usr/bin/pgrep",
            0o755,
            "#!/bin/sh\nfor d in /proc/[0-9]*; do\n  c=$(cat \"$d/comm\" 2>/dev/null) || continue\n  \
             case \"$c\" in *\"$1\"*) echo \"${d#/proc/}\";; esac\ndone\n",
        ),
        file(
            "usr/bin/ipcs",
            0o755,
            "#!/bin/sh\necho '------ Shared Memory Segments --------'\n\
             echo 'key        shmid      perms      bytes      cpid'\n\
             awk 'NR > 1 { print $1, $2, $3, $4, $5 }' /proc/sysvipc/shm\n",
        ),
    ]
}

/// A file that makes each image its own (distinct image ids, as upstream):
/// named by the repository, so the tags of one repository
/// (`test-image-tags:1..3`) stay one image.
fn identity(name: &str) -> Entry {
    let repo = name.rsplit_once(':').map_or(name, |(r, _)| r);
    let repo = if repo.ends_with("/test-image-tags") {
        repo
    } else {
        name
    };
    file("etc/critest-image", 0o644, format!("{repo}\n"))
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
www-data:x:33:33:www-data:/var/www:/bin/false\n\
default-user:x:1000:1000:default-user:/home/default-user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nwww-data:x:33:\nusers:x:100:\ndefault-user:x:1000:\n\
group-defined-in-image:x:50000:default-user\nnogroup:x:65534:\n";

fn accounts() -> Vec<Entry> {
    vec![
        file("etc/passwd", 0o644, PASSWD),
        file("etc/group", 0o644, GROUP),
    ]
}

/// A web page and a server script; the script's process keeps the name of
/// the script (busybox `httpd` serves as its child).
fn web_server(script: &str, port: u16, docroot: &str, banner: &str) -> Vec<Entry> {
    vec![
        dir("var/run"),
        dir(docroot.trim_end_matches('/')),
        file(
            &format!("{docroot}/index.html"),
            0o644,
            "<html><body>Welcome</body></html>\n",
        ),
        file(
            script,
            0o755,
            format!(
                "#!/bin/sh\n{banner}echo $$ > /var/run/nginx.pid\n\
                 /bin/busybox httpd -f -p {port} -h /{docroot}\n"
            ),
        ),
    ]
}

/// A static x86-64 ELF that prints `Effective uid: <euid>\n` in one write
/// (what the e2e `nonewprivs` image's `nnp` prints), built byte by byte so
/// no compiler is needed. `None` on other architectures.
pub fn nnp_elf() -> Option<Vec<u8>> {
    if std::env::consts::ARCH != "x86_64" {
        return None;
    }
    const BASE: u64 = 0x40_0000;
    const CODE_OFF: usize = 64 + 56;
    let prefix = b"Effective uid: ";
    let mut code: Vec<u8> = Vec::new();
    // (offset of rel32 in code, which label): 0 = bufend, 1 = prefix end.
    let mut fix: Vec<(usize, u8)> = Vec::new();
    let mut lea = |code: &mut Vec<u8>, modrm: u8, label: u8| {
        code.extend([0x48, 0x8d, modrm]);
        fix.push((code.len(), label));
        code.extend([0; 4]);
    };
    code.extend([0xb8, 107, 0, 0, 0, 0x0f, 0x05]); // geteuid
    lea(&mut code, 0x3d, 0); // lea rdi, [bufend]
    code.extend([0xc6, 0x07, 0x0a]); // mov byte [rdi], '\n'
    code.extend([0xb9, 10, 0, 0, 0]); // mov ecx, 10
    // digits: xor edx,edx; div ecx; add dl,'0'; dec rdi; mov [rdi],dl; test eax,eax; jnz
    code.extend([
        0x31, 0xd2, 0xf7, 0xf1, 0x80, 0xc2, 0x30, 0x48, 0xff, 0xcf, 0x88, 0x17, 0x85, 0xc0, 0x75,
        0xf0,
    ]);
    lea(&mut code, 0x35, 1); // lea rsi, [prefix end]
    code.extend([0xb9, prefix.len() as u8, 0, 0, 0]); // mov ecx, len
    // copy: dec rsi; dec rdi; mov al,[rsi]; mov [rdi],al; dec ecx; jnz
    code.extend([
        0x48, 0xff, 0xce, 0x48, 0xff, 0xcf, 0x8a, 0x06, 0x88, 0x07, 0xff, 0xc9, 0x75, 0xf2,
    ]);
    lea(&mut code, 0x15, 0); // lea rdx, [bufend]
    code.extend([0x48, 0x29, 0xfa, 0x48, 0xff, 0xc2]); // sub rdx,rdi; inc rdx
    code.extend([0x48, 0x89, 0xfe]); // mov rsi, rdi
    code.extend([0xbf, 1, 0, 0, 0, 0xb8, 1, 0, 0, 0, 0x0f, 0x05]); // write(1, ..)
    code.extend([0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]); // exit(0)
    let data_off = CODE_OFF + code.len();
    let prefix_end = data_off + prefix.len();
    let bufend = prefix_end + 39;
    for (at, label) in fix {
        let target = if label == 0 { bufend } else { prefix_end };
        let next = CODE_OFF + at + 4;
        let rel = (target as i64 - next as i64) as i32;
        code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
    }
    let total = (bufend + 1) as u64;
    let mut elf = Vec::new();
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + CODE_OFF as u64).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // phoff
    elf.extend(0u64.to_le_bytes()); // shoff
    elf.extend(0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend(v.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(7u32.to_le_bytes()); // RWX
    elf.extend(0u64.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(total.to_le_bytes());
    elf.extend(total.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    debug_assert_eq!(elf.len(), CODE_OFF);
    elf.extend(code);
    elf.extend(prefix);
    elf.resize(total as usize, 0);
    Some(elf)
}

/// Every image critest's validation specs pull (cri-tools v1.36.0), by
/// upstream name, except [`UNBUILDABLE`].
pub fn all() -> Result<Vec<ImageDef>> {
    let t = |n: &str| format!("{CRI_TOOLS}{n}");
    let e = |n: &str| format!("{E2E}{n}");
    let mut out = vec![
        derive(&e("busybox:1.29-2"), accounts(), &[], &["sh"], "")?,
        derive(
            &e("nginx:1.14-2"),
            web_server("usr/sbin/nginx", 80, "usr/share/nginx/html", ""),
            &["/usr/sbin/nginx"],
            // critest looks for nginx's process title in /proc/1/cmdline.
            &["master process", "-g", "daemon off;"],
            "",
        )?,
        derive(
            &e("httpd:2.4.39-4"),
            web_server(
                "usr/local/bin/httpd-foreground",
                80,
                "usr/local/apache2/htdocs",
                "echo 'httpd (busybox) listening on port 80' >&2\n",
            ),
            &["/usr/local/bin/httpd-foreground"],
            &[],
            "",
        )?,
        derive(
            &t(&format!(
                "hostnet-nginx-{}:latest",
                crate::image::oci_arch()
            )),
            web_server("usr/sbin/nginx", 12003, "usr/share/nginx/html", ""),
            &["/usr/sbin/nginx"],
            &[],
            "",
        )?,
    ];
    if let Some(elf) = nnp_elf() {
        let mut extra = accounts();
        extra.push(dir("usr/local"));
        extra.push(dir("usr/local/bin"));
        extra.push(file("usr/local/bin/nnp", 0o4755, elf));
        out.push(derive(
            &e("nonewprivs:1.3"),
            extra,
            &["/usr/local/bin/nnp"],
            &[],
            "",
        )?);
    }
    for (name, user) in [
        ("test-image-user-uid", "1002"),
        ("test-image-user-username", "www-data"),
        ("test-image-user-uid-group", "1003:users"),
        ("test-image-user-username-group", "www-data:www-data"),
        ("test-image-predefined-group", "1000"),
    ] {
        out.push(derive(
            &t(&format!("{name}:latest")),
            accounts(),
            &[],
            &["sh"],
            user,
        )?);
    }
    for name in [
        "test-image-latest:latest",
        "test-image-tag:test",
        "test-image-tag:all",
        "test-image-tags:1",
        "test-image-tags:2",
        "test-image-tags:3",
    ] {
        out.push(derive(&t(name), accounts(), &[], &["sh"], "")?);
    }
    for n in 1..=3 {
        let mut extra = accounts();
        extra.push(file(&format!("image-{n}"), 0o644, format!("{n}\n")));
        out.push(derive(
            &t(&format!("test-image-{n}:latest")),
            extra,
            &[],
            &["sh"],
            "",
        )?);
    }
    // Same image from two registries.
    for reg in ["registry.k8s.io", "k8s.gcr.io"] {
        let mut p = crate::image::pause()?;
        // Not the harness's sandbox image: critest removes this one.
        p.entries
            .push(file("etc/critest-image", 0o644, "pause:3.9\n"));
        p.name = format!("{reg}/pause:3.9");
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-assembled program runs and prints the effective uid.
    #[test]
    fn nnp_prints_effective_uid() {
        let Some(elf) = nnp_elf() else { return };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nnp");
        std::fs::write(&p, elf).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = std::process::Command::new(&p).output().unwrap();
        let euid = nix::unistd::geteuid().as_raw();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("Effective uid: {euid}\n")
        );
        assert!(out.status.success());
    }
}
