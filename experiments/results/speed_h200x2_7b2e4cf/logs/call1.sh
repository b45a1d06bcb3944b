# One call: GPU 0's timing queues (new tree, HEAD 2537f9d's under .stage/old, the unpeeled
# variant under .stage/mid, interleaved), GPU 1's checks then its queue.
source experiments/gpu_env.sh
C=$(cat .stage/commit)
q() { SPEED_COMMIT=$1 taskset -c $2 bash $3/experiments/speed_suite.sh queue $4 .stage/$5; }
q $C 0-15 . 0 q_new1
q 2537f9d 0-15 .stage/old 0 q_old1
q "$C-unpeeled" 0-15 .stage/mid 0 q_mid1
q $C 0-15 . 0 q_new2
q 2537f9d 0-15 .stage/old 0 q_old2
q $C 0-15 . 0 q_new3
export CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
for a in "4 1024 8 2 64 12 13,21,34,55,89,144,233,377,610,987" "2 256 8 2 64 60 61,67,73,79,85,97,103,109 --dlse --buffers 3" "2 256 8 2 64 60 61,67,73,79,85,97,103,109 --buffers 1"; do
  echo "check $a: $(timeout 120 python experiments/mosaic_query_check.py $a 2>&1 | tail -1)"
done | tee -a /root/fibax/checks.txt
unset CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_PREALLOCATE
q $C 16-31 . 1 q_gpu1
sleep 2; tail -n 2 /root/fibax/queue_*.log
