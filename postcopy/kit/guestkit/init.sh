#!/bin/busybox sh
# The test guest's /init: mount the kernel's file systems, load the virtio modules listed in
# /lib/modules/load-order (dependencies first), wait for /dev/vda, then hand over to the workload.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module.ko" || echo "POSTCOPY-GUEST INIT insmod $module failed"
done
tries=0
while [ ! -b /dev/vda ] && [ "$tries" -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
echo "POSTCOPY-GUEST INIT ready"
exec /bin/workload
