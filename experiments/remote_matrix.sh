#!/usr/bin/env bash
# The scaled paper matrix on a remote GPU machine that is reached only through a runner which
# copies this checkout (and a few named ignored folders, each call at most ~64 MiB) to the
# machine, runs one command in its root, and copies back a few small files.
#
# Here (the machine with the corpus):
#   bash experiments/remote_matrix.sh split CORPUS_DIR [MiB]   # .stage/part-N/ of <= MiB each
#   bash experiments/remote_matrix.sh sotu                      # .stage/sotu/sotu-<sha12>/
# There, one call each, in order:
#   bash experiments/remote_matrix.sh receive .stage/part-N...  # copy parts into $SCRATCH
#   bash experiments/remote_matrix.sh start DEADLINE_S RUN...   # tokenize, start the queue detached
#                                                               # (on QUEUE_GPUS, default all)
#                                                               # (SHARDING_FIRST=1: the sharding
#                                                               # check between the two)
#   bash experiments/remote_matrix.sh poll SECONDS OUT_DIR      # wait for a run; pack results
#   bash experiments/remote_matrix.sh stop                      # start no more runs
#   bash experiments/remote_matrix.sh bench GPU OUT_DIR [DATA]  # step time of real batches
#                                                               # (BENCH_BATCHES="real random")
#                                                               # of BENCH_RUNS (fib_stagger_w12)
#                                                               # per override set (BENCH_SETS,
#                                                               # ';'-separated; default: the 3
#                                                               # embedding gradients);
#                                                               # BENCH_PROFILE=1: top device ops
#                                                               # in each JSON (traces stay there);
#                                                               # refuses a GPU that runs another
#                                                               # process (FREE_WAIT_S: wait first)
#   bash experiments/remote_matrix.sh sharding OUT_DIR          # after `start`'s tokenizing, with
#                                                               # no queue running: 300 steps
#                                                               # on all GPUs (SHARDING_GPUS:
#                                                               # these; SHARDING_DATA: another
#                                                               # tokenized folder), data x model 2,
#                                                               # one GPU (sharding_check.py);
#                                                               # those GPUs free (FREE_WAIT_S as
#                                                               # for bench), a layout killed after
#                                                               # SHARDING_TIMEOUT_S (600)
#   bash experiments/remote_matrix.sh samples GPU OUT_DIR RUN...  # finished runs of the queue:
#                                                               # samples.py on one free GPU
#   bash experiments/remote_matrix.sh when "RUN..." CMD...      # detached: once the named runs
#                                                               # of the queue have ended, run
#                                                               # CMD (from the queue's copy of
#                                                               # the code; write results under
#                                                               # $SCRATCH/extra, which `poll`
#                                                               # packs as extra.tar.gz)
#   bash experiments/remote_matrix.sh wait-free "GPU..." SECONDS # until those GPUs run no process
#   bash experiments/remote_matrix.sh bench-start GPU           # the same, detached: `start`
#                                                               # keeps the queue off GPU until
#                                                               # it ends, `poll` brings it back
#
# The corpus travels as its own xz shards (checked against MANIFEST.json when read) and is
# tokenized there with the committed tokenizer, so every machine builds the same tokens.
# The queue runs from a copy of the code taken at `start`, so edits to the checkout during
# the lease do not reach the runs. Nothing under $SCRATCH comes back except what `poll` packs.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${FIBAX_SCRATCH:-/root/fibax}
STAGE=${FIBAX_STAGE:-.stage}
TOKENIZER=experiments/tokenizers/gutenberg-32768
# The scaled matrix by default; the full recipe is STEPS=13000 LENGTH_MULT="1 2 4 16 64"
# SET="model.embed_backward=onehot" (SET: more config overrides for every run).
RUN_ARGS=(--config-args "steps=${STEPS:-3052}" --length-mult ${LENGTH_MULT:-1 2 4 16}
  --set model.attention.impl=pallas "data_dir=$SCRATCH/data/gutenberg" ${SET:-})

die() { echo "remote_matrix.sh: error: $*" >&2; exit 1; }

