#!/bin/sh
# Installs sidetunnel on a node without dpkg: copies the shim and the proxy,
# writes the node config (only if absent) and the containerd drop-in
# (generated with containerd/dropin.sh),
# validates the resulting containerd configuration with
# `containerd config dump`, and says what to restart. Idempotent.
#
#   packaging/install.sh --bin-dir DIR [options]
#   packaging/install.sh --uninstall [--purge] [options]
#
# Options (defaults in brackets):
#   --bin-dir DIR            where containerd-shim-sidetunnel-v1 and sidetunnel-proxy are
#   --prefix DIR             install binaries into DIR/bin [/usr/local]; it must be on
#                            containerd's PATH: containerd 1.6 ignores runtime_path
#   --containerd-config F    containerd's main config [/etc/containerd/config.toml]
#   --dropin-dir DIR         drop-in directory [/etc/containerd/conf.d]
#   --config-dir DIR         sidetunnel's config directory [/etc/sidetunnel]
#   --containerd-major N     1 or 2 [detected from `containerd --version`]; 2.x
#                            accepts a main config of schema 2 (1.x-style, migrated
#                            with a warning), 3 or 4; the drop-in follows its schema
#   --add-import             add `imports = ["<dropin-dir>/*.toml"]` to the main config
#                            when it lacks one (otherwise only tell how)
#   --uninstall [--purge]    remove binaries and drop-in [and the config directory]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bin_dir=
prefix=/usr/local
cd_config=/etc/containerd/config.toml
dropin_dir=/etc/containerd/conf.d
config_dir=/etc/sidetunnel
major=
add_import=false
uninstall=false
purge=false
SHIM=containerd-shim-sidetunnel-v1
PROXY=sidetunnel-proxy

say() { echo "sidetunnel-install: $*"; }
die() { echo "sidetunnel-install: error: $*" >&2; exit 1; }
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --containerd-config) cd_config=$2; shift 2 ;;
    --dropin-dir) dropin_dir=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    --containerd-major) major=$2; shift 2 ;;
    --add-import) add_import=true; shift ;;
    --uninstall) uninstall=true; shift ;;
    --purge) purge=true; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

dropin=$dropin_dir/sidetunnel.toml

if $uninstall; then
  rm -f "$prefix/bin/$SHIM" "$prefix/bin/$PROXY" "$dropin"
  say "removed $prefix/bin/$SHIM, $prefix/bin/$PROXY, $dropin"
  if $purge; then
    rm -rf "$config_dir"
    say "removed $config_dir"
  fi
  say "restart containerd to drop the runtime (systemctl restart containerd)"
  exit 0
fi

[ -n "$bin_dir" ] || die "--bin-dir is required (where the built binaries are)"
for b in "$SHIM" "$PROXY"; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing or not executable (cargo build --release --workspace --bins)"
done
command -v containerd >/dev/null || die "containerd is not installed"

if [ -z "$major" ]; then
  # e.g. "containerd github.com/containerd/containerd 1.6.20~ds1 ..." or "... v2.0.2 ..."
  v=$(containerd --version | awk '{print $3}' | sed 's/^v//')
  major=${v%%.*}
fi
# The CRI plugin holding the runtimes in `containerd config dump` (2.x
# dumps the migrated config whatever schema the files use).
case "$major" in
  1) plugin='io.containerd.grpc.v1.cri' ;;
  2) plugin='io.containerd.cri.v1.runtime' ;;
  *) die "unsupported containerd major version '$major' (1.6, 1.7 and 2.x are supported)" ;;
esac

# 1. Binaries, where containerd's PATH lookup finds the shim.
install -d "$prefix/bin"
install -m 0755 "$bin_dir/$SHIM" "$bin_dir/$PROXY" "$prefix/bin/"
say "installed $prefix/bin/$SHIM and $prefix/bin/$PROXY"

# 2. Node config: never overwrite the operator's.
install -d -m 0755 "$config_dir"
if [ -f "$config_dir/config.toml" ]; then
  say "kept existing $config_dir/config.toml"
else
  sed -e "s#^binary = \"/usr/bin/sidetunnel-proxy\"#binary = \"$prefix/bin/$PROXY\"#" \
      -e "s#^root_cert = \"/etc/sidetunnel/root-cert.pem\"#root_cert = \"$config_dir/root-cert.pem\"#" \
      "$here/config.toml" > "$config_dir/config.toml"
  chmod 0644 "$config_dir/config.toml"
  say "wrote $config_dir/config.toml (edit [mesh] for your control plane)"
fi

