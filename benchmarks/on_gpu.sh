#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), in one time-boxed run: each step
# has its own time limit, so a slow or hung step costs only its own share, and every step
# writes its results as it ends.
#
#   bash benchmarks/on_gpu.sh OUT_DIR
#
# A machine with no package index lacks what the project needs beyond its image (seen on
# an H200 image: bytecode; for the Haiku and DQN programs also dm-haiku, jmp, gymnasium,
# farama-notifications): put their wheels in .whl/ first, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl bytecode==0.19.1
# TESTS=0 skips the tests; PROGRAMS="a b" runs those programs; DEADLINE (s) ends the programs.
#
# Writes OUT_DIR/log.txt (versions, device, every step's output), coexec.json (engine
# benchmark), memory.json (peak device memory with donation), programs.json/.md (library
# programs, then the ten programs, as many as DEADLINE allows).
set -u
out=${1:?usage: on_gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log=$out/log.txt
deadline=${DEADLINE:-540}  # seconds from the start: the program runs stop here

step() {  # step SECONDS COMMAND...: run it under a time limit, its output to the log
    local limit=$1; shift
    echo "== $(date +%T) [$limit s] $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "== $(date +%T) rc=$rc" | tee -a "$log"
}

# A machine that cannot reach a package index lacks what pip would install: wheels put in
# .whl/ beside this checkout (`pip download --no-deps bytecode -d .whl`) are installed first.
if ! $py -c "import bytecode" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --target /tmp/on_gpu_site .whl/*.whl >>"$log" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/on_gpu_site
fi
# The extension is built where the project was checked out; build it here if it does not load.
$py -c "import terra_bc._hook" 2>/dev/null || $py setup.py -q build_ext --inplace >>"$log" 2>&1
step 20 nvidia-smi -L
export BENCH_DEVICE=$($py -c "import sys; sys.path.insert(0, '.'); from benchmarks.run import default_device; print(default_device())")
step 60 $py -c "import jax, flax, optax, equinox, terra_bc; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'equinox', equinox.__version__); print(jax.devices())"
step 110 $py benchmarks/coexec.py --steps 100 --repeats 3 --mem-iters 2000 --json "$out/coexec.json"
step 80 $py benchmarks/distributed.py --only b --json "$out/memory.json"
[ "${TESTS:-1}" = 0 ] || step 90 $py -m pytest -q -x -p no:cacheprovider tests/test_coexec.py tests/test_donation.py
# One program per invocation, merged into one file: a program cut off by the deadline loses
# only itself.
for program in ${PROGRAMS:-lib_optax_mlp lib_nnx_cnn lib_linen_cnn lib_equinox_mlp lib_dpsgd_mlp \
               dropblock bert_cls gpt2 resnet dcgan music_transformer bert_qa sdpoint faster_rcnn yolov3}; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt 40 ]; then echo "== deadline: $program not run" | tee -a "$log"; continue; fi
    step "$left" $py -m benchmarks --programs "$program" --steps 20 --repeats 1 \
        --modes eager,jit,terra_bc --json "$out/programs.json" --markdown "$out/programs.md" \
        --chart /tmp/programs_gpu.png
done
