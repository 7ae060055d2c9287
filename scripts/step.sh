#!/usr/bin/env bash
# scripts/step.sh "what" cmd args...: runs one build/test step, framed with its name and duration.
set -uo pipefail
what=$1; shift
echo ">>> $what"
start=$(date +%s)
"$@"
rc=$?
if [ $rc = 0 ]; then
    echo "<<< $what: ok in $(( $(date +%s) - start ))s"
else
    echo "<<< $what: FAILED (exit $rc) after $(( $(date +%s) - start ))s" >&2
fi
exit $rc
