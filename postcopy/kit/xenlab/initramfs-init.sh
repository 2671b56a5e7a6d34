#!/bin/busybox sh
# dom0's initramfs /init: load the virtio, 9p and overlay modules (lib/modules/load-order lists
# them dependencies first), mount the lab's root file system (9p tag "root", read-only) under a
# tmpfs overlay so that dom0 can write anywhere without touching the cache, mount the lab's files
# (tag "kit", read-only) at /xenlab and the run's control share (tag "ctl", uncached) at /ctl,
# then switch_root and run /ctl/dom0-init.sh.  Failures print one "XENLAB FATAL" console line.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fatal() {
    echo "XENLAB FATAL $*"
    exec sh
}
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module" || echo "XENLAB insmod $module failed"
done
P9=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /lower /rw
mount -t 9p -o "$P9,cache=loose,ro" root /lower || fatal "9p root mount failed"
mount -t tmpfs -o size=384m,mode=0755 tmpfs /rw || fatal "tmpfs failed"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fatal "overlay mount failed"
mkdir -p /newroot/xenlab /newroot/ctl
mount -t 9p -o "$P9,cache=loose,ro" kit /newroot/xenlab || fatal "9p kit mount failed"
mount -t 9p -o "$P9" ctl /newroot/ctl || fatal "9p ctl mount failed"
[ -r /newroot/ctl/dom0-init.sh ] || fatal "no /ctl/dom0-init.sh"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /bin/sh /ctl/dom0-init.sh
