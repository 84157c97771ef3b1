#!/usr/bin/env bash
# Multi-node DeepSpeed pre-training under SLURM: one task per node, each running the DeepSpeed launcher
# without ssh (--no_ssh), which starts that node's ranks (one per GPU).
#
#   sbatch --nodes 2 --gpus-per-node 8 launch/sbatch_multinode.sh CONFIG DATA RUN_DIR [EXTRA_TRAIN_ARGS...]
#   sbatch --nodes 4 --gpus-per-node 8 launch/sbatch_multinode.sh configs/bert-large.yaml /data/wiki runs/large \
#       --set deepspeed.zero_optimization.stage=3
#
# What each node runs (node K of N, HOST0 = the first host of the allocation):
#   python -m launch.hostfile --slurm --output RUN_DIR/hostfile
#   deepspeed --hostfile RUN_DIR/hostfile --no_ssh --num_nodes N --node_rank $SLURM_NODEID \
#       --master_addr HOST0 --master_port 29500 --module training --config CONFIG --data DATA --run-dir RUN_DIR
#
# The same with torchrun instead of the DeepSpeed launcher (training reads RANK/WORLD_SIZE/LOCAL_RANK):
#   srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --node_rank $SLURM_NODEID \
#       --rdzv_backend c10d --rdzv_endpoint HOST0:29500 -m training --config CONFIG --data DATA --run-dir RUN_DIR
#
# Preemption/time limit: `--signal=TERM@120` makes SLURM send SIGTERM to every process of the job step 120 s
# before the end; each rank finishes its current step, the ranks save one complete checkpoint together and
# exit 0 (the DeepSpeed launcher itself then exits 1, and kills ranks that take over 30 s). Resubmitting the
# same command resumes from the latest complete checkpoint (--resume auto). By hand: signal the ranks (or the
# `deepspeed.launcher.launch` process, which passes SIGTERM on); the `deepspeed` command does not pass it on.
#SBATCH --job-name=pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: sbatch --nodes N launch/sbatch_multinode.sh CONFIG DATA RUN_DIR [EXTRA_TRAIN_ARGS...]" >&2
    exit 2
fi
CONFIG=$1 DATA=$2 RUN_DIR=$3
shift 3
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
mkdir -p "$RUN_DIR"
python -m launch.hostfile --slurm --output "$RUN_DIR/hostfile"

# One task per node; each expands to its node's ranks.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec deepspeed --hostfile "$0" --no_ssh --num_nodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
        --master_addr "$1" --master_port "$2" --module training \
        --config "$3" --data "$4" --run-dir "$5" "${@:6}"
' "$RUN_DIR/hostfile" "$MASTER_ADDR" "$MASTER_PORT" "$CONFIG" "$DATA" "$RUN_DIR" "$@"
