#!/bin/bash
# Build the spice-libvirt Vagrant box (vagrant-libvirt, Debian 12) from Debian packages only.
#
#   build.sh OUT_DIR [PACKAGES_FILE]      -> OUT_DIR/spice-libvirt-debian12.box
#
# Called by lab/spice_libvirt_lab/vagrant_box.py, which runs it at nice 19 / idle I/O and only
# when the digest of this script and of the package list changed. No Vagrant Cloud here, and
# no mirror on the lab network: everything the hypervisors need is baked in (packages.txt).
#
# Why each step is done the way it is (measured on a Debian 12 machine without systemd/udev):
#  * the rootfs is a directory, then `mkfs.ext4 -d`: no tar round trip;
#  * no udev: `losetup -P` makes no loopNp1 node, so it is made from sysfs with mknod;
#  * extlinux, not GRUB: grub-install cannot map such loop partitions;
#  * the machine's own apt cache is hard-linked in (same file system): apt checks every
#    .deb's hash, so a stale one is just fetched again, and the cache is never written;
#  * ssh host keys are made on the VM's first boot (every VM of the box gets its own);
#  * the `vagrant` user carries Vagrant's insecure key, which `vagrant up` replaces.
set -euo pipefail

OUT=${1:?usage: build.sh OUT_DIR [PACKAGES_FILE]}
PACKAGES=${2:-$(dirname "$(readlink -f "$0")")/packages.txt}
SIZE_G=${SPICE_LIBVIRT_BOX_SIZE_G:-8}
BOX_NAME=spice-libvirt-debian12
MIRROR=${SPICE_LIBVIRT_BOX_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEYPUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1)
[ -n "$KEYPUB" ] || { echo "build.sh: Vagrant's insecure public key not found (apt-get install vagrant)" >&2; exit 2; }
INCLUDE=$(grep -v '^\s*#' "$PACKAGES" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')

mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")
WORK=$(mktemp -d "$OUT/work.XXXXXX")
LOOP=""
cleanup() {
    umount "$WORK/mnt" 2>/dev/null || true
    if [ -n "$LOOP" ]; then
        losetup -d "$LOOP" 2>/dev/null || true
        rm -f "${LOOP}p1"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
stamp() { echo "STAGE $1 $(( $(date +%s) - T0 )) s"; T0=$(date +%s); }
T0=$(date +%s)

# 1. root file system
mmdebstrap --quiet --variant=important --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --include="$INCLUDE" \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"; cp -l /var/cache/apt/archives/*.deb "$1/var/cache/apt/archives/" 2>/dev/null || true' \
    --customize-hook='chroot "$1" useradd -m -s /bin/bash -G sudo,libvirt vagrant' \
    --customize-hook='echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/vagrant"; chmod 440 "$1/etc/sudoers.d/vagrant"' \
    --customize-hook="install -d -m 700 \"\$1/home/vagrant/.ssh\" && install -m 600 $KEYPUB \"\$1/home/vagrant/.ssh/authorized_keys\"" \
    --customize-hook='chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh' \
    --customize-hook='printf "UseDNS no\n" > "$1/etc/ssh/sshd_config.d/vagrant.conf"' \
    --customize-hook='echo box > "$1/etc/hostname"; printf "127.0.0.1 localhost\n127.0.1.1 box\n" > "$1/etc/hosts"' \
    --customize-hook='printf "auto lo\niface lo inet loopback\nallow-hotplug eth0\niface eth0 inet dhcp\n" > "$1/etc/network/interfaces"' \
    --customize-hook='echo "LABEL=vroot / ext4 errors=remount-ro 0 1" > "$1/etc/fstab"' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*; printf "[Unit]\nDescription=Make this VM'"'"'s ssh host keys\nBefore=ssh.service\nConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n[Install]\nWantedBy=multi-user.target\n" > "$1/etc/systemd/system/ssh-host-keys.service"; chroot "$1" systemctl enable ssh-host-keys.service' \
    --customize-hook='rm -f "$1/etc/libvirt/qemu/networks/autostart/default.xml"' \
    --customize-hook='chroot "$1" apt-get clean; rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm "$WORK/root" "$MIRROR"
stamp rootfs

# 2. one bootable partition: ext4 labelled vroot, extlinux
truncate -s "${SIZE_G}G" "$WORK/disk.raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$WORK/disk.raw"
LOOP=$(losetup -f --show -P "$WORK/disk.raw")
partx -a "$LOOP" 2>/dev/null || true
if [ ! -b "${LOOP}p1" ]; then
    dev=$(cat "/sys/block/${LOOP#/dev/}/${LOOP#/dev/}p1/dev")
    mknod "${LOOP}p1" b "${dev%:*}" "${dev#*:}"
fi
mkfs.ext4 -q -L vroot -d "$WORK/root" "${LOOP}p1"
rm -rf "$WORK/root"
mkdir "$WORK/mnt"
mount "${LOOP}p1" "$WORK/mnt"
KV=$(ls "$WORK/mnt/boot/" | sed -n 's/^vmlinuz-//p' | head -1)
mkdir -p "$WORK/mnt/boot/extlinux"
extlinux --install "$WORK/mnt/boot/extlinux" >/dev/null 2>&1
cat > "$WORK/mnt/boot/extlinux/extlinux.conf" <<EOF
SERIAL 0 115200
DEFAULT debian
TIMEOUT 0
LABEL debian
  LINUX /boot/vmlinuz-$KV
  INITRD /boot/initrd.img-$KV
  APPEND root=LABEL=vroot ro net.ifnames=0 console=tty0 console=ttyS0,115200 systemd.show_status=false
EOF
umount "$WORK/mnt"
losetup -d "$LOOP"
rm -f "${LOOP}p1"
LOOP=""
dd if=/usr/lib/EXTLINUX/mbr.bin of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
stamp disk

# 3. the box: qcow2 image, metadata, a Vagrantfile of defaults
qemu-img convert -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
rm -f "$WORK/disk.raw"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$SIZE_G" > "$WORK/metadata.json"
cat > "$WORK/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.synced_folder ".", "/vagrant", disabled: true
end
EOF
tar -C "$WORK" -cf "$OUT/$BOX_NAME.box.part" metadata.json Vagrantfile box.img
mv "$OUT/$BOX_NAME.box.part" "$OUT/$BOX_NAME.box"
stamp box
ls -l "$OUT/$BOX_NAME.box"
