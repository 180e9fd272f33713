#!/usr/bin/env bash
# The main job: set up .venv, prepare the embedded Shakespeare corpus, train a small Parcae on CPU, then
# sweep the number of loops at test time. Re-running continues/reuses the same run (--auto_resume).
#   ./scripts/demo.sh                         # recipes/mini/demo.yaml (about 5 minutes on 2 cores)
#   RECIPE=recipes/mini/<other>.yaml ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export LITDATA_DISABLE_VERSION_CHECK=1
RECIPE=${RECIPE:-recipes/mini/demo.yaml}
LOOPS=${LOOPS:-1,2,3,4,6,8,12,16}
RUN=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['run_name'])" "$RECIPE")

python -m data_prep.shakespeare
parcae fit --config "$RECIPE" --auto_resume true
parcae test --ckpt_path "checkpoints/$RUN/last.ckpt" --loops "$LOOPS"

cat <<MSG

Done. Where to look:
  TensorBoard:  tensorboard --logdir checkpoints/$RUN      (loss by loops, loop telemetry, perf)
  checkpoint:   checkpoints/$RUN/last.ckpt  (config: checkpoints/$RUN/config.yaml)
  table:        checkpoints/$RUN/test_loops.csv  (and .json)
  plot:         checkpoints/$RUN/test_loops.png
MSG
