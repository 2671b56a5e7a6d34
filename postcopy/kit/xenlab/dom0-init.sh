#!/bin/sh
# dom0's PID 1 once on the lab's root file system: kernel file systems, the device nodes udev would
# make, the Xen modules and daemons (xenstored, xen-init-dom0, xenconsoled logging every guest's
# console to /ctl/console/guest-NAME.log), then the command agent.
#
# The agent: the host drops /ctl/cmd/N.limit (seconds) and then /ctl/cmd/N.sh; the agent renames
# N.sh to N.run, runs it in the background under `timeout` (its output in /ctl/out/N.out), and
# writes the exit status to /ctl/out/N.rc last (124 when the deadline killed it).  /ctl/ready says
# that dom0 is up.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# devtmpfs lacks these; without /dev/stdin the hotplug scripts' lock loop spins until libxl gives up
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
echo "XENLAB dom0-init uptime=$(cut -d' ' -f1 /proc/uptime)"
for module in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback nbd loop dm-mod; do
    modprobe "$module" || echo "XENLAB modprobe $module failed"
done
mount -t xenfs xenfs /proc/xen || echo "XENLAB FATAL xenfs mount failed"
# The project's checkout (9p tag "project"), at the host's path so that its venv works unchanged.
if [ -r /ctl/project-path ]; then
    project=$(cat /ctl/project-path)
    mkdir -p "$project"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro project "$project" \
        || echo "XENLAB FATAL 9p project mount failed"
fi
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen /var/lib/xen /var/lib/xenstored \
    /ctl/console /ctl/cmd /ctl/out
hostname dom0
busybox ip link set lo up
xenstored --pid-file /run/xenstored.pid || echo "XENLAB FATAL xenstored failed"
xen-init-dom0 || echo "XENLAB FATAL xen-init-dom0 failed"
xenconsoled --log=guest --log-dir=/ctl/console --pid-file /run/xenconsoled.pid \
    || echo "XENLAB FATAL xenconsoled failed"
xl list >/dev/null 2>&1 || echo "XENLAB FATAL xl list failed"
echo "dom0 up at uptime $(cut -d' ' -f1 /proc/uptime)" > /ctl/ready.tmp
mv /ctl/ready.tmp /ctl/ready
echo "XENLAB ready"
cd /ctl/cmd || exit 1
while :; do
    for script in /ctl/cmd/*.sh; do
        [ -e "$script" ] || continue
        name=${script##*/}
        name=${name%.sh}
        mv "$script" "/ctl/cmd/$name.run" || continue
        limit=$(cat "/ctl/cmd/$name.limit" 2>/dev/null || echo 60)
        (
            timeout -k 3 "$limit" sh "/ctl/cmd/$name.run" >"/ctl/out/$name.out" 2>&1 </dev/null
            echo $? >"/ctl/out/$name.rc.tmp"
            mv "/ctl/out/$name.rc.tmp" "/ctl/out/$name.rc"
        ) &
    done
    sleep 0.2
done
