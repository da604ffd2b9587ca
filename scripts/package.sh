#!/usr/bin/env bash
# Builds the Debian package for worker hosts, dist/ssmfs_VERSION_amd64.deb:
# the binary in /usr/bin, the systemd unit from packaging/systemd (pointed
# at /usr/bin/ssmfs) with its environment file as a conffile, the docs, and
# a dependency on fuse3 (mount.fuse3 runs `ssmfs` for `mount -t fuse.ssmfs`
# and fstab). Then `--check` installs it into a scratch root with
# `dpkg --root`, checks the files, the unit (systemd-analyze verify), a real
# `mount -t fuse.ssmfs` with the installed binary against moto, and runs
# lintian (what it still says is explained in packaging/lintian-overrides).
#   scripts/package.sh [--binary PATH] [--check]
#   PATH: default target/release/ssmfs (built if missing); CI packages the
#   debug build the tests made, stripped, to spare a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
binary=target/release/ssmfs; check=0
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --check) check=1; shift ;;
        *) echo "package.sh: unknown option $1 (--binary PATH, --check)" >&2; exit 2 ;;
    esac
done
if [ "$binary" = target/release/ssmfs ] && [ ! -x "$binary" ]; then
    cargo build --release --quiet --bin ssmfs
fi
[ -x "$binary" ] || { echo "package.sh: no binary at $binary" >&2; exit 1; }
deb=dist/ssmfs_${version}_amd64.deb
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
root=$stage/pkg
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/ssmfs" \
    "$root/usr/share/doc/ssmfs" "$root/usr/share/man/man1"
objcopy --strip-all "$binary" "$root/usr/bin/ssmfs"
chmod 755 "$root/usr/bin/ssmfs"
sed 's|/usr/local/bin/ssmfs|/usr/bin/ssmfs|g' packaging/systemd/ssmfs-airflow.service \
    > "$root/lib/systemd/system/ssmfs-airflow.service"
