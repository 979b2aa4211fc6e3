//! An opened network-namespace file, checked to really be one. Commands
//! (`exec.rs`) and netlink sockets (`netlink/`) enter it from a child or a
//! short-lived thread, so the caller's threads never change namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::Error;

/// `NSFS_MAGIC` from linux/magic.h: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub(crate) struct Netns {
    pub path: PathBuf,
    pub file: File,
}

impl Netns {
    pub(crate) fn open(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Netns {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let stat = nix::sys::statfs::fstatfs(&file).map_err(|e| err(e.into()))?;
        if stat.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a namespace file (expected e.g. /proc/<pid>/ns/net or /run/netns/<name>)",
            )));
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }
}
