#!/usr/bin/env bash
# The speed measurements of the GPU kernels and the train step, on one GPU of a remote machine
# reached through a runner that copies this checkout there (carry .whl) and runs one command
# a call. The suite runs detached, so it outlives one call; each step writes its own JSON and
# log, and a step that fails or runs out of time leaves the others' results.
#
#   bash experiments/speed_suite.sh start GPU          # detached, results under $SCRATCH/speed
#   bash experiments/speed_suite.sh poll SECONDS OUT   # wait up to SECONDS; pack to OUT/<name>.tar.gz
#   bash experiments/speed_suite.sh stop               # kill the suite
# SPEED_NAME=NAME (default speed) names the suite, its folder $SCRATCH/NAME and its archive
# NAME.tar.gz, so suites of different steps can run on different GPUs at once. The suite's
# commit.txt is SPEED_COMMIT where given (a runner that copies the working tree but not the
# repository's current HEAD: name the commit the tree is), else the checkout's HEAD.
#
#   bash experiments/speed_suite.sh queue GPU FILE     # detached: FILE's suites one after another
#                                                      # (after the GPU's earlier queues), from a
#                                                      # snapshot of the checkout, $SCRATCH/tree_ID
#   bash experiments/speed_suite.sh poll-all SECONDS OUT   # wait for every queue; OUT/all.tar.gz
# A queue runs the suites of FILE, one a line, `NAME VAR=VALUE ...` (the suite's settings, as
# for `start`; '#' starts a comment), each started when the one before it is done, on one GPU,
# so that timings never overlap: a lease starts one queue for its timings (and one for tests on
# another GPU, if it has one) and polls them with calls that each wait a few minutes.
#
# Steps, most important first (SPEED_STEPS picks some, e.g. "attention train"):
#   tests_packed   the packed kernels against the float32 reference for real (pytest -m gpu),
#                  one line a case in tests_packed.log, junit XML at the end
#   attention      bench_attention.py: row-wise and packed Pallas kernels beside cuDNN dense,
#                  cuDNN sliding window and XLA, T = 1K..64K (all in one process); ATTN_ARGS:
#                  more arguments (e.g. --rung-group 4)
#   train          bench_train.py, T = 1,024 and 8,192: dense, fib_stagger_w12, fib_learned_w12
#                  with impl=pallas_packed, then with impl=pallas; a jax.profiler summary of
#                  the top device operations of each (traces stay on the machine)
#   tests_grouped  the packed kernels with static rungs grouped (GpuBlocks.rung_group), for real
#   tests_ungrouped  the packed kernels at 2 warps, one rung a step (the default before 20e206b)
#   tests_learned  the learned-rung kernels against the plain-JAX learned path, for real
#                  (FIBAX_KERNEL_SHARD=i/n: every n-th case, so n GPUs can share them)
#   tests_lse      the packed kernels with a cotangent of their lse as well, for real
#   tests_diagonal the packed and learned kernels with GpuBlocks.diagonal=1, for real
#                  (FIBAX_KERNEL_SHARD as for tests_learned)
#   tests_dkv_rows the same with GpuBlocks.dkv_t=0 (dk, dv accumulated as [C, D], not transposed)
#   tests_bitwise  the packed kernels' gradients twice from the same inputs: bitwise the same
#   tests_ew       the packed kernels with every static rung on CUDA cores (GpuBlocks.ew_rungs=7)
#   tests_dkv_tma  the packed kernels with dk, dv from the Mosaic GPU kernel (GpuBlocks.dkv_tma=1)
#   tests_q_tma    the packed kernels with all three Mosaic GPU kernels (q_tma=3, dkv_tma=1)
#   tests_norm     the fused RMSNorm and log-sum-exp kernels against plain JAX, for real
#   tests_model    the model's and the train step's GPU tests, for real: a train step with the
#                  Pallas kernels against XLA's (tests/test_model.py), the kernels under
#                  shard_map on a mesh against one GPU (tests/test_train.py: it needs 2 GPUs,
#                  so start such a suite on two, `start 0,1`; a queue's suites see one GPU and
#                  skip it)
#   norm_loss      bench_norm_loss.py: the fused RMSNorm against XLA's, the one-pass
#                  log-sum-exp against the two-pass one, beside their HBM floors
#   train_options  bench_train.py, dense, fib_stagger_w12 and fib_learned_w12 at T = 1,024 with
#                  pallas_packed and a profile, once per override set of TRAIN_SETS
#                  (';'-separated; default: the logits' backward in bf16 with the MLP's
#                  hidden width padded to a multiple of 128, then the same with bf16 logits,
#                  then the float32 backward);
#                  TRAIN_RUNS, TRAIN_LENS (default 1024) and TRAIN_BLOCKS (the kernels'
#                  blocks, bench_train.py --blocks) change what each set runs; TRAIN_PROFILE=0
#                  skips the profile, TRAIN_PROFILE=timed traces the step as timed
#                  (with command buffers, not op by op); TRAIN_CB=both also times each step
#                  compiled without XLA's command buffers, in the same rounds
#                  (bench_train.py --command-buffers); TRAIN_VARIANT=NAME=OPTION:VALUE,...
#                  also times each step compiled with those XLA options, in the same rounds
#                  (bench_train.py --xla-variant); TRAIN_DUMP=1 keeps each compiled train
#                  step's optimized HLO (hlo_I/*after_optimizations.txt.gz; bench_train.py
#                  names the profile's fusions itself since 6f7d4e7: for a closer look, or
#                  experiments/profile_sources.py on an older result)
#   attention2     the packed kernel alone at 2 warps, one rung a step (mma.sync; the default
#                  before 20e206b, which takes 4 warps and forward rung groups of 2)
#   attention_sweep  bench_attention.py --sweep: the packed kernel's block rows, warps and
#                  pipeline stages and rung groups (ATTN_SWEEP:
#                  'bq,warps,bq_bwd,warps_bwd[,stages[,stages_bwd[,group[,group_bwd[,diagonal
#                  [,dkv_t[,stages_dkv[,exp2[,fold[,group_dkv[,ew[,dkv_tma[,q_tma]]]]]]]]]]]]]')
#                  at T = 1K, 16K, 64K beside the cuDNN window and the HBM floor
#   ncu            profile_kernels.py: Nsight Compute's counters (throughputs, hit rates, occupancy,
#                  warp stalls) of the packed kernels and the cuDNN window at T = 1K and 16K, op
#                  by op (NCU_ARGS: more arguments, e.g. --blocks SPEC); the report stays in
#                  $SCRATCH/trace
#   cb_dump        bench_train.py, fib_stagger_w12 at T = 1,024 with command buffers on, and the
#                  thunk sequence XLA runs (which kernels its command buffers hold) dumped
#   train_xla      bench_train.py, dense and fib_stagger_w12 at T = 1,024 with pallas_packed,
#                  logits_grad=compute and a profile, once per XLA_FLAGS set of XLA_SETS
#                  (';'-separated; default: XLA's Triton GEMM fusions on, then off, so the
#                  matmuls go to cuBLAS, one of fibax's defaults on a GPU: fibax.cli.XLA_DEFAULTS)
#   train_text     bench_train.py on real batches (SPEED_DATA: a prepared data directory on
#                  the machine), fib_stagger_w12 at T = 1,024, once per input-embedding
#                  gradient of EMBED_SETS (default: sorted onehot scatter), one process each
#   compile        compile_attention.py: the attention of a model's layers alone (T = 1,024,
#                  B = 32), traced, lowered, compiled and first run timed apart, each run of
#                  COMPILE_RUNS (default fib_stagger_w12; fib_learned_w12: the learned
#                  kernels) with each spec of COMPILE_SPECS (default: the Triton kernels, the
#                  three Mosaic ones; "default": the machine's) at each layer count of
#                  COMPILE_LAYERS (1 16), one process each
#   train_run      python -m fibax.train on SPEED_DATA (a prepared data directory on the
#                  machine): RUN_CONFIG (configs/paper.py:fib_stagger_w12,steps=300), once per
#                  blocks spec of RUN_BLOCKS (default: the Triton kernels through
#                  model.attention.gpu_blocks, then "default", the machine's: on a Hopper GPU
#                  the three Mosaic kernels); RUN_SETS: more overrides
#                  (default model.attention.impl=pallas_packed: the paper configs' impl is xla);
#                  metrics.jsonl and config.json kept, checkpoints deleted
#   latency        python -m fibax.eval latency: the paper model's forward with a static
#                  (fixed), the learned (alpha on its dynamic path) and the frozen learned
#                  schedule, freshly initialised (every alpha 1), at batch LAT_BATCH (default
#                  1 32), once per attention impl of LAT_IMPLS (default pallas_packed xla) and
#                  length of LAT_LENS (default 1024 4096), one process each
# The test steps stop a case after PER_TEST_S (240) where pytest-timeout is installed, and the
# whole step after TEST_LIMIT_S (900); TEST_K replaces the pytest -k expression of every test
# step of the suite (so give it to a suite of one test step: e.g. a few of its cases,
# "GpuPackedDiagonalKernel and (44] or 45])"; in a queue file, in double quotes, without $,
# backquotes or double quotes inside, as the line is evaluated).
set -euo pipefail
# This script by its absolute path (its detached parts run it again from the checkout's root),
# and a queue FILE given relative to where it was called from.
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
CALLER=$PWD
cd "$(dirname "$SELF")/.."
SCRATCH=${FIBAX_SCRATCH:-/root/fibax}
[[ "$SCRATCH" = /* ]] || SCRATCH=$CALLER/$SCRATCH
export FIBAX_SCRATCH=$SCRATCH  # absolute for the detached parts, which start elsewhere

die() { echo "speed_suite.sh: error: $*" >&2; exit 1; }

NAME=${SPEED_NAME:-speed}
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || die "bad SPEED_NAME=$NAME"
DIR=$SCRATCH/$NAME

# One step: its command under a time limit, output to DIR/<name>.log, a line in DIR/log.txt.
step() {
  local name=$1 limit=$2; shift 2
  echo "$(date +%s) start $name: $*" >> "$DIR/log.txt"
  local rc=0
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1 || rc=$?
  echo "$(date +%s) end $name: exit $rc$([ "$rc" = 124 ] && echo " (over ${limit} s)")" >> "$DIR/log.txt"
}

suite() {
  # A relative SPEED_DATA is the checkout's that queued the suite (the suite runs in a copy).
  if [ -n "${SPEED_DATA:-}" ] && [[ "$SPEED_DATA" != /* ]] && [ -n "${FIBAX_CHECKOUT:-}" ]; then
    SPEED_DATA=$FIBAX_CHECKOUT/$SPEED_DATA
  fi
  local steps=${SPEED_STEPS:-tests_packed attention train tests_learned attention2}
  local common=(--set model.embed_backward=sorted)
  # The test steps' per-case limit, where pytest-timeout is installed.
  local per=(); python -c "import pytest_timeout" 2>/dev/null && per=(--timeout "${PER_TEST_S:-240}")
  for s in $steps; do
    case "$s" in
      attention)
        # shellcheck disable=SC2086  # ATTN_ARGS: several words
        step attention 420 python experiments/bench_attention.py ${ATTN_ARGS:-} --out "$DIR/bench_attention.json" ;;
      attention_sweep)
        # shellcheck disable=SC2086  # ATTN_SWEEP: several configs
        step attention_sweep 480 python experiments/bench_attention.py --sweep \
          ${ATTN_SWEEP:-16,4,16,4 16,2,16,4,2,2,1,1 16,4,16,4,2,2,1,1 16,4,16,4,2,2,4,1 16,4,16,4,3,2,2,1 16,4,16,4,2,2,2,2 16,4,16,4,2,3,2,1 32,4,16,4} \
          --lengths 1024 16384 65536 --alphas 1.0 --out "$DIR/bench_attention_sweep.json" ;;
      norm_loss)
        step norm_loss 300 python experiments/bench_norm_loss.py --out "$DIR/bench_norm_loss.json" ;;
      tests_norm)
        step tests_norm 300 env FIBAX_GPU_TESTS=1 python -m pytest -m gpu tests/test_norm.py tests/test_logsumexp.py \
          ${TEST_K:+-k "$TEST_K"} -vv -p no:cacheprovider --junitxml "$DIR/tests_norm.xml" ;;
      tests_model)
        step tests_model "${TEST_LIMIT_S:-900}" env FIBAX_GPU_TESTS=1 python -m pytest -m gpu \
          tests/test_model.py tests/test_train.py ${TEST_K:+-k "$TEST_K"} -vv -p no:cacheprovider \
          "${per[@]}" --junitxml "$DIR/tests_model.xml" ;;
      attention2)
        step attention2 300 python experiments/bench_attention.py --impls pallas_packed \
          cudnn_window --num-warps 2 --rung-group 1 --out "$DIR/bench_attention_packed_warps2.json" ;;
      train)
        for impl in pallas_packed pallas; do
          step "train_$impl" 600 python experiments/bench_train.py \
            --runs dense fib_stagger_w12 fib_learned_w12 --seq-lens 1024 8192 --impl "$impl" \
            --profile "$SCRATCH/trace/$impl" "${common[@]}" --out "$DIR/bench_train_$impl.json"
        done ;;
      train_options)
        local sets; IFS=';' read -ra sets <<< "${TRAIN_SETS:-model.logits_grad=compute model.mlp_pad=128;model.logits_grad=compute model.mlp_pad=128 model.logits_dtype=compute;model.mlp_pad=128}"
        local prof=()
        for i in "${!sets[@]}"; do
          [ "${TRAIN_PROFILE:-1}" = 0 ] || prof=(--profile "$SCRATCH/trace/options_$i")
          [ "${TRAIN_PROFILE:-1}" = timed ] && prof+=(--profile-as-timed)
          local dump=()
          [ "${TRAIN_DUMP:-0}" = 1 ] && dump=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_dump_to=$DIR/hlo_$i --xla_dump_hlo_module_re=.*train_step.*")
          # shellcheck disable=SC2086  # one set is several overrides
          # shellcheck disable=SC2086  # TRAIN_RUNS, TRAIN_LENS: several words
          step "train_options_$i" 600 "${dump[@]}" python experiments/bench_train.py \
            --runs ${TRAIN_RUNS:-dense fib_stagger_w12 fib_learned_w12} \
            --seq-lens ${TRAIN_LENS:-1024} --impl pallas_packed \
            "${prof[@]}" --command-buffers "${TRAIN_CB:-default}" \
            ${TRAIN_BLOCKS:+--blocks "$TRAIN_BLOCKS"} ${TRAIN_VARIANT:+--xla-variant "$TRAIN_VARIANT"} \
            "${common[@]}" ${sets[$i]} --out "$DIR/bench_train_options_$i.json"
          if [ -d "$DIR/hlo_$i" ]; then  # the optimized train steps only, compressed
            find "$DIR/hlo_$i" -type f ! -name '*after_optimizations.txt' -delete
            gzip -f "$DIR/hlo_$i"/*.txt 2>/dev/null || true
          fi
        done ;;
      ncu)
        # shellcheck disable=SC2086  # NCU_ARGS: several words
        step ncu 480 python experiments/profile_kernels.py ${NCU_ARGS:-} --out "$DIR/ncu_kernels.json" \
          --report "$SCRATCH/trace/ncu_kernels_$NAME.ncu-rep" ;;
      cb_dump)
        # TRAIN_RUNS (default fib_stagger_w12) at T = 1,024 compiled with XLA's command buffers
        # (its default list), the thunk sequence after XLA's thunk passes dumped: which
        # kernels the command buffers hold and which run between them. TRAIN_SETS: one set.
        local cb=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION
        # shellcheck disable=SC2086  # TRAIN_RUNS, TRAIN_SETS: several words
        step cb_dump 300 env XLA_FLAGS="--xla_gpu_enable_command_buffer=$cb --xla_dump_to=$DIR/dump --xla_dump_hlo_module_re=.*train_step.*" \
          python experiments/bench_train.py --runs ${TRAIN_RUNS:-fib_stagger_w12} --seq-lens 1024 \
          --impl pallas_packed --steps 2 "${common[@]}" ${TRAIN_SETS:-} --out "$DIR/bench_train_cb_dump.json"
        find "$DIR/dump" -type f ! -name '*thunk_sequence*' -delete 2>/dev/null || true ;;
      train_xla)
        local flags; IFS=';' read -ra flags <<< "${XLA_SETS-"--xla_gpu_enable_triton_gemm=true;--xla_gpu_enable_triton_gemm=false"}"
        for i in "${!flags[@]}"; do
          step "train_xla_$i" 600 env XLA_FLAGS="${flags[$i]# }" python experiments/bench_train.py \
            --runs dense fib_stagger_w12 --seq-lens 1024 --impl pallas_packed \
            --profile "$SCRATCH/trace/xla_$i" "${common[@]}" model.logits_grad=compute \
            --out "$DIR/bench_train_xla_$i.json"
        done ;;
      train_text)
        if [ -z "${SPEED_DATA:-}" ]; then
          echo "$(date +%s) skipped train_text: SPEED_DATA names no prepared data directory" >> "$DIR/log.txt"
          continue
        fi
        for e in ${EMBED_SETS:-sorted onehot scatter}; do
          step "train_text_$e" 600 python experiments/bench_train.py --runs fib_stagger_w12 \
            --seq-lens 1024 --impl pallas_packed --data "$SPEED_DATA" --set model.embed_backward="$e" \
            model.logits_grad=compute model.mlp_pad=128 --out "$DIR/bench_train_text_$e.json"
        done ;;
      compile)
        # Each run, spec and layer count its own process (no in-process cache of another
        # helps it); the spec "default" names no blocks (the machine's default).
        local n=0
        for run in ${COMPILE_RUNS:-fib_stagger_w12}; do
          for spec in ${COMPILE_SPECS:-16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,0 16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3}; do
            local blk=(--blocks "$spec")
            [ "$spec" = default ] && blk=()
            for layers in ${COMPILE_LAYERS:-1 16}; do
              step "compile_$n" 300 python experiments/compile_attention.py --run "$run" "${blk[@]}" \
                --layers "$layers" --out "$DIR/compile_$n.json"
              n=$((n + 1))
            done
          done
        done ;;
      train_run)
        # A short real training run of RUN_CONFIG on SPEED_DATA, once per blocks spec of
        # RUN_BLOCKS ("default": the machine's), each its own workdir; the metrics kept,
        # the checkpoints deleted.
        if [ -z "${SPEED_DATA:-}" ]; then
          echo "$(date +%s) skipped train_run: SPEED_DATA names no prepared data directory" >> "$DIR/log.txt"
          continue
        fi
        local n=0
        for spec in ${RUN_BLOCKS:-16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,0 default}; do
          local blk=()
          [ "$spec" = default ] || blk=(model.attention.gpu_blocks="$spec")
          # shellcheck disable=SC2086  # RUN_SETS: several overrides
          step "train_run_$n" 600 python -m fibax.train \
            --config "${RUN_CONFIG:-configs/paper.py:fib_stagger_w12,steps=300}" \
            --workdir "$SCRATCH/runs/$NAME/run_$n" --set data_dir="$SPEED_DATA" \
            train.progress_bar=False "${blk[@]}" ${RUN_SETS-model.attention.impl=pallas_packed}
          mkdir -p "$DIR/run_$n"
          cp "$SCRATCH/runs/$NAME/run_$n"/{metrics.jsonl,config.json} "$DIR/run_$n/" 2>/dev/null || true
          echo "$spec" > "$DIR/run_$n/blocks.txt"
          rm -rf "$SCRATCH/runs/$NAME/run_$n/checkpoints"
          n=$((n + 1))
        done ;;
      latency)
        # shellcheck disable=SC2086  # LAT_BATCH: several numbers
        for impl in ${LAT_IMPLS:-pallas_packed xla}; do
          for t in ${LAT_LENS:-1024 4096}; do
            step "latency_${impl}_T$t" 600 python -m fibax.eval latency \
              --config configs/paper.py:fib_learned_w12 --impl "$impl" --seq-len "$t" \
              --batch ${LAT_BATCH:-1 32} --out "$DIR/latency_${impl}_T$t.json"
          done
        done ;;
      tests_packed | tests_grouped | tests_ungrouped | tests_learned | tests_lse | tests_diagonal | tests_dkv_rows \
        | tests_bitwise | tests_ew | tests_dkv_tma | tests_q_tma)
        local k=GpuPackedKernel
        [ "$s" = tests_learned ] && k="GpuLearnedRungs and not Diagonal and not DkvRows"
        [ "$s" = tests_grouped ] && k=GpuPackedGroupedKernel
        [ "$s" = tests_ungrouped ] && k=GpuPackedUngroupedKernel
        [ "$s" = tests_lse ] && k=GpuPackedLse
        [ "$s" = tests_diagonal ] && k="GpuPackedDiagonalKernel or GpuLearnedRungsDiagonal"
        [ "$s" = tests_dkv_rows ] && k="GpuPackedDkvRowsKernel or GpuLearnedRungsDkvRows"
        [ "$s" = tests_bitwise ] && k="bitwise_the_same_gradients"
        [ "$s" = tests_ew ] && k=GpuPackedEwKernel
        [ "$s" = tests_dkv_tma ] && k=GpuPackedDkvTmaKernel
        [ "$s" = tests_q_tma ] && k=GpuPackedQTmaKernel
        k=${TEST_K:-$k}
        step "$s" "${TEST_LIMIT_S:-900}" env FIBAX_GPU_TESTS=1 python -m pytest -m gpu tests/test_kernels.py -k "$k" \
          -vv -p no:cacheprovider "${per[@]}" --junitxml "$DIR/$s.xml" ;;  # -vv: the -q of addopts
      *) echo "$(date +%s) unknown step $s" >> "$DIR/log.txt" ;;
    esac
  done
  echo "$(date +%s) done" >> "$DIR/log.txt"
}

case "${1:-}" in
  start)
    gpu=${2:?GPU index}
    [ -e "$DIR" ] && die "$DIR exists: the suite was already started"
    source experiments/gpu_env.sh
    mkdir -p "$DIR"
    nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > "$DIR/card.txt" || true
    if [ -n "${SPEED_COMMIT:-}" ]; then
      echo "$SPEED_COMMIT" > "$DIR/commit.txt"
    else
      git rev-parse HEAD > "$DIR/commit.txt" 2>/dev/null || true
    fi
    export CUDA_VISIBLE_DEVICES=$gpu SPEED_STEPS=${SPEED_STEPS:-}
    setsid nohup bash "$SELF" _suite > "$DIR/suite.log" 2>&1 < /dev/null &
    echo $! > "$DIR.pid"
    sleep 2; cat "$DIR/log.txt" ;;
  _suite)
    suite ;;
  poll)
    wait_s=${2:?seconds}; out=${3:?output folder}
    [ -d "$DIR" ] || die "no suite started"
    end=$((SECONDS + wait_s))
    until grep -q " done$" "$DIR/log.txt" 2>/dev/null || [ "$SECONDS" -ge "$end" ]; do sleep 5; done
    mkdir -p "$out"
    tar -czf "$out/$NAME.tar.gz" -C "$SCRATCH" "$NAME"
    cat "$DIR/log.txt"
    nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader || true ;;
  queue)
    gpu=${2:?GPU index}; file=${3:?queue file}
    [[ "$file" = /* ]] || file=$CALLER/$file
    [ -f "$file" ] || die "no queue file $file"
    [[ "$gpu" =~ ^[0-9]+$ ]] || die "bad GPU index $gpu"
    while read -r name _ || [ -n "$name" ]; do  # (a last line without its newline too)
      [[ -z "$name" || "$name" == \#* ]] && continue
      [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "bad suite name $name in $file"
      [ -e "$SCRATCH/$name" ] && die "$SCRATCH/$name exists: suite $name was already started"
    done < "$file"
    # A GPU's first queue is queue_GPU; a later one, queue_GPU.N, waits for the one before it
    # to be done, so a lease can add suites after seeing the first results.
    id=$gpu prev=""; n=0
    while [ -e "$SCRATCH/queue_$id.log" ]; do prev=$id; n=$((n + 1)); id=$gpu.$n; done
    source experiments/gpu_env.sh  # once, before the queue's suites start
    mkdir -p "$SCRATCH"
    cp "$file" "$SCRATCH/queue_$id.txt"
    # The queue's suites run from a snapshot of this checkout (its code, .stage and .whl; not
    # .git, .venv, results, runs or data), so that a runner copying a new tree over this one
    # while they run (a later upload) cannot pull a file from under a starting step.
    # The snapshot is deleted when the queue is done; its suites' commit.txt is SPEED_COMMIT or
    # this checkout's HEAD (the snapshot has no .git), a relative SPEED_DATA this checkout's.
    snap=$SCRATCH/tree_$id
    rm -rf "$snap" && mkdir -p "$snap"
    # (tar exits 1 when a file changes as it reads it: the copy it made stands)
    { tar -C "$PWD" --exclude=./.git --exclude=./.venv --exclude=./experiments/results \
      --exclude=./runs --exclude=./data -cf - . || [ $? = 1 ]; } | tar -C "$snap" -xf -
    export SPEED_COMMIT=${SPEED_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
    export FIBAX_CHECKOUT=$PWD
    setsid nohup bash "$snap/experiments/speed_suite.sh" _queue "$gpu" "$id" "$prev" \
      > "$SCRATCH/queue_$id.log" 2>&1 < /dev/null &
    echo "queue $id on GPU $gpu started${prev:+ (after queue $prev)}: $SCRATCH/queue_$id.log" ;;
  _queue)
    gpu=$2 id=$3 prev=$4
    if [ -n "$prev" ]; then
      until grep -q "queue done$" "$SCRATCH/queue_$prev.log" 2>/dev/null; do sleep 3; done
    fi
    while read -r name settings || [ -n "$name" ]; do
      [[ -z "$name" || "$name" == \#* ]] && continue
      echo "$(date +%s) start $name: $settings"
      # In a subshell: a bad line (an unset variable under set -u) fails this suite only. The
      # start's own output, its error if it fails, goes to queue_ID.starts.
      if ! (eval "SPEED_NAME=$name $settings bash \"\$SELF\" start $gpu") >> "$SCRATCH/queue_$id.starts" 2>&1; then
        echo "$(date +%s) failed to start $name (queue_$id.starts)"; continue
      fi
      # Until the suite is done, or its process is gone (stopped, killed): the next one never
      # overlaps a running suite, and a dead one does not hold the queue.
      until grep -q " done$" "$SCRATCH/$name/log.txt" 2>/dev/null; do
        kill -0 "$(cat "$SCRATCH/$name.pid")" 2>/dev/null || { echo "$(date +%s) $name ended without done"; break; }
        sleep 3
      done
      echo "$(date +%s) end $name"
    done < "$SCRATCH/queue_$id.txt"
    echo "$(date +%s) queue done"
    [ "$(cd "$(dirname "$SELF")/.." && pwd)" = "$SCRATCH/tree_$id" ] && rm -rf "$SCRATCH/tree_$id"
    true ;;
  poll-all)
    wait_s=${2:?seconds}; out=${3:?output folder}
    compgen -G "$SCRATCH/queue_*.log" > /dev/null || die "no queue started"
    end=$((SECONDS + wait_s))
    # (no pipe: with pipefail, grep -q closing it early would read as a failure)
    until [ -z "$(grep -L "queue done$" "$SCRATCH"/queue_*.log)" ] || [ "$SECONDS" -ge "$end" ]; do
      sleep 5
    done
    mkdir -p "$out"
    # The queues' files and their suites' folders only (SCRATCH may hold other things: data).
    mapfile -t names < <(cd "$SCRATCH" && ls -d queue_* && sed -e 's/#.*//' -e '/^[[:space:]]*$/d' \
      queue_*.txt | awk '{print $1}' | while read -r n; do [ -e "$n" ] && echo "$n"; done)
    # tar exits 1 when a running suite writes a file as it reads it: what it packed stands.
    tar -czf "$out/all.tar.gz" -C "$SCRATCH" --exclude=trace --exclude='*.hlo.txt' "${names[@]}" || [ $? = 1 ]
    tail -n 2 "$SCRATCH"/queue_*.log
    nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null || true ;;
  stop)
    [ -f "$DIR.pid" ] || die "no suite started"
    kill -- -"$(cat "$DIR.pid")" 2>/dev/null || true
    echo "$(date +%s) stopped" >> "$DIR/log.txt" ;;
  *)
    die "usage: speed_suite.sh start GPU | poll SECONDS OUT | stop | queue GPU FILE | poll-all SECONDS OUT" ;;
esac
