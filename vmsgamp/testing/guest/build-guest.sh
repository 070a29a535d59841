#!/usr/bin/env bash
# build-guest.sh -- a tiny Linux guest for trying vmsgamp's PCI carriers
# (vfio:, pci:, uio:) in QEMU, with no hardware and no root filesystem image.
#
# What it builds, from Debian packages only (fetched with `apt-get download`
# and cached; nothing is installed unless you pass --install):
#   * the Debian kernel that `linux-image-amd64` depends on (vmlinuz), and
#   * a busybox initramfs whose /init
#       1. mounts proc, sys, dev and insmods a fixed module list in dependency
#          order (virtio-pci, 9p, vfio-pci, uio_pci_generic, virtio-rng,
#          virtio_blk; the kernel package has no modules.dep, so no modprobe);
#       2. mounts the HOST's root file system read-only over 9p at /host
#          (QEMU: -virtfs local,path=/,mount_tag=hostroot,readonly=on,...);
#       3. optionally mounts a writable 9p share (mount_tag=run) over the host
#          directory named by `vmsgamp.run=DIR` on the kernel command line;
#       4. runs DIR/cmd.sh (or the host executable `vmsgamp.exec=PATH`) inside
#          `chroot /host` with /proc, /sys, /dev and a tmpfs /dev/shm mounted,
#          so the guest runs the host's own Python and the installed vmsgamp;
#       5. writes the command's output to DIR/output and its exit code to
#          DIR/rc, prints `VMSGAMP-GUEST-EXIT <rc>` on the serial console, and
#          powers off.
#
# Lives in the package (vmsgamp/testing/guest/) so an installed vmsgamp has it;
# tools/guest/build-guest.sh in a checkout runs this same script.
#
# Usage:
#   build-guest.sh [--cache DIR] [--kernel-version 6.1.0-N-amd64]
#                              [--install] [--force] [--quiet]
# Prints, as its last two lines on stdout:
#   KERNEL=/path/to/vmlinuz-VERSION
#   INITRD=/path/to/initramfs-VERSION-HASH.cpio.gz
# Cache: --cache, else $VMSGAMP_GUEST_CACHE, else
#   ${XDG_CACHE_HOME:-~/.cache}/vmsgamp/guest   (never inside the repository).
# --install: `apt-get install -y qemu-system-x86 busybox-static cpio` first
#   (root only).  The build itself needs apt-get (for the download), dpkg-deb
#   and gzip; busybox's own cpio is used when cpio is missing.
#
# Try the PCIe path by hand (see docs/qemu-guest.md for the full walk-through):
#   eval "$(tools/guest/build-guest.sh | grep -E '^(KERNEL|INITRD)=')"
#   python -m vmsgamp ivshmem-server ...   # or vmsgamp.testing.qemu_guest
#   mkdir -p /tmp/g && printf 'lspci 2>/dev/null; ls /sys/bus/pci/devices\n' > /tmp/g/cmd.sh
#   qemu-system-x86_64 -accel tcg -machine q35,kernel-irqchip=split -m 512M \
#     -nodefaults -display none -serial stdio -no-reboot \
#     -device intel-iommu,intremap=on \
#     -kernel "$KERNEL" -initrd "$INITRD" \
#     -append "console=ttyS0 panic=-1 intel_iommu=on vmsgamp.run=/tmp/g" \
#     -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
#     -virtfs local,path=/tmp/g,mount_tag=run,security_model=none
#   cat /tmp/g/output /tmp/g/rc
# Kernel command-line words the init understands: vmsgamp.run=DIR,
# vmsgamp.exec=PATH, vmsgamp.timeout=SECONDS (kill the command after that),
# vmsgamp.shell=1 (a busybox shell on the console instead of powering off).
set -euo pipefail

# Modules, in dependency order (each one's depends= must come earlier; checked).
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    netfs fscache 9pnet 9pnet_virtio 9p
    irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci
    uio uio_pci_generic
    virtio-rng virtio_blk
)

