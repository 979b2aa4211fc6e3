//! Where a process's cgroups are on this node (cgroup v1 hierarchies and the
//! v2 unified tree), read from `/proc/<pid>/cgroup` and mountinfo, so the shim
//! can follow whatever the runtime (cgroupfs or systemd driver) created.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Controllers of the hierarchy (`["memory"]`, `["cpu","cpuacct"]`,
    /// `["name=systemd"]`); empty for the v2 unified hierarchy.
    pub controllers: Vec<String>,
    pub path: PathBuf,
}

impl CgroupDir {
    pub fn is_v2(&self) -> bool {
        self.controllers.is_empty()
    }
}

struct Mount {
    root: String,
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let options = post
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::to_owned)
                .collect();
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: PathBuf::from(unescape(pre.get(4)?)),
                v2: fstype == "cgroup2",
                options,
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Resolves `/proc/<pid>/cgroup` content against mountinfo content.
pub fn resolve(proc_cgroup: &str, mountinfo: &str) -> Vec<CgroupDir> {
    let mounts = mounts(mountinfo);
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let controllers: Vec<String> = if ctrls.is_empty() {
            Vec::new()
        } else {
            ctrls.split(',').map(str::to_owned).collect()
        };
        let mount = mounts.iter().find(|m| {
            if controllers.is_empty() {
                m.v2
            } else {
                !m.v2 && controllers.iter().all(|c| m.options.contains(c))
            }
        });
        let Some(m) = mount else { continue };
        let rel = path
            .strip_prefix(m.root.as_str())
            .unwrap_or(path)
            .trim_start_matches('/');
        out.push(CgroupDir {
            controllers,
            path: m.point.join(rel),
        });
    }
    out
}

/// The cgroup directories `pid` is in.
pub fn of_pid(pid: i32) -> std::io::Result<Vec<CgroupDir>> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mi = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(resolve(&cg, &mi))
}

/// The memory cgroup (v1) or the unified cgroup (v2-only hosts) of `dirs`.
pub fn memory_dir(dirs: &[CgroupDir]) -> Option<(&Path, bool)> {
    if let Some(d) = dirs
        .iter()
        .find(|d| d.controllers.iter().any(|c| c == "memory"))
    {
        return Some((&d.path, false));
    }
    dirs.iter()
        .find(|d| d.is_v2() && d.path.join("memory.events").exists())
        .map(|d| (d.path.as_path(), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 23 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    #[test]
    fn resolves_hybrid_hierarchies() {
        let proc =
            "4:memory:/k8s.io/abc\n2:cpu,cpuacct:/k8s.io/abc\n9:name=systemd:/\n0::/k8s.io/abc\n";
        let dirs = resolve(proc, MOUNTINFO);
        assert_eq!(dirs.len(), 4);
        assert_eq!(
            dirs[0].path,
            PathBuf::from("/sys/fs/cgroup/memory/k8s.io/abc")
        );
        assert_eq!(
            dirs[1].path,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/k8s.io/abc")
        );
        assert_eq!(dirs[2].path, PathBuf::from("/sys/fs/cgroup/systemd"));
        assert!(dirs[3].is_v2());
        assert_eq!(
            dirs[3].path,
            PathBuf::from("/sys/fs/cgroup/unified/k8s.io/abc")
        );
        let (mem, v2) = memory_dir(&dirs).unwrap();
        assert_eq!(mem, Path::new("/sys/fs/cgroup/memory/k8s.io/abc"));
        assert!(!v2);
    }

    #[test]
    fn strips_the_mount_root_of_a_nested_mount() {
        let mi = "40 1 0:40 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let dirs = resolve("0::/kubepods/pod1/c1\n", mi);
        assert_eq!(dirs[0].path, PathBuf::from("/sys/fs/cgroup/pod1/c1"));
    }

    #[test]
    fn resolves_this_process() {
        let dirs = of_pid(std::process::id() as i32).unwrap();
        assert!(!dirs.is_empty());
        assert!(dirs.iter().all(|d| d.path.starts_with("/")));
    }
}