# Indices of the GPUs that run a compute process now.
busy_gpus() {
  local apps; apps=$(nvidia-smi --query-compute-apps=gpu_uuid --format=csv,noheader | sort -u)
  [ -n "$apps" ] || return 0
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader | while IFS=', ' read -r i uuid; do
    if grep -qxF "$uuid" <<< "$apps"; then echo "$i"; fi
  done
}

# Indices of all GPUs of the machine, space-separated.
all_gpus() { seq -s ' ' 0 $(($(nvidia-smi -L | wc -l) - 1)); }

# Wait up to WAIT_S seconds until none of GPUS (space-separated indices) runs a process: a
# timing or a multi-GPU run beside another process measures the other process too (or, short
# of memory on one GPU, waits forever in a collective).
wait_free() {
  local gpus=$1 wait_s=$2 what=$3 busy end=$((SECONDS + $2))
  while busy=$(busy_gpus | grep -xF -f <(tr ' ' '\n' <<< "$gpus") | tr '\n' ' ' || true); [ -n "$busy" ]; do
    [ "$SECONDS" -lt "$end" ] || die "$what: GPU ${busy}still runs another process after ${wait_s} s"
    sleep 5
  done
}

case "${1:-}" in
  split)
    src=${2:?corpus directory}; mib=${3:-54}
    [ -f "$src/MANIFEST.json" ] || die "no MANIFEST.json in $src"
    [ -e "$STAGE" ] && die "$STAGE exists; remove it first"
    part=1; size=0; limit=$((mib << 20))
    mkdir -p "$STAGE/part-1"
    cp "$src/MANIFEST.json" "$STAGE/part-1/"
    for f in "$src"/shard-*.jsonl.xz; do
      bytes=$(stat -c %s "$f")
      if [ $((size + bytes)) -gt "$limit" ]; then part=$((part + 1)); size=0; mkdir -p "$STAGE/part-$part"; fi
      cp "$f" "$STAGE/part-$part/"; size=$((size + bytes))
    done
    du -sh "$STAGE"/part-* ;;
  sotu)
    sha=$(python3 -c "import json; print(json.load(open('$TOKENIZER/tokenizer.json'))['sha256'][:12])")
    out=$STAGE/sotu/sotu-$sha
    [ -e "$out" ] || python -m fibax.data prepare --source sotu --out "$out" --tokenizer-from "$TOKENIZER"
    du -sh "$out" ;;
  receive)
    shift; [ $# -gt 0 ] || die "no part folder given"
    mkdir -p "$SCRATCH/corpus" "$SCRATCH/data"
    for f in $(for src in "$@"; do ls -d "$src"/*; done); do
      case "$f" in
        */sotu-*) rm -rf "$SCRATCH/data/$(basename "$f")"; cp -r "$f" "$SCRATCH/data/" ;;
        *) cp "$f" "$SCRATCH/corpus/" ;;
      esac
    done
    echo "received $(find "$SCRATCH/corpus" -name 'shard-*.jsonl.xz' | wc -l) corpus shards; data: $(ls "$SCRATCH/data")" ;;
  start)
    deadline=${2:?deadline in seconds}; shift 2
    [ $# -gt 0 ] || die "no runs given"
    expected=$(python3 -c "import json; print(len(json.load(open('$SCRATCH/corpus/MANIFEST.json'))['shards']))")
    have=$(find "$SCRATCH/corpus" -name 'shard-*.jsonl.xz' | wc -l)
    [ "$have" = "$expected" ] || die "$have of $expected corpus shards received"
    [ -e "$SCRATCH/runs" ] && die "$SCRATCH/runs exists: a queue was already started"
    source experiments/gpu_env.sh
    mkdir -p "$SCRATCH/code"
    tar --exclude=./.stage --exclude=./.whl --exclude=./data --exclude=./runs --exclude=./.venv -cf - . | tar -xf - -C "$SCRATCH/code"
    nvidia-smi -L
    gpus=${QUEUE_GPUS:-$(all_gpus)}
    extra=()
    alone=$(printf '%s\n' "$@" | grep learned || true)
    [ -n "$alone" ] && [ "${SLOTS_PER_GPU:-2}" -gt 1 ] && extra+=(--alone $alone)
    if [ -f "$SCRATCH/bench.pid" ] && kill -0 "$(cat "$SCRATCH/bench.pid")" 2>/dev/null; then
      extra+=(--gpu-busy "$(cat "$SCRATCH/bench.gpu")=$(cat "$SCRATCH/bench.pid")")
    fi
    cd "$SCRATCH/code"
    export PYTHONPATH="/tmp/site:$SCRATCH/code" FIBAX_GUTENBERG="$SCRATCH/corpus"
    # One persistent compilation cache for the queue's runs: runs that differ only in seed
    # compile the same programs (the seed is data), so the second one skips compiling. The
    # same executables either way; timings (bench, bench_train) do not use it.
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/jax_cache}
    # SHARDING_FIRST=1: the sharding check (every GPU, blocking) runs between tokenizing and
    # the queue, its report under $SCRATCH/extra/sharding (packed by `poll`). The queue's
    # deadline counts from this call, so tokenizing and the check come out of it.
    first=":"
    [ "${SHARDING_FIRST:-0}" = 1 ] && first="bash experiments/remote_matrix.sh sharding $SCRATCH/extra/sharding > $SCRATCH/sharding.log 2>&1 || echo 'sharding check failed (sharding.log)'"
    t0=$(date +%s)
    setsid nohup bash -c "
      set -e
      python -m fibax.data prepare --source gutenberg --out $SCRATCH/data/gutenberg --tokenizer-from $TOKENIZER
      $first
      left=\$(( $deadline - (\$(date +%s) - $t0) ))
      python experiments/matrix.py run --root $SCRATCH/runs --gpus $gpus \
        --slots-per-gpu ${SLOTS_PER_GPU:-2} --deadline-s \$left ${extra[*]} ${RUN_ARGS[*]} --runs $*
    " > "$SCRATCH/matrix.log" 2>&1 < /dev/null &
    sleep 5; cat "$SCRATCH/matrix.log" ;;
  poll)
    wait_s=${2:?seconds}; out=${3:?output folder}
    cd "$SCRATCH/code" 2>/dev/null || die "no queue started"
    export PYTHONPATH="/tmp/site:$SCRATCH/code"
    mkdir -p "$out"
    python experiments/matrix.py poll --root "$SCRATCH/runs" --wait "$wait_s" --pack "$out/results.tar.gz"
    if [ -f "$SCRATCH/data/gutenberg/manifest.json" ]; then
      cp "$SCRATCH/data/gutenberg/manifest.json" "$out/gutenberg_manifest.json"
    fi
    if [ -f "$SCRATCH/sharding.log" ]; then tail -n 2 "$SCRATCH/sharding.log"; fi
    if [ -d "$SCRATCH/extra" ]; then
      tar -czf "$out/extra.tar.gz" -C "$SCRATCH" extra
      tail -n 3 "$SCRATCH"/extra/when-*.log 2>/dev/null || true
    fi
    if [ -d "$SCRATCH/bench" ]; then
      tar -czf "$out/bench.tar.gz" -C "$SCRATCH" bench
      tail -n 5 "$SCRATCH/bench/log.txt"
    fi
    nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader
    grep -v "^  " "$SCRATCH/matrix.log" | tail -n 4 ;;
  stop)
    cd "$SCRATCH/code" 2>/dev/null || die "no queue started"
    PYTHONPATH="/tmp/site:$SCRATCH/code" python experiments/matrix.py stop --root "$SCRATCH/runs" ;;
  bench)
    # Runs from this checkout (carry .whl), so it can run during the staging calls, before
    # `start`: real batches come from any tokenized folder there (sotu arrives first).
    gpu=${2:?GPU index}; out=${3:?output folder}
    data=${4:-$(ls -d "$SCRATCH"/data/gutenberg "$SCRATCH"/data/sotu-* 2>/dev/null | head -n 1 || true)}
    [ -n "$data" ] && [ -f "$data/manifest.json" ] || die "no tokenized data under $SCRATCH/data"
    wait_free "$gpu" "${FREE_WAIT_S:-0}" bench
    source experiments/gpu_env.sh
    export CUDA_VISIBLE_DEVICES=$gpu
    mkdir -p "$out"
    # BENCH_SETS: override sets separated by ';', one bench_train.py call (and JSON) each.
    IFS=';' read -ra sets <<< "${BENCH_SETS:-model.embed_backward=scatter;model.embed_backward=scatter_f32;model.embed_backward=onehot}"
    for batches in ${BENCH_BATCHES:-real}; do
      for i in "${!sets[@]}"; do
        extra=(); [ "$batches" = real ] && extra=(--data "$data")
        python experiments/bench_train.py --runs ${BENCH_RUNS:-fib_stagger_w12} --seq-lens 1024 \
          "${extra[@]}" ${BENCH_PROFILE:+--profile "$SCRATCH/trace/$i"} --set ${sets[$i]} \
          --out "$out/bench_train_${batches}_$i.json" \
          2>&1 | grep '"ms_per_step"' || echo "$batches ${sets[$i]}: failed"
      done
    done ;;
  sharding)
    out=${2:?output folder}
    # SHARDING_DATA: another tokenized folder (sotu-<sha> arrives in one call, before the corpus)
    data=${SHARDING_DATA:-$SCRATCH/data/gutenberg}
    [ -f "$data/manifest.json" ] || die "no tokenized data in $data"
    gpus=${SHARDING_GPUS:-$(all_gpus)}
    wait_free "$gpus" "${FREE_WAIT_S:-0}" sharding
    source experiments/gpu_env.sh
    export CUDA_VISIBLE_DEVICES=${gpus// /,}
    python experiments/sharding_check.py --devices "$(wc -w <<< "$gpus")" --timeout-s "${SHARDING_TIMEOUT_S:-600}" \
      --config configs/paper.py:fib_stagger_w12,steps=300 --root "$SCRATCH/sharding" --out "$out" \
      --set model.attention.impl=pallas "data_dir=$data" model.embed_backward=onehot ;;
  samples)
    gpu=${2:?GPU index}; out=${3:?output folder}; shift 3
    [ $# -gt 0 ] || die "no runs given"
    source experiments/gpu_env.sh
    dirs=(); for r in "$@"; do dirs+=("$SCRATCH/runs/$r"); done
    CUDA_VISIBLE_DEVICES=$gpu python experiments/samples.py --runs "${dirs[@]}" --out "$out" ;;
  when)
    runs=${2?runs to wait for, or an empty string for none}; shift 2
    [ $# -gt 0 ] || die "no command given"
    # The queue writes status.json after tokenizing; until then a follow-up just waits.
    [ -d "$SCRATCH/code" ] || die "no queue started"
    mkdir -p "$SCRATCH/extra"
    log="$SCRATCH/extra/when-$(find "$SCRATCH/extra" -name 'when-*.log' | wc -l).log"
    cd "$SCRATCH/code"
    export PYTHONPATH="/tmp/site:$SCRATCH/code" FIBAX_SCRATCH="$SCRATCH"
    setsid nohup bash -c '
      until python3 -c "import json, sys
runs = json.load(open(sys.argv[1]))[\"runs\"]
sys.exit(any(runs[n][\"state\"] in (\"queued\", \"running\") for n in sys.argv[2:] if n in runs))
" "$0" $1; do sleep 5; done
      shift; echo "started $(date +%s): $*"; "$@"; echo "ended $(date +%s) with exit code $?"
    ' "$SCRATCH/runs/status.json" "$runs" "$@" > "$log" 2>&1 < /dev/null &
    echo "waiting for $runs, then: $* (log $log)" ;;
  wait-free)
    wait_free "${2:?GPU indices}" "${3:?seconds}" wait-free
    echo "GPU $2: no other process" ;;
  bench-start)
    gpu=${2:?GPU index}
    [ -e "$SCRATCH/bench" ] && die "$SCRATCH/bench exists: a benchmark was already started"
    mkdir -p "$SCRATCH/bench"
    echo "$gpu" > "$SCRATCH/bench.gpu"
    setsid nohup bash "$0" bench "$gpu" "$SCRATCH/bench" > "$SCRATCH/bench/log.txt" 2>&1 < /dev/null &
    echo $! > "$SCRATCH/bench.pid"
    sleep 2; cat "$SCRATCH/bench/log.txt" ;;
  *)
    die "usage: remote_matrix.sh split|sotu|receive|start|poll|stop|bench|bench-start|sharding|samples|when|wait-free ..." ;;
esac