# 3. The main config must import the drop-in directory.
install -d "$dropin_dir"
if [ ! -f "$cd_config" ]; then
  if $add_import; then
    install -d "$(dirname "$cd_config")"
    printf 'version = %s\nimports = ["%s/*.toml"]\n' "$((major + 1))" "$dropin_dir" > "$cd_config"
    say "created $cd_config importing $dropin_dir"
  else
    die "$cd_config does not exist; create it with imports = [\"$dropin_dir/*.toml\"] (or pass --add-import)"
  fi
elif ! grep -Eq "^[[:space:]]*imports[[:space:]]*=.*$dropin_dir" "$cd_config"; then
  if grep -Eq '^[[:space:]]*imports[[:space:]]*=' "$cd_config"; then
    die "$cd_config has an imports list without $dropin_dir: add \"$dropin_dir/*.toml\" to it"
  elif $add_import; then
    cp -p "$cd_config" "$cd_config.sidetunnel-backup"
    # `imports` is a top-level key: it must precede the first [table].
    awk -v line="imports = [\"$dropin_dir/*.toml\"]" '
      !done && /^[[:space:]]*\[/ { print line; done = 1 }
      { print }
      END { if (!done) print line }' "$cd_config.sidetunnel-backup" > "$cd_config"
    say "added imports to $cd_config (backup: $cd_config.sidetunnel-backup)"
  else
    die "$cd_config does not import $dropin_dir: add imports = [\"$dropin_dir/*.toml\"] after its version line (or pass --add-import)"
  fi
fi

# 4. containerd drop-in: the node's effective CRI section plus the
# sidetunnel runtime (containerd replaces imported plugin sections whole;
# see containerd/dropin.sh).
"$here/containerd/dropin.sh" --containerd-config "$cd_config" --out "$dropin" \
  --sidetunnel-config "$config_dir/config.toml" --containerd-major "$major" >/dev/null
if [ "$major" = 1 ]; then
  say "wrote $dropin (containerd 1.x schema, with this node's CRI settings)"
else
  say "wrote $dropin (containerd 2.x: the runtime alone, in the main config's schema)"
fi

# 5. Validate what containerd will load. Its warnings (2.x: "Configuration
# migrated from version 2") go to stderr and are shown, not fatal; 2.x
# dumps strings in single quotes, normalised to double quotes here.
errf=$(mktemp)
trap 'rm -f "$errf"' EXIT
dump=$(containerd --config "$cd_config" config dump 2>"$errf") || die "containerd rejects $cd_config: $(cat "$errf")"
if grep -q 'level=warning' "$errf"; then
  sed -n 's/.*level=warning msg="\([^"]*\)".*/sidetunnel-install: containerd warns: \1/p' "$errf"
fi
section=$(printf '%s\n' "$dump" | tr "'" '"' | awk -v h="[plugins.\"$plugin\".containerd.runtimes.sidetunnel]" '
  { t = $0; gsub(/^[[:space:]]+/, "", t) }
  t == h { on = 1; next }
  on && t ~ /^\[/ && index(t, "runtimes.sidetunnel.options]") == 0 { on = 0 }
  on { print t }')
printf '%s\n' "$section" | grep -q '^runtime_type = "io.containerd.sidetunnel.v1"$' ||
  die "containerd's merged config has no sidetunnel runtime (is $dropin imported?):
$dump"
printf '%s\n' "$section" | grep -q "^ConfigPath = \"$config_dir/config.toml\"\$" ||
  die "the sidetunnel runtime lacks ConfigPath = $config_dir/config.toml in containerd's merged config"
say "containerd config OK: runtime handler sidetunnel -> io.containerd.sidetunnel.v1"

# 6. The proxy uid can execute the configured proxy binary, checked by the
# shim with the launcher's own code (open as root, exec as the proxy uid).
check=$("$prefix/bin/$SHIM" check-proxy "$config_dir/config.toml" 2>&1) ||
  die "pods would fail to start: ${check#check-proxy: }"
say "proxy OK: ${check#check-proxy: }"

case "$prefix/bin" in
  /usr/local/sbin|/usr/local/bin|/usr/sbin|/usr/bin|/sbin|/bin) ;;
  *) say "warning: $prefix/bin is not on the default PATH of containerd's service; containerd 1.6 finds the shim only on its PATH" ;;
esac
[ -f "$config_dir/root-cert.pem" ] || say "next: put the mesh root certificate at $config_dir/root-cert.pem"
say "next: restart containerd (systemctl restart containerd), then kubectl apply -f $here/kubernetes/runtimeclass.yaml"
