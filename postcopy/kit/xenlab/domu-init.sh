#!/bin/busybox sh
# The PVH test domU's /init: load xen-blkfront (lib/modules/load-order, dependencies first), wait
# for /dev/xvda, then hand over to the guest kit's self-checking workload, which reads its settings
# (pgw.dev=/dev/xvda among them) from the kernel command line and prints its markers on hvc0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module" || echo "POSTCOPY-GUEST INIT insmod $module failed"
done
tries=0
while [ ! -b /dev/xvda ] && [ "$tries" -lt 200 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
echo "POSTCOPY-GUEST INIT ready xvda=$([ -b /dev/xvda ] && echo yes || echo no)"
exec /bin/workload
