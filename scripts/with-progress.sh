#!/usr/bin/env bash
# with-progress.sh LABEL CMD...: runs CMD and, while it runs longer than
# 20 s, says every 30 s that it is still working and for how long, so a
# long cached-miss build (kernel, debootstrap) never looks stuck.
set -uo pipefail
label=$1
shift
start=$(date +%s)
"$@" &
pid=$!
(
	sleep 20
	while kill -0 "$pid" 2>/dev/null; do
		elapsed=$(($(date +%s) - start))
		printf '[%s] still working: %dm%02ds elapsed\n' "$label" $((elapsed / 60)) $((elapsed % 60)) >&2
		sleep 30
	done
) &
ticker=$!
wait "$pid"
status=$?
kill "$ticker" 2>/dev/null
wait "$ticker" 2>/dev/null
exit "$status"
