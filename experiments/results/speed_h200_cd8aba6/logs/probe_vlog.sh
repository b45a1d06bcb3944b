# Where a learned layer's compile goes: XLA's VLOG(1) timers and the optimized HLO, 2 layers,
# learned (Triton learned kernels) beside static with the Triton kernels.
source experiments/gpu_env.sh
T=16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,0
for run in fib_learned_w12 fib_stagger_w12; do
  mkdir -p $OUT/$run
  XLA_FLAGS="--xla_dump_to=/tmp/hlo_$run --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*grad.*" TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_MAX_VLOG_LEVEL=1 \
    timeout 200 python experiments/compile_attention.py --run $run --blocks $T --layers 2 > /tmp/v_$run.txt 2>&1
  tail -1 /tmp/v_$run.txt
  wc -l /tmp/v_$run.txt
  gzip -c /tmp/v_$run.txt > $OUT/$run/vlog.txt.gz
  tar czf $OUT/$run/hlo.tar.gz -C /tmp hlo_$run
done
ls -la $OUT/*
