#!/usr/bin/env bash
# The long fuzz run (outside CI): every target of crates/peft-fuzz for N executions (default 10^6) in a
# release build, one after another, with the table of counts. Crashing inputs go to fuzz-crashes/ (a panic:
# <target>-<n>.bin; a memory blow-up or a hang: <target>-abort.bin); copy each, once fixed, into
# fixtures/fuzz/regressions/<target>/ so that `cargo test` replays it.
#
#   scripts/fuzz.sh [EXECS] [SEED] [--target NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
execs=${1:-1000000}
seed=${2:-1}
shift $(( $# > 2 ? 2 : $# ))
cargo build --release -p peft-fuzz
echo "peft-fuzz: $execs executions per target, seed $seed, $(date -u +%FT%TZ), $(nproc) cores"
exec target/release/peft-fuzz --execs "$execs" --seed "$seed" --crash-dir fuzz-crashes "$@"
