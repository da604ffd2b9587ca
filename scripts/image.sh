#!/usr/bin/env bash
# Builds the container image offline with Debian's podman: FROM scratch, the
# ssmfs binary with the shared libraries it links (as ldd lists them), and
# the CA bundle for HTTPS to AWS. Prints the image's name.
#   scripts/image.sh                     the release binary (built if missing)
#   scripts/image.sh --binary PATH       another build (CI: the debug build the
#                                        tests made, stripped, to spare a release build)
#   scripts/image.sh --tag NAME          default localhost/ssmfs:VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
binary=target/release/ssmfs; tag="localhost/ssmfs:$version"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "image.sh: unknown option $1 (--binary PATH, --tag NAME)" >&2; exit 2 ;;
    esac
done
command -v podman >/dev/null || { echo "image.sh: podman is missing: run scripts/setup.sh" >&2; exit 1; }
if [ "$binary" = target/release/ssmfs ] && [ ! -x "$binary" ]; then
    cargo build --release --quiet --bin ssmfs
fi
[ -x "$binary" ] || { echo "image.sh: no binary at $binary" >&2; exit 1; }
context=$(mktemp -d); trap 'rm -rf "$context"' EXIT
rootfs=$context/rootfs
mkdir -p "$rootfs/usr/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/run" "$rootfs/var/lib" "$rootfs/csi"
# The image holds a stripped copy: no symbols, the same code.
objcopy --strip-all "$binary" "$rootfs/usr/bin/ssmfs"
# Each library at the path the binary's loader looks for it.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
# The serving side's own user (not nobody: the plugin trusts this uid alone).
printf 'root:x:0:0::/:/usr/bin/ssmfs\nssmfs-serve:x:64721:64721::/:/usr/bin/ssmfs\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nssmfs-serve:x:64721:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
cp Containerfile "$context/"
podman build --runtime runc --network none --quiet -f "$context/Containerfile" -t "$tag" "$context" >/dev/null
echo "$tag"
