#!/usr/bin/env bash
# test-cgroup2.sh [IMAGE...]   (`make test-cgroup2`; default: debian12 debian13)
#
# For each image: build the VM (cached), boot it with the runtime images this host's
# Docker has, run the tests marked `cgroups` against a real worker inside it, and print
# the pytest summary plus `docker info`'s cgroup version. Exit code: 0 only if every
# image passed.
#
# Cache: $NANOGRID_VM_CACHE (default /var/cache/nanogrid-vm). A VM image is keyed by a
# hash of its inputs (the build script, the guest files, the dependencies in
# pyproject.toml) and rebuilt
# when they change; the runtime images' `docker save`, and each VM's Docker data disk
# with them loaded, are keyed by their image ids.
# Environment: NANOGRID_VM_IMAGES (default "debian12 debian13"),
# NANOGRID_VM_EXECUTORS (default "agent exec"), NANOGRID_VM_PYTEST_ARGS (default
# "-m cgroups tests/integration"), plus run-vm.sh's NANOGRID_VM_* knobs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
CACHE=${NANOGRID_VM_CACHE:-/var/cache/nanogrid-vm}
OUTROOT=$REPO/build/cgroup2
read -r -a IMAGES <<<"${*:-${NANOGRID_VM_IMAGES:-debian12 debian13}}"
EXECUTORS=${NANOGRID_VM_EXECUTORS:-agent exec}
PYTEST_ARGS=${NANOGRID_VM_PYTEST_ARGS:--m cgroups tests/integration}
RUNTIME_IMAGES=(nanogrid-python:latest nanogrid-cpp:latest)
mkdir -p "$CACHE" "$OUTROOT"

need() { command -v "$1" >/dev/null || missing+=("$2"); }
missing=()
need qemu-system-x86_64 qemu-system-x86
need mmdebstrap mmdebstrap
need mke2fs e2fsprogs
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-cgroup2: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

# -- runtime images: docker save, keyed by image id -----------------------------------
for img in "${RUNTIME_IMAGES[@]}"; do
    docker image inspect "$img" >/dev/null 2>&1 || {
        echo "test-cgroup2: $img missing, building the runtime images"
        "$REPO/.venv/bin/nanogrid" images build
        break
    }
done
ids=$(docker image inspect -f '{{.Id}}' "${RUNTIME_IMAGES[@]}" | sha256sum | cut -c1-16)
SAVE=$CACHE/images-$ids
if [ ! -f "$SAVE/runtime-images.tar" ]; then
    t=$SECONDS
    rm -rf "$CACHE"/images-*
    mkdir -p "$SAVE"
    docker save -o "$SAVE/runtime-images.tar.tmp" "${RUNTIME_IMAGES[@]}"
    mv "$SAVE/runtime-images.tar.tmp" "$SAVE/runtime-images.tar"
    echo "test-cgroup2: saved ${RUNTIME_IMAGES[*]} ($(du -sh "$SAVE" | cut -f1), $((SECONDS - t))s)"
fi

# The guest runs ~12x slower under TCG: the harness scales its waits by this factor.
slowdown=12
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ "${NANOGRID_VM_ACCEL:-auto}" != tcg ]; then
    slowdown=2
fi

overall=0
summary=()
for name in "${IMAGES[@]}"; do
    key=$(cat "$HERE/build-image.sh" "$HERE/guest/init" "$HERE/guest/initramfs-init" \
        <(python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(p["dependencies"], p["optional-dependencies"])' "$REPO/pyproject.toml") \
        <(echo "$name") | sha256sum | cut -c1-16)
    img=$CACHE/$name-$key
    build_s=cached
    if [ ! -f "$img/rootfs.img" ]; then
        echo "=== test-cgroup2: building VM image $name (inputs changed or first run)"
        t=$SECONDS
        rm -rf "$CACHE/$name"-*
        nice -n 10 "$HERE/build-image.sh" "$name" "$img.tmp"
        mv "$img.tmp" "$img"
        build_s="$((SECONDS - t))s"
    fi
    out=$OUTROOT/$name
    rm -rf "$out"
    mkdir -p "$out"
    # Docker's data disk with the runtime images loaded: `docker load` of ~0.5 GB takes
    # minutes under emulation, so one priming boot per (image, runtime image ids)
    # (keyed by distro and image ids only: a rebuilt VM image keeps it)
    data=$CACHE/docker-$name-$ids.img
    prime_s=cached
    if [ ! -f "$data" ]; then
        echo "=== test-cgroup2: priming $name's Docker with the runtime images"
        t=$SECONDS
        rm -f "$CACHE/docker-$name"-*.img
        mkdir -p "$out/prime"
        mke2fs -q -t ext4 -E root_owner=0:0 "$data.tmp" 6G
        echo 'docker load -q -i /mnt/cache/runtime-images.tar && docker images' >"$out/prime/cmd.sh"
        "$HERE/run-vm.sh" "$img" "$out/prime" "$SAVE" "$data.tmp" rw
        mv "$data.tmp" "$data"
        prime_s="$((SECONDS - t))s"
    fi
    cp "$HERE/guest/run-suite.sh" "$out/cmd.sh"
    {
        printf 'EXECUTORS=%q\n' "$EXECUTORS"
        printf 'SLOWDOWN=%q\n' "$slowdown"
        printf 'PYTEST_ARGS=%q\n' "$PYTEST_ARGS"
    } >"$out/suite.env"
    echo "=== test-cgroup2: $name ($(cat "$img/info")), executors: $EXECUTORS"
    t=$SECONDS
    rc=0
    "$HERE/run-vm.sh" "$img" "$out" "$SAVE" "$data" || rc=$?
    wall=$((SECONDS - t))
    timing() { awk -v k="$1" '$1 == k { print $2 }' "$out/timings" 2>/dev/null | tail -1; }
    boot=$(timing dockerd_ready)
    loaded=$(timing images_loaded)
    ready=$(timing services_ready)
    end=$(timing cmd_end)
    tests=$(awk -v a="${ready:-0}" -v b="${end:-0}" 'BEGIN { printf "%.0f", b - a }')
    line="$name: rc=$rc kernel=$(cat "$out/kernel" 2>/dev/null) docker=$(cat "$out/docker-version" 2>/dev/null)"
    line+=" cgroup=v$(cat "$out/cgroup-version" 2>/dev/null) accel=$(cat "$out/accel" 2>/dev/null)"
    line+=" | build=$build_s prime=$prime_s boot=${boot:-?}s images+services=$(awk -v a="${boot:-0}" -v b="${ready:-0}" 'BEGIN { printf "%.0f", b - a }')s"
    line+=" tests=${tests}s vm-total=${wall}s"
    for j in "$out"/junit-*.xml; do
        [ -f "$j" ] || continue
        line+=" | $(basename "$j" .xml | sed 's/junit-//'): $(python3 - "$j" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{t - f - e - k} passed, {f} failed, {e} errors, {k} skipped in {float(s.get('time', 0)):.0f}s")
PY
)"
    done
    for f in "$out"/figures-*.txt; do # peak memory / CPU time, one line per distinct program
        [ -f "$f" ] && echo "--- $name $(basename "$f" .txt):" && sort -u -k1,1 "$f" | sed 's/^/    /'
    done
    summary+=("$line")
    echo "=== $line"
    [ $rc -eq 0 ] || overall=1
done
echo "=== test-cgroup2 summary"
printf '  %s\n' "${summary[@]}"
exit $overall
