#!/bin/sh
# /sbin/shutdown of a Cloud48 virtual machine (what QEMU's guest agent runs for
# guest-shutdown): ends the workload (SIGTERM, then SIGKILL after 10 s), writes the disk out,
# then powers off or reboots through the kernel.
mode=o
for arg in "$@"; do
  case "$arg" in -r|--reboot) mode=b ;; esac
done
pid=$(cat /run/cloud48-workload.pid 2>/dev/null)
if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null
fi
sync
mount -o remount,ro / 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq
echo "$mode" > /proc/sysrq-trigger
# As PID 1 (the workload ended) this must not return before the kernel acts.
sleep 30
