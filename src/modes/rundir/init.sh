#!/bin/busybox sh
# vexec's init for guests of an architecture vexec's own binary cannot run
# on: a script for a static busybox. It runs every program in $BATCH_DIR in
# name order and reports to the host over the virtio-serial port vexec.ctl
# in the batch subset of vexec's protocol (crates/vexec-protocol): frames of a
# little-endian u32 length and a postcard-encoded GuestMsg. Unlike the Rust
# agent it sends each program's output when the program ends, and reports
# an exit status above 128 as death by signal (the shell cannot tell).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/ TERM=linux
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

# Filled in by the host from vexec-protocol (its version, the messages'
# tags, the initramfs layout).
VERSION=@VERSION@
MSG_READY=@READY@ MSG_STDOUT=@STDOUT@ MSG_STDERR=@STDERR@ MSG_EXITED=@EXITED@
MSG_ERROR=@ERROR@ MSG_BEGIN=@BEGIN@ MSG_COVERAGE=@COVERAGE@ MSG_FINISHED=@FINISHED@
EXIT_CODE=@EXIT_CODE@ EXIT_SIGNAL=@EXIT_SIGNAL@
MODULE_LIST=/@MODULE_LIST@ MODULE_DIR=/@MODULE_DIR@ BATCH_DIR=/@BATCH_DIR@ ROOT_TAG_FILE=/@ROOT_TAG_FILE@
CHUNK=1048576
F=/tmp/.vexec-frame

say() { echo "vexec-init: $*" >/dev/console; }
halt() { sync; poweroff -f; sleep 10; }

# One byte, by value.
byte() { printf "\\$(printf %o "$1")"; }
# postcard's unsigned LEB128 varint.
varint() {
  local v=$1
  while [ "$v" -ge 128 ]; do byte $(((v & 127) | 128)); v=$((v >> 7)); done
  byte "$v"
}
u32le() { byte $(($1 & 255)); byte $((($1 >> 8) & 255)); byte $((($1 >> 16) & 255)); byte $((($1 >> 24) & 255)); }
# A string: its length in bytes, then the bytes.
str() { varint "$(printf %s "$1" | wc -c)"; printf %s "$1"; }
uptime_ms() { read -r up rest </proc/uptime; echo $((${up%.*} * 1000 + 1${up#*.}0 - 1000)); }
# Sends the frame whose body is in $F.
send() { { u32le "$(wc -c <"$F")"; cat "$F"; } >&3; }
# Sends file $2 as GuestMsg variant $1 (Stdout, Stderr, Coverage), in
# pieces of $CHUNK bytes.
send_file() {
  local size i=0 len
  size=$(wc -c <"$2")
  while [ $((i * CHUNK)) -lt "$size" ]; do
    len=$((size - i * CHUNK)); [ "$len" -gt "$CHUNK" ] && len=$CHUNK
    { varint "$1"; varint "$len"; dd if="$2" bs=$CHUNK skip=$i count=1 2>/dev/null; } >"$F"
    send; i=$((i + 1))
  done
}

if [ -r "$MODULE_LIST" ]; then
  while read -r name deps; do
    insmod "$MODULE_DIR/$name.ko" 2>/tmp/.insmod || grep -q "exists" /tmp/.insmod ||
      say "error: loading module $name: $(cat /tmp/.insmod)"
  done <"$MODULE_LIST"
fi

port=""; tries=0
while [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    if [ -r "$p/name" ] && [ "$(cat "$p/name")" = vexec.ctl ] && [ -e "/dev/${p##*/}" ]; then
      port="/dev/${p##*/}"
    fi
  done
  [ -n "$port" ] && break
  tries=$((tries + 1))
  if [ "$tries" -gt 1000 ]; then
    say "error: the control port vexec.ctl did not appear (is virtio_console loaded?)"
    halt
  fi
  usleep 10000
done
exec 3>"$port"

# Ready { version, release, uptime_ms }
{ varint "$MSG_READY"; varint "$VERSION"; str "$(cat /proc/sys/kernel/osrelease)"; varint "$(uptime_ms)"; } >"$F"
send

# A root filesystem shared by the host (--root): read-only over 9p, with a
# tmpfs overlay so the command may write; the program chroots into it.
if [ -r "$ROOT_TAG_FILE" ]; then
  tag=$(cat "$ROOT_TAG_FILE")
  mkdir -p /vexec/lower /vexec/rw /vexec/root
  if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose "$tag" /vexec/lower 2>/tmp/.mnt ||
    ! mount -t tmpfs tmpfs /vexec/rw || ! mkdir -p /vexec/rw/upper /vexec/rw/work ||
    ! mount -t overlay overlay -o lowerdir=/vexec/lower,upperdir=/vexec/rw/upper,workdir=/vexec/rw/work /vexec/root 2>>/tmp/.mnt; then
    # Error(text)
    { varint "$MSG_ERROR"; str "mounting the root filesystem ($tag over 9p, overlaid): $(cat /tmp/.mnt)"; } >"$F"
    send; halt
  fi
  for d in proc sys dev tmp; do mkdir -p "/vexec/root/$d"; done
  mount -t proc proc /vexec/root/proc
  mount -t sysfs sysfs /vexec/root/sys
  mount -o bind /dev /vexec/root/dev
  mount -t tmpfs tmpfs /vexec/root/tmp
fi

for prog in "$BATCH_DIR"/*; do
  [ -f "$prog" ] && [ -x "$prog" ] || continue
  # Begin { name }
  { varint "$MSG_BEGIN"; str "${prog##*/}"; } >"$F"; send
  (cd / && exec "$prog") </dev/null >/tmp/.out 2>/tmp/.err
  code=$?
  send_file "$MSG_STDOUT" /tmp/.out
  send_file "$MSG_STDERR" /tmp/.err
  rm -f /tmp/.out /tmp/.err
  # Exited { exit: Code(i32) | Signal(i32), uptime_ms }; i32 is zigzag-encoded.
  if [ "$code" -gt 128 ] && [ "$code" -lt 193 ]; then
    { varint "$MSG_EXITED"; varint "$EXIT_SIGNAL"; varint $(((code - 128) * 2)); varint "$(uptime_ms)"; } >"$F"
  else
    { varint "$MSG_EXITED"; varint "$EXIT_CODE"; varint $((code * 2)); varint "$(uptime_ms)"; } >"$F"
  fi
  send
done

# The kernel's GCOV counters: debugfs reports their size as 0, so each is
# read to its end with cat before tar sees it.
G=/sys/kernel/debug/gcov
if [ -d "$G" ]; then
  mkdir -p /tmp/gcov
  (cd "$G" && find . -type d) | while read -r d; do mkdir -p "/tmp/gcov/$d"; done
  (cd "$G" && find . -name '*.gcda') | while read -r f; do cat "$G/$f" >"/tmp/gcov/$f"; done
  tar -cf /tmp/gcov.tar -C /tmp/gcov .
  send_file "$MSG_COVERAGE" /tmp/gcov.tar
fi

# Finished
{ varint "$MSG_FINISHED"; } >"$F"; send
halt
