# qemu-guest: started by the host's systemd unit (qemu-guest.service)
/usr/bin/qemu-system-x86_64 \
    -name guest=qemu-guest,debug-threads=on \
    -machine pc-q35-7.2,accel=kvm \
    -m 2048 -smp 2 \
    -drive file=/var/lib/images/qemu-guest.raw,format=raw,if=none,id=disk0,cache=none,aio=native,discard=unmap \
    -device virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1 \
    -blockdev '{"driver":"file","filename":"/var/lib/images/qemu-guest-home.qcow2","node-name":"home-file","cache":{"direct":true},"aio":"native"}' \
    -blockdev driver=qcow2,file=home-file,node-name=home \
    -device virtio-blk-pci,drive=home,id=virtio-disk1 \
    -drive file=/var/lib/images/debian.iso,media=cdrom,if=ide,index=2,readonly=on \
    -netdev tap,id=net0,ifname=tap-qg,script=no,downscript=no \
    -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 \
    -append 'console=ttyS0 root=/dev/vda1' \
    -nographic
