#!/usr/bin/env bash
# The GPU measurements and training recipes, on one GPU node whose Python has JAX with CUDA but (as on the H200
# nodes this project is sometimes lent) no TensorFlow, Keras or Dask. Run from the repository root:
#
#   OUT=gpu_out bash benchmarks/gpu_node.sh speed synapses ffn
#
# Stages (each bounded by its own time limit, so a short lease still returns what finished):
#   speed     benchmarks/ffn_speed.py on a synthetic 160^3 volume under KERAS_BACKEND=jax: FIB-25 and the packaged
#             small model, float32 and bfloat16, batches across parallel floods (issue #3's GPU speed figures).
#             Needs the imported FIB-25 folder at runs/fib25, made where TensorFlow is:
#               connectome import-ffn ../shared/data/ffn_fib25_checkpoint/model.ckpt-27465036 runs/fib25
#   synapses  connectome train synapses examples/train_synapses_gpu.json (warm start, max_wall_s 420)
#   ffn       connectome train ffn examples/train_ffn_synthetic_gpu.yaml (its volumes made here first with
#             `connectome synth`, which needs neither Dask nor TensorStore), then benchmarks/ffn_quality.py on the
#             held-out synthetic volume with the exported model, on the same node (FFN inference runs under JAX)
#
# Packages the node lacks travel as wheels in .whl/ (installed to /tmp/site with no index). For the H200 image
# (Python 3.12), fetched where the package index is reachable:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl keras==3.15.1 namex optree connected-components-3d fastremap
# .whl/, runs/ and gpu_out/ are git-ignored: a tool that copies the working tree to the node must be told to take
# .whl and runs/fib25 along. Time: speed up to SPEED_S (240 s), synapses and ffn up to 480 s each, plus the node's
# start-up; with a 15-minute device budget run speed with one training stage at most.
set -euo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" | tee "$OUT/env.txt"

for stage in "${@:-speed}"; do
  case "$stage" in
    speed)
      timeout "${SPEED_S:-240}" python3 benchmarks/ffn_speed.py --data synthetic --size 160 --fib25-model runs/fib25 \
        --fib25-batches 1,16,64 --batches 1,16,64 --precisions float32,bfloat16 2>&1 | tee "$OUT/ffn_speed.log" \
        || true ;;
    synapses)
      timeout "${SYNAPSES_S:-480}" python3 -m pipeline.cli train synapses examples/train_synapses_gpu.json \
        --output-dir "$OUT/synapses" 2>&1 | tee "$OUT/synapses.log" || true ;;
    ffn)
      for s in $(seq 1001 1012); do
        [ -f "runs/synth_$s.h5" ] || python3 -m pipeline.cli synth "runs/synth_$s.h5" --seed "$s" --shape 48 256 256 \
          --quiet &
      done
      wait
      timeout "${FFN_S:-480}" python3 -m pipeline.cli train ffn examples/train_ffn_synthetic_gpu.yaml 2>&1 \
        | tee "$OUT/ffn.log" || true
      cp -r runs/ffn_synthetic_gpu/model "$OUT/ffn_model" 2>/dev/null || true
      timeout "${QUALITY_S:-120}" python3 benchmarks/ffn_quality.py --parts synthetic --methods ffn,baseline \
        --synthetic-model runs/ffn_synthetic_gpu/model 2>&1 | tee "$OUT/ffn_quality.log" ;;
    *) echo "gpu_node.sh: unknown stage $stage (speed, synapses, ffn)" >&2; exit 2 ;;
  esac
done
