#!/usr/bin/env bash
# build-image.sh NAME OUT_DIR
#
# Build one throw-away cgroup v2 Docker host for `make test-cgroup2`:
#   OUT_DIR/vmlinuz      the distro's own generic kernel (has 9p; the cloud flavour does not)
#   OUT_DIR/initrd.img   a busybox initramfs that only loads virtio/ext4 and switches root
#   OUT_DIR/rootfs.img   sparse ext4: minbase + docker.io + redis-server + python3, a venv
#                        with the project's Python dependencies (the guest has no network,
#                        so they are installed here), and vm/guest/init as PID 1
# NAME is debian12 (bookworm: kernel 6.1, docker.io 20.10) or debian13 (trixie: kernel
# 6.12, docker.io 26). Packages come from the Debian archive this host's apt uses, Python
# packages through this host's pip configuration. ~1-2 min; vm/test-cgroup2.sh caches
# the result keyed by a hash of its inputs.
set -euo pipefail

NAME=${1:?usage: build-image.sh debian12|debian13 OUT_DIR}
OUT=${2:?usage: build-image.sh debian12|debian13 OUT_DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

case $NAME in
    debian12) SUITE=bookworm SECURITY=bookworm-security UPDATES=bookworm-updates EXTRA="" ;;
    # trixie split the docker CLI out of docker.io
    debian13) SUITE=trixie SECURITY=trixie-security UPDATES=trixie-updates EXTRA=,docker-cli ;;
    *) echo "build-image: unknown image $NAME (debian12|debian13)" >&2; exit 2 ;;
