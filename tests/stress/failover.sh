#!/usr/bin/env bash
# Runs the peers failover test (tests/peers.rs: the relay carrying a 24 MiB
# stream is SIGKILLed and the stream moves to the other relay) RUNS times
# in a row with a busy loop on every core, and reports how many passed.
#
#   tests/stress/failover.sh [RUNS]      # default 30, release build
#   PROFILE=debug tests/stress/failover.sh 10
#
# Exits non-zero if any run failed or left a relay process behind. The
# logs of failed runs are kept in the directory it prints.
set -euo pipefail

runs=${1:-30}
profile=${PROFILE:-release}
test_name=a_relay_killed_mid_transfer_leaves_the_stream_whole_on_another_relay
cd "$(dirname "$0")/../.."

flags=()
if [ "$profile" = release ]; then flags=(--release); fi
# cargo names the test binary on stderr: "Executable tests/peers.rs (PATH)".
binary=$(cargo test "${flags[@]}" --test peers --no-run 2>&1 |
    sed -n 's/^ *Executable tests\/peers\.rs (\(.*\))$/\1/p' | tail -n 1)
if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    echo "could not build the peers test" >&2
    exit 2
fi

logs=$(mktemp -d -t ferry-failover-stress.XXXXXX)
hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait "${hogs[@]}" 2>/dev/null || true
}
trap stop_hogs EXIT
# One busy loop per core, started by this script and killed by their ids.
for _ in $(seq "$(nproc)"); do
    (while :; do :; done) &
    hogs+=($!)
done

passed=0
failed=0
leftover=0
for run in $(seq "$runs"); do
    log="$logs/run-$run.log"
    started=$(date +%s)
    # The test bounds its own waits; this bounds a hang of the whole run.
    if timeout 600 "$binary" --exact "$test_name" --nocapture >"$log" 2>&1; then
        passed=$((passed + 1))
        verdict=passed
        stall=$(sed -n 's/.*stalled for at most \([^ ]*\) while.*/\1/p' "$log")
        rm -f "$log"
    else
        failed=$((failed + 1))
        verdict="FAILED (log: $log)"
        stall=-
    fi
    # The test's relays run with their data under ferry-peers-PID.
    if pgrep -f "ferry-peers-" >/dev/null; then
        leftover=$((leftover + 1))
        verdict="$verdict; relay processes left behind: $(pgrep -f ferry-peers- | tr '\n' ' ')"
    fi
    echo "run $run/$runs: $verdict in $(($(date +%s) - started)) s (longest stall ${stall:-?})"
done

echo "$passed passed, $failed failed of $runs runs ($profile build, $(nproc) cores busy)"
if [ "$failed" -eq 0 ]; then rmdir "$logs" 2>/dev/null || true; fi
[ "$failed" -eq 0 ] && [ "$leftover" -eq 0 ]
