#!/bin/sh
# PID 1 of a Cloud48 virtual machine (put into VM images by `cloud48 image build --vm`).
# Brings up the guest's file systems and network from the kernel's command line, starts QEMU's
# guest agent, then runs the workload the qemu driver hands in through fw_cfg
# (opt/cloud48/run: a shell script) with its output on the serial console. When the workload
# ends the machine powers off, as an OS container stops when its main process ends.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
exec </dev/null >/dev/console 2>&1
# No udev to load modules as devices appear: memory plugged in (virtio-mem) or given back
# (the balloon) on `update`.
modprobe -a qemu_fw_cfg virtio_console virtio_net virtio_balloon virtio_mem 2>/dev/null
ip= gw= name=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cloud48.ip=*) ip=${arg#*=} ;;
    cloud48.gw=*) gw=${arg#*=} ;;
    cloud48.name=*) name=${arg#*=} ;;
  esac
done
[ -n "$name" ] && hostname "$name"
# The disk may be larger than the image's file system: grow it to the disk.
resize2fs "$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)" >/dev/null 2>&1
ip link set lo up
if [ -n "$ip" ]; then
  ip link set eth0 up
  ip addr add "$ip" dev eth0
  [ -n "$gw" ] && ip route add default via "$gw"
fi
# No udev here: name the virtio serial ports as udev would.
for port in /sys/class/virtio-ports/*; do
  [ -r "$port/name" ] && ln -sf "/dev/${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
done
qemu-ga --daemonize --method=virtio-serial --path=/dev/virtio-ports/org.qemu.guest_agent.0 \
  --pidfile=/run/qemu-ga.pid
echo "cloud48: up"
run=/sys/firmware/qemu_fw_cfg/by_name/opt/cloud48/run/raw
if [ -r "$run" ]; then
  cp "$run" /run/cloud48-run
  /bin/sh /run/cloud48-run &
  echo $! > /run/cloud48-workload.pid
  echo "cloud48: the workload runs (pid $!)"
  # Reap every child (orphans included) until the workload ends.
  while kill -0 "$(cat /run/cloud48-workload.pid)" 2>/dev/null; do wait; done
  echo "cloud48: the workload ended"
  exec /sbin/shutdown -P now
fi
echo "cloud48: no workload was handed in ($run is missing); the machine idles"
while :; do wait; sleep 3600 & wait; done