esac
MIRROR=${NANOGRID_VM_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${MIRROR%/debian}/debian-security

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/nanogrid-vm-build.XXXXXX")
ROOT=$WORK/rootfs
cleanup() {
    for m in opt/pypi opt/pypi-more opt/wheels proc; do
        mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
t0=$SECONDS
lap() { echo "build-image[$NAME]: $1 done at $((SECONDS - t0))s"; }

# -- 1. root filesystem ------------------------------------------------------------------
# The kernel comes from the suite itself (linux-image-amd64), so each image boots the
# kernel its distro ships. initramfs-tools' hooks are excluded: we boot our own initramfs.
PKGS=docker.io,tini,iptables,iproute2,python3,python3-venv,ca-certificates,kmod,busybox-static
PKGS=$PKGS,procps,redis-server,linux-image-amd64,xz-utils,zstd$EXTRA
mmdebstrap --variant=minbase --include="$PKGS" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/etc/kernel/postinst.d/*' \
    --dpkgopt='path-exclude=/usr/share/initramfs-tools/hooks/*' \
    "$SUITE" "$ROOT" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $UPDATES main" "deb $SECURITY_MIRROR $SECURITY main" \
    >"$WORK/mmdebstrap.log" 2>&1 || { tail -30 "$WORK/mmdebstrap.log" >&2; exit 1; }
lap mmdebstrap

# -- 2. Python dependencies of the project (runtime + what the tests import) ------------
# Read from pyproject.toml so the guest matches what `pip install -e .[dev]` gives the host,
# minus the dev tools the guest never runs (linters, plotting, Flower).
mapfile -t DEPS < <(python3 - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
skip = ("ruff", "flower", "matplotlib")
deps = p["dependencies"] + [d for d in p["optional-dependencies"]["dev"] if not d.startswith(skip)]
print("\n".join(deps))
PY
)
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/tmp/host-ca.pem" # the host's trust (proxies)
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
for d in /opt/pypi /opt/pypi-more /opt/wheels; do  # local wheel mirrors named by pip.conf
    if [ -d "$d" ]; then mkdir -p "$ROOT$d"; mount --bind -o ro "$d" "$ROOT$d"; fi
done
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" python3 -m venv /opt/nanogrid-venv
# shellcheck disable=SC2046
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root $(env | grep '^PIP_' | tr '\n' ' ') \
    PIP_CERT=/tmp/host-ca.pem chroot "$ROOT" /opt/nanogrid-venv/bin/pip install -q "${DEPS[@]}" \
    >"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log" >&2; exit 1; }
umount "$ROOT/proc"
for d in /opt/pypi /opt/pypi-more /opt/wheels; do
    mountpoint -q "$ROOT$d" && umount "$ROOT$d" && rmdir "$ROOT$d"
done
rm -f "$ROOT/etc/pip.conf" "$ROOT/tmp/host-ca.pem"
rmdir "$ROOT/opt/pypi-more" "$ROOT/opt/pypi" "$ROOT/opt/wheels" 2>/dev/null || true
# bytecode now, not at every import: under emulation compiling celery/boto3 on each
# worker start costs tens of seconds
chroot "$ROOT" /opt/nanogrid-venv/bin/python -m compileall -q /opt/nanogrid-venv >/dev/null || true
lap python-deps

# -- 3. kernel, trimmed modules, guest init ----------------------------------------------
KVER=$(basename "$(ls -d "$ROOT"/usr/lib/modules/* | head -1)")
mkdir -p "$OUT"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
M=$ROOT/usr/lib/modules/$KVER/kernel
rm -rf "$M"/drivers/{gpu,media,net/wireless,net/ethernet,infiniband,staging,bluetooth,iio,usb} \
    "$M"/drivers/{isdn,hid,input,scsi,ata,md,thunderbolt,video,platform} "$M"/sound \
    "$M"/net/{wireless,bluetooth,mac80211} \
    "$M"/fs/{btrfs,xfs,ocfs2,nfs,nfsd,ceph,smb,gfs2,f2fs,jfs,reiserfs,ntfs3,ubifs} "$ROOT"/boot/*
chroot "$ROOT" depmod "$KVER"
install -m 755 "$HERE/guest/init" "$ROOT/usr/sbin/nanogrid-vm-init"
echo "$NAME" >"$ROOT/etc/nanogrid-vm-image"
rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/etc/resolv.conf
: >"$ROOT/etc/resolv.conf"
lap kernel

# -- 4. initramfs: just enough modules to mount the virtio ext4 disk ------------------
I=$WORK/initrd
mkdir -p "$I"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOT/usr/bin/busybox" "$I/bin/"
install -m 755 "$HERE/guest/initramfs-init" "$I/init"
MD=$ROOT/usr/lib/modules/$KVER
order=""
add_module() { # resolve dependencies through modules.dep, append in load order
    local path deps d
    path=$(grep -E "(^|/)$1\.ko(\.xz|\.zst)?:" "$MD/modules.dep" | head -1 | cut -d: -f1) || true
    [ -n "$path" ] || return 0 # built in
    case " $order " in *" $path "*) return 0 ;; esac
    deps=$(grep -E "^$path:" "$MD/modules.dep" | cut -d: -f2)
    for d in $deps; do add_module "$(basename "$d" | sed -E 's/\.ko(\.xz|\.zst)?$//')"; done
    case " $order " in *" $path "*) return 0 ;; esac
    order="$order $path"
}
for m in virtio_pci virtio_blk crc32c_generic ext4; do add_module "$m"; done
: >"$I/modules.list"
for p in $order; do
    f=$(basename "$p")
    case $f in # busybox insmod wants plain .ko (trixie ships .ko.xz)
        *.xz) xz -dc "$MD/$p" >"$I/lib/modules/${f%.xz}"; f=${f%.xz} ;;
        *.zst) zstd -qdc "$MD/$p" >"$I/lib/modules/${f%.zst}"; f=${f%.zst} ;;
        *) cp "$MD/$p" "$I/lib/modules/$f" ;;
    esac
    echo "$f" >>"$I/modules.list"
done
(cd "$I" && find . | "$ROOT/usr/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$OUT/initrd.img.tmp"
lap initramfs

# -- 5. ext4 image, populated without mounting; room for Docker's layers -------------
rm -f "$OUT/rootfs.img.tmp"
mke2fs -q -t ext4 -L nanogrid-vm -E root_owner=0:0 -d "$ROOT" "$OUT/rootfs.img.tmp" 8G
for f in vmlinuz initrd.img rootfs.img; do mv "$OUT/$f.tmp" "$OUT/$f"; done
echo "kernel=$KVER suite=$SUITE" >"$OUT/info"
lap ext4-image