cache="${VMSGAMP_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmsgamp/guest}"
kver=""
install=0
force=0
quiet=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) cache="$2"; shift 2 ;;
        --cache=*) cache="${1#*=}"; shift ;;
        --kernel-version) kver="$2"; shift 2 ;;
        --kernel-version=*) kver="${1#*=}"; shift ;;
        --install) install=1; shift ;;
        --force) force=1; shift ;;
        --quiet|-q) quiet=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-guest.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

say() { [ "$quiet" = 1 ] || echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

if [ "$install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--install needs root (apt-get install)"
    say "installing qemu-system-x86 busybox-static cpio with apt-get"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-system-x86 busybox-static cpio >&2
fi

mkdir -p "$cache/debs"
cache="$(cd "$cache" && pwd)"
script_hash="$(sha256sum "$0" | cut -c1-12)"

# ---- which kernel --------------------------------------------------------------
apt_updated=0
apt_update() {   # refresh the package lists once (root only; installs nothing)
    [ "$apt_updated" = 0 ] && [ "$(id -u)" = 0 ] || return 1
    apt_updated=1
    say "apt-get update (the package lists are missing or stale)"
    apt-get update -q >&2
}
kernel_dep() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1 || true
}
if [ -z "$kver" ]; then
    kver="$(kernel_dep)"
    if [ -z "$kver" ] && apt_update; then kver="$(kernel_dep)"; fi
    if [ -z "$kver" ]; then
        # No apt lists (apt-get update never ran): fall back to a cached kernel.
        kver="$(ls "$cache" 2>/dev/null | sed -n 's/^vmlinuz-\(.*\)$/\1/p' | sort -V | tail -n1)"
        [ -n "$kver" ] || die "cannot tell which kernel linux-image-amd64 depends on; run 'apt-get update' (as root) first"
        say "apt-cache knows no linux-image-amd64; using the cached kernel $kver"
    fi
fi

kernel="$cache/vmlinuz-$kver"
initrd="$cache/initramfs-$kver-$script_hash.cpio.gz"
if [ "$force" = 0 ] && [ -s "$kernel" ] && [ -s "$initrd" ]; then
    say "cached: $kernel, $initrd"
    touch "$initrd" 2>/dev/null || true     # in use: keep it out of the pruning below
    echo "KERNEL=$kernel"
    echo "INITRD=$initrd"
    exit 0
fi

# One build at a time per cache (parallel test runs share it).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.lock"
    flock -w 900 9 || die "another build holds $cache/.lock"
    if [ "$force" = 0 ] && [ -s "$kernel" ] && [ -s "$initrd" ]; then
        echo "KERNEL=$kernel"
        echo "INITRD=$initrd"
        exit 0
    fi
fi

# ---- downloads (cached .debs) --------------------------------------------------
fetch() {   # fetch PACKAGE -> prints the .deb path
    local pkg="$1" deb
    deb="$(ls "$cache/debs/${pkg}_"*.deb 2>/dev/null | head -n1 || true)"
    if [ -z "$deb" ] || [ "$force" = 1 ]; then
        say "apt-get download $pkg"
        if ! (cd "$cache/debs" && apt-get download -q "$pkg" >&2 2>&1); then
            apt_update && (cd "$cache/debs" && apt-get download -q "$pkg" >&2 2>&1) \
                || die "apt-get download $pkg failed (run 'apt-get update' first?)"
        fi
        deb="$(ls -t "$cache/debs/${pkg}_"*.deb | head -n1)"
    fi
    echo "$deb"
}
kdeb="$(fetch "linux-image-$kver")"
bdeb="$(fetch busybox-static)"

work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "extracting $(basename "$kdeb")"
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/bb"
[ -f "$work/k/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $kdeb"
busybox="$work/bb/bin/busybox"
[ -x "$busybox" ] || die "no bin/busybox in $bdeb"

# ---- the initramfs tree ----------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,host,tmp,modules}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
moddir="$work/k/lib/modules/$kver"
seen=" "
: > "$root/modules/order"
for m in "${MODULES[@]}"; do
    ko="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
    [ -n "$ko" ] || die "module $m not found in $kdeb"
    case "$ko" in *.xz) xz -dc "$ko" > "$root/modules/$m.ko" ;; *) cp "$ko" "$root/modules/$m.ko" ;; esac
    deps="$(grep -ao 'depends=[A-Za-z0-9_,-]*' "$root/modules/$m.ko" | head -n1 | cut -d= -f2)"
    for d in ${deps//,/ }; do
        # module names: '-' and '_' are the same thing
        case "$seen" in *" ${d//-/_} "*) ;; *) die "module $m needs $d, which is not loaded before it" ;; esac
    done
    seen="$seen${m//-/_} "
    echo "$m" >> "$root/modules/order"
