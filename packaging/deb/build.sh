#!/bin/sh
# Builds the sidetunnel Debian package from already built binaries with
# dpkg-deb (no cargo-deb needed).
#
#   cargo xtask dist   # the shipped (static) binaries, in target/<host triple>/release
#   packaging/deb/build.sh --bin-dir target/x86_64-unknown-linux-gnu/release --out-dir dist [--version V] [--arch A]
#                          [--compression xz|gzip|zstd|none]
#
# Contents:
#   /usr/bin/containerd-shim-sidetunnel-v1, /usr/bin/sidetunnel-proxy
#   /etc/sidetunnel/config.toml                 (conffile: the node config)
#   /usr/share/sidetunnel/containerd-dropin     (generates /etc/containerd/conf.d/sidetunnel.toml
#                                                in postinst: see packaging/containerd/dropin.sh)
#   /usr/share/sidetunnel/config-v{2,3}.toml    (the runtime snippets it uses)
#   /usr/share/doc/sidetunnel/                  (copyright, README, examples/)
# Prints the path of the .deb on stdout.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
packaging=$(dirname "$here")
root=$(dirname "$packaging")
bin_dir=
out_dir=
version=
arch=
compression=xz

usage() { echo "usage: $0 --bin-dir DIR --out-dir DIR [--version V] [--arch A] [--compression C]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --out-dir) out_dir=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --compression) compression=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$bin_dir" ] && [ -n "$out_dir" ] || usage
command -v dpkg-deb >/dev/null || { echo "dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }
for b in containerd-shim-sidetunnel-v1 sidetunnel-proxy; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b missing: run cargo build --release --workspace --bins" >&2; exit 1; }
done
if [ -z "$version" ]; then
  # The workspace version ([workspace.package] version = "x.y.z").
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
fi
[ -n "$arch" ] || arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
umask 022
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/sidetunnel" \
  "$stage/usr/share/sidetunnel" "$stage/usr/share/doc/sidetunnel/examples"
install -m 0755 "$bin_dir/containerd-shim-sidetunnel-v1" "$bin_dir/sidetunnel-proxy" "$stage/usr/bin/"
install -m 0644 "$packaging/config.toml" "$stage/etc/sidetunnel/config.toml"
install -m 0755 "$packaging/containerd/dropin.sh" "$stage/usr/share/sidetunnel/containerd-dropin"
install -m 0644 "$packaging/containerd/config-v2.toml" "$packaging/containerd/config-v3.toml" \
  "$stage/usr/share/sidetunnel/"
doc=$stage/usr/share/doc/sidetunnel
install -m 0644 "$here/debian/copyright" "$doc/copyright"
install -m 0644 "$here/debian/README.Debian" "$doc/README.Debian"
install -m 0644 "$packaging/config.toml" "$doc/examples/config.toml"
install -m 0644 "$packaging/containerd/config-v2.toml" "$doc/examples/containerd-1.x-config-v2.toml"
install -m 0644 "$packaging/containerd/config-v3.toml" "$doc/examples/containerd-2.x-config-v3.toml"
for f in "$packaging"/kubernetes/*.yaml; do install -m 0644 "$f" "$doc/examples/"; done

for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$stage/DEBIAN/$s"; done
install -m 0644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$here/debian/control.in" > "$stage/DEBIAN/control"

mkdir -p "$out_dir"
deb="$out_dir/sidetunnel_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compression" --build "$stage" "$deb" >&2
echo "$deb"
