#!/usr/bin/env bash
# run-vm.sh IMAGE_DIR CTL_DIR CACHE_DIR [DATA_DISK [rw]]
#
# Boot one test VM (images from build-image.sh) and run CTL_DIR/cmd.sh inside it; exit
# with its exit code (124: timed out, 125: the VM ended without a result). Shares (9p):
# CTL_DIR read-write at /mnt/ctl (command in; rc, timings, logs, results out), the repo
# read-only at /mnt/repo, CACHE_DIR read-only at /mnt/cache (the saved runtime images).
# The guest has no network (-nic none) and its disk is a snapshot: nothing it writes
# outside CTL_DIR survives. DATA_DISK (ext4, /dev/vdb: Docker's data) is a snapshot
# too, unless "rw" follows it (the priming boot that loads the runtime images).
#
# Accelerator: KVM only where the CPU advertises vmx/svm. /dev/kvm can exist without
# them (a nested PVM hypervisor, as on our machines), and that KVM cannot boot a stock
# kernel, so everything else is TCG emulation (~12x slower CPU-bound code).
# Environment: NANOGRID_VM_MEM (MiB, default 4096), NANOGRID_VM_CPUS (default 2),
# NANOGRID_VM_TIMEOUT (s, default 1500), NANOGRID_VM_ACCEL (auto|kvm|tcg).
set -uo pipefail
IMG=${1:?usage: run-vm.sh IMAGE_DIR CTL_DIR CACHE_DIR [DATA_DISK [rw]]}
CTL=$(realpath "${2:?}")
CACHE=$(realpath "${3:?}")
DATA=()
if [ -n "${4:-}" ]; then
    if [ "${5:-}" = rw ]; then mode=snapshot=off,cache=writeback; else mode=snapshot=on,cache=unsafe; fi
    DATA=(-drive "file=$4,format=raw,if=virtio,$mode")
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MEM=${NANOGRID_VM_MEM:-4096}
CPUS=${NANOGRID_VM_CPUS:-2}
TIMEOUT=${NANOGRID_VM_TIMEOUT:-1500}
ACCEL=${NANOGRID_VM_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then
    ACC=(-accel kvm -cpu host)
    APPEND=""
else
    ACC=(-accel tcg,thread=multi,tb-size=512 -cpu max)
    APPEND="mitigations=off"
fi
echo "$ACCEL" >"$CTL/accel"
# nice: the emulator takes every core it is given; others share this machine
timeout --foreground -k 10 "$TIMEOUT" nice -n 10 qemu-system-x86_64 \
    "${ACC[@]}" -m "$MEM" -smp "$CPUS" -machine pc -nodefaults -no-user-config \
    -display none -no-reboot \
    -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 $APPEND" \
    -drive "file=$IMG/rootfs.img,format=raw,if=virtio,snapshot=on,cache=unsafe" "${DATA[@]}" \
    -virtfs "local,path=$CTL,mount_tag=ctl,security_model=none,id=ctl" \
    -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,id=repo,readonly=on" \
    -virtfs "local,path=$CACHE,mount_tag=cache,security_model=none,id=cache,readonly=on" \
    -nic none \
    -serial "file:$CTL/console.log" -chardev stdio,id=out,signal=off -serial chardev:out \
    -device virtio-rng-pci </dev/null
qrc=$?
[ -f "$CTL/rc" ] && exit "$(cat "$CTL/rc")"
if [ $qrc -eq 124 ]; then
    echo "run-vm: timed out after ${TIMEOUT}s" >&2
    exit 124
fi
echo "run-vm: the VM ended (qemu rc=$qrc) without a result; console log tail:" >&2
tail -30 "$CTL/console.log" >&2
exit 125