done

cat > "$root/init" <<'INIT'
#!/bin/sh
# vmsgamp guest init (generated by tools/guest/build-guest.sh)
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vmsgamp-guest: $*"; }
param() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return;; esac; done; }
finish() {
    sync
    if [ "$(param vmsgamp.shell)" = 1 ]; then say "shell (exit to power off)"; setsid cttyhack sh; fi
    poweroff -f
    sleep 5
}
for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" 2>/dev/null || say "insmod $m failed"
done
if ! mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /host; then
    say "cannot mount the host root (9p tag hostroot); is -virtfs ...mount_tag=hostroot given?"
    echo "VMSGAMP-GUEST-EXIT 125"; finish
fi
run="$(param vmsgamp.run)"
exe="$(param vmsgamp.exec)"
tmo="$(param vmsgamp.timeout)"
if [ -n "$run" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none run "/host$run" \
        || { say "cannot mount the run share (9p tag run) on $run"; echo "VMSGAMP-GUEST-EXIT 125"; finish; }
fi
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t devpts devpts /host/dev/pts 2>/dev/null
if [ -n "$run" ] && [ -z "$exe" ]; then exe="/bin/sh $run/cmd.sh"; fi
if [ -z "$exe" ]; then
    say "nothing to run (give vmsgamp.run=DIR or vmsgamp.exec=PATH)"; rc=0
else
    say "running: $exe"
    pre=""
    [ -n "$tmo" ] && pre="timeout -s KILL $tmo"
    out=/dev/console
    [ -n "$run" ] && out="/host$run/output"
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        TMPDIR=/dev/shm LANG=C.UTF-8 TERM=dumb \
        $pre chroot /host $exe > "$out" 2>&1
    rc=$?
fi
[ -n "$run" ] && echo "$rc" > "/host$run/rc"
sync
echo "VMSGAMP-GUEST-EXIT $rc"
finish
INIT
chmod 755 "$root/init"

say "packing the initramfs"
if command -v cpio >/dev/null 2>&1; then cpio_cmd=(cpio -o -H newc --quiet --owner=0:0); else cpio_cmd=("$busybox" cpio -o -H newc); fi
(cd "$root" && find . | LC_ALL=C sort | "${cpio_cmd[@]}" 2>/dev/null) | gzip -6 > "$work/initramfs.tmp"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz.tmp"
mv -f "$work/vmlinuz.tmp" "$kernel"
mv -f "$work/initramfs.tmp" "$initrd"
# Initramfs builds of other script versions may still be in use by another
# checkout sharing this cache (a QEMU of theirs may be about to open one):
# prune only those unused for a week.
find "$cache" -maxdepth 1 -name "initramfs-$kver-*.cpio.gz" ! -name "${initrd##*/}" -mtime +7 \
    -delete 2>/dev/null || true
say "built $kernel and $initrd ($(du -k "$initrd" | cut -f1) KiB)"
echo "KERNEL=$kernel"
echo "INITRD=$initrd"
