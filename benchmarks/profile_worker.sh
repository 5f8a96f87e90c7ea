#!/usr/bin/env bash
# Profile one Tandem worker process with py-spy while a benchmark drives it (run in the background):
#   bash benchmarks/profile_worker.sh decode 60 $OUT/decode-profile.txt [DELAY_S] &
# Waits for the first `services.launch ROLE` process, sleeps DELAY_S (default 20: model load and warm-up), then
# records SECONDS of per-thread stacks of it and its children (the engine process) in py-spy's collapsed ("raw")
# format, non-idle samples only (PYSPY_FLAGS=--idle keeps them): a thread blocked on the GIL or on the GPU counts
# as idle. py-spy travels as a wheel (device-wheels.sh ... py-spy).
set -uo pipefail
role=$1 seconds=$2 out=$3 delay=${4:-20}
for _ in $(seq 600); do
  pid=$(pgrep -f "services.launch $role" | head -n1)
  [ -n "$pid" ] && break
  sleep 0.5
done
[ -n "${pid:-}" ] || { echo "profile_worker: no $role worker appeared" >&2; exit 1; }
sleep "$delay"
py-spy record --pid "$pid" --subprocesses --duration "$seconds" --rate 250 --threads ${PYSPY_FLAGS:-} --format raw --output "$out" --nonblocking \
  >"$out.log" 2>&1
echo "profile_worker: $role pid $pid -> $out ($(wc -l <"$out") stacks)"