install -m 600 packaging/systemd/ssmfs-airflow.env "$root/etc/ssmfs/airflow.env"
for doc in README.md docs/*.md; do
    install -m 644 "$doc" "$root/usr/share/doc/ssmfs/$(basename "$doc")"
done
gzip -9n "$root/usr/share/doc/ssmfs/"*.md
install -m 644 packaging/debian/copyright "$root/usr/share/doc/ssmfs/copyright"
sed "s/@VERSION@/$version/; s/@DATE@/$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")/" \
    packaging/debian/changelog | gzip -9n > "$root/usr/share/doc/ssmfs/changelog.gz"
# The manual page is the binary's own help, so it never says other things.
{
    echo '.TH SSMFS 1 "" "ssmfs '"$version"'" "User Commands"'
    echo '.SH NAME'
    echo 'ssmfs \- mount AWS SSM Parameter Store as a read-only filesystem'
    echo '.SH DESCRIPTION'
    echo '.nf'
    "$root/usr/bin/ssmfs" --help | sed 's/\\/\\\\/g; s/^\./\\\&./'
    echo '.fi'
} | gzip -9n > "$root/usr/share/man/man1/ssmfs.1.gz"
install -d "$root/usr/share/lintian/overrides"
install -m 644 packaging/lintian-overrides "$root/usr/share/lintian/overrides/ssmfs"
echo /etc/ssmfs/airflow.env > "$root/DEBIAN/conffiles"
depends=$(dpkg-shlibdeps -O -e"$root/usr/bin/ssmfs" 2>/dev/null | sed -n 's/^shlibs:Depends=//p' || true)
[ -n "$depends" ] || depends="libc6 (>= 2.34), libgcc-s1 (>= 4.2)"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: ssmfs
Version: $version
Architecture: amd64
Maintainer: ssmfs developers <ssmfs@example.org>
Installed-Size: $size
Depends: fuse3, $depends
Section: admin
Priority: optional
Homepage: https://github.com/ssmfs/ssmfs
Description: mount AWS SSM Parameter Store as a read-only filesystem
 ssmfs mounts a Parameter Store hierarchy as read-only files, fetches values
 lazily and keeps them in a bounded cache, so shell tasks, Airflow workers
 and any program that reads secrets from files get them without an AWS SDK.
 The package carries the systemd unit for an Airflow worker host
 (ssmfs-airflow.service) and the CSI node driver (ssmfs csi).
CONTROL
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
mkdir -p dist
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
[ $check = 1 ] || exit 0

# ----- the check -----
scratch=$stage/root
mkdir -p "$scratch/var/lib/dpkg/info" "$scratch/var/lib/dpkg/updates"
touch "$scratch/var/lib/dpkg/status" "$scratch/var/lib/dpkg/available"
# fuse3 is the host's (the scratch root has no packages at all).
dpkg --root="$scratch" --force-depends --force-script-chrootless -i "$deb" >"$stage/dpkg.log" 2>&1 \
    || { cat "$stage/dpkg.log" >&2; exit 1; }
dpkg --root="$scratch" -s ssmfs | grep -q '^Status: install ok installed'
for file in usr/bin/ssmfs lib/systemd/system/ssmfs-airflow.service etc/ssmfs/airflow.env \
    usr/share/doc/ssmfs/copyright usr/share/man/man1/ssmfs.1.gz; do
    [ -e "$scratch/$file" ] || { echo "package.sh: $file missing after dpkg -i" >&2; exit 1; }
done
[ "$(stat -c %a "$scratch/etc/ssmfs/airflow.env")" = 600 ] || { echo "package.sh: the env file is not 0600" >&2; exit 1; }
"$scratch/usr/bin/ssmfs" --version >/dev/null
if command -v systemd-analyze >/dev/null; then
    # The installed unit, its ExecStart pointed into the scratch root.
    mkdir -p "$stage/units"
    sed "s|/usr/bin/ssmfs|$scratch/usr/bin/ssmfs|" "$scratch/lib/systemd/system/ssmfs-airflow.service" \
        > "$stage/units/ssmfs-airflow.service"
    systemd-analyze verify "$stage/units/ssmfs-airflow.service" 2>&1 \
        | grep -v -e 'airflow-worker.service' -e '^$' > "$stage/verify.log" || true
    if [ -s "$stage/verify.log" ]; then
        echo "package.sh: systemd-analyze verify:" >&2; cat "$stage/verify.log" >&2; exit 1
    fi
fi
# mount(8) with type fuse.ssmfs goes through fuse3's mount.fuse3, which runs
# `ssmfs` from /usr/bin: in a mount namespace of its own, the scratch root's
# /usr/bin is laid over the host's (an overlay), as if the package were
# installed here.
port=5079
endpoint=$(scripts/moto.sh start $port)
mnt=$stage/mnt; mkdir -p "$mnt"
export AWS_ACCESS_KEY_ID=pkg AWS_SECRET_ACCESS_KEY=pkg AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
.venv/bin/python - "$endpoint" <<'PY'
import sys, boto3
boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1").put_parameter(
    Name="/pkg/greeting", Value="installed", Type="String", Overwrite=True)
PY
got=$(unshare --mount --propagation private sh -euc '
    mount -t overlay overlay -o "lowerdir=$1/usr/bin:/usr/bin" /usr/bin
    mount -t fuse.ssmfs /pkg "$2" -o "endpoint_url=$3"
    cat "$2/greeting"; umount "$2"' sh "$scratch" "$mnt" "$endpoint") || got="(mount failed)"
scripts/moto.sh stop $port
[ "$got" = installed ] || { echo "package.sh: mount -t fuse.ssmfs read '$got'" >&2; exit 1; }
lintian --allow-root --fail-on error,warning "$deb"
echo "package.sh: $deb installs, its unit verifies, mount -t fuse.ssmfs runs it, lintian is clean"
