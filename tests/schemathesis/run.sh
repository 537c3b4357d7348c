#!/usr/bin/env bash
# Fuzzes a live `ferry registry` from its own OpenAPI document with
# schemathesis (pip install schemathesis pynacl blake3): every operation,
# signed by hooks.py, with a bounded number of examples. Passes when no check
# fails and the registry never answers 5xx. Run from anywhere; uses
# target/debug/ferry unless FERRY names another binary.
#
# The coverage phase is off by default: with schemathesis 4.32 on Python
# 3.11.7 it stops on one operation with an internal hypothesis error ("AST
# constructor recursion depth mismatch") after every case it generated
# passed. FERRY_FUZZ_PHASES=examples,coverage,fuzzing runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ferry=${FERRY:-target/debug/ferry}
max_examples=${FERRY_FUZZ_EXAMPLES:-30}
if ! python3 -c 'import schemathesis, nacl, blake3' 2>/dev/null; then
    echo "schemathesis is not installed: pip install schemathesis pynacl blake3 (.ci/run does this)"
    exit 1
fi
work=$(mktemp -d)
chmod 755 "$work"
registry_pid=
cleanup() {
    if [ -n "$registry_pid" ]; then
        kill -TERM "$registry_pid" 2>/dev/null || true
        # The registry stops its embedded PostgreSQL within 60 s.
        timeout 70 tail --pid="$registry_pid" -f /dev/null || kill -KILL "$registry_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# The fuzzer signs as the registry's operator, so deposits are exercised too.
seed=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
printf '# the schemathesis run'"'"'s operator\n%s\n' "$seed" >"$work/operator.key"
chmod 600 "$work/operator.key"
# Rate limits off: the fuzzer is one address and one key.
"$ferry" registry --listen 127.0.0.1:0 --data-dir "$work/postgres" \
    --operator-key "$work/operator.key" --probe-interval-secs 0 \
    --rate-per-ip 0 --rate-per-key 0 --rate-per-ip-operations 0 >"$work/registry.log" 2>&1 &
registry_pid=$!
address=
for _ in $(seq 1 600); do
    address=$(grep -oE 'listening on http://[0-9.:]+' "$work/registry.log" | head -1 | sed 's|listening on ||' || true)
    [ -n "$address" ] && break
    kill -0 "$registry_pid" 2>/dev/null || { cat "$work/registry.log"; exit 1; }
    sleep 0.1
done
[ -n "$address" ] || { echo "the registry did not start in 60 s"; cat "$work/registry.log"; exit 1; }
echo "fuzzing the registry at $address, $max_examples examples per operation"

# Two checks are left out. ignored_auth: the hook signs every request that
# carries well-formed signature headers, so the fuzzer's own "is auth
# ignored" probe is signed too (api/tests cover unsigned and forged ones).
# positive_data_acceptance: a schema-valid body is not a valid one when it
# holds a signature, a key that must be a curve point, or an amount that
# must be above zero or within a balance; those are refused with 4xx, as
# documented, and no JSON schema can say so.
FERRY_FUZZ_SEED=$seed PYTHONPATH=tests/schemathesis SCHEMATHESIS_HOOKS=hooks \
    timeout 1200 python3 -m schemathesis.cli run "$address/openapi.json" \
    --checks all --exclude-checks ignored_auth,positive_data_acceptance \
    --max-examples "$max_examples" --workers 2 \
    --phases "${FERRY_FUZZ_PHASES:-examples,fuzzing}" \
    --suppress-health-check all
if grep -E 'panicked' "$work/registry.log"; then
    echo "the registry panicked"
    exit 1
fi
