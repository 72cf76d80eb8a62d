#!/usr/bin/env bash
# Bounded fuzz run of every target (not part of `cargo test`):
#   bash fuzz/run.sh            # 60 s per target
#   SECONDS_PER_TARGET=10 bash fuzz/run.sh
# Needs `cargo install cargo-fuzz`. The project has one (stable) toolchain; cargo fuzz
# needs nightly-only flags, which RUSTC_BOOTSTRAP=1 unlocks. Seed corpora live in
# fuzz/corpus/<target>/ (new inputs found go to a scratch folder); a crash is saved under
# fuzz/artifacts/<target>/ and must become a regression test before it is fixed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
T=${SECONDS_PER_TARGET:-60}
export RUSTC_BOOTSTRAP=1
# New inputs go to a scratch folder (the first corpus dir); the committed seeds stay small.
WORK=$(mktemp -d /tmp/malai-fuzz.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
status=0
for target in header exec_frames cluster_file names; do
    echo "== $target ($T s)"
    mkdir -p "$WORK/$target"
    if ! cargo fuzz run "$target" "$WORK/$target" "corpus/$target" -- -max_total_time="$T" -rss_limit_mb=2048 2>&1 | tail -n 3; then
        status=1
    fi
done
exit $status
