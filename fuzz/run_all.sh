#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 600), one after another, and summarise.
#
#   cargo install cargo-fuzz            # once; the runs need the nightly toolchain
#   fuzz/run_all.sh 600                 # ~80 min for the 8 targets
#   TARGETS="gguf jsonl" fuzz/run_all.sh 60
#
# New inputs go to $FUZZ_WORK/<target> (default /tmp/hyperdas-fuzz-work); the committed seeds
# in fuzz/corpus/<target> are only read. A crash leaves its reproducer in fuzz/artifacts/<target>:
# copy it to fuzz/regressions/<target>/ once fixed, so tests/fuzz_corpus.rs replays it.
#
# Limits: an input running over 10 s is a hang, one allocation over 1 GiB or 2 GiB of RSS is
# unbounded allocation; libFuzzer reports each as a failure.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
targets=${TARGETS:-"config_json safetensors safetensors_index gguf tokenizer_json jsonl arrow toml_config"}
work=${FUZZ_WORK:-/tmp/hyperdas-fuzz-work}
mkdir -p "$work"
status=0
for t in $targets; do
    mkdir -p "$work/$t"
    start=$(date +%s)
    if cargo +nightly fuzz run "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=65536 \
        -print_final_stats=1 > "$work/$t.log" 2>&1; then
        result=clean
    else
        result="FAILED (see $work/$t.log and fuzz/artifacts/$t)"
        status=1
    fi
    end=$(date +%s)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1 | grep -o '[0-9]*' || echo "?")
    corpus=$(ls "$work/$t" | wc -l)
    echo "$t: $result, $((end - start)) s, $runs executions, coverage $cov edges, corpus $corpus inputs"
done
exit $status
