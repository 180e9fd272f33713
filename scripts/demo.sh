#!/usr/bin/env bash
# The main job: set up .venv, prepare the embedded Shakespeare corpus, train a small Parcae on CPU, then
# sweep the number of loops at test time on the validation plays and on a held-out text by another author
# (chapters I-IV of Lewis Carroll's "Alice's Adventures in Wonderland", public domain; see NOTICE).
# Re-running continues/reuses the same run (--auto_resume).
#   ./scripts/demo.sh                         # recipes/mini/demo.yaml (training about 5.6 minutes on 2 idle cores)
#   RECIPE=recipes/mini/<other>.yaml ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export LITDATA_DISABLE_VERSION_CHECK=1
RECIPE=${RECIPE:-recipes/mini/demo.yaml}
LOOPS=${LOOPS:-1,2,3,4,6,8,12,16}
HELD_OUT=${HELD_OUT:-data_prep/corpus/carroll_alice_ch1-4.txt}
RUN=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['run_name'])" "$RECIPE")

python -m data_prep.shakespeare
parcae fit --config "$RECIPE" --auto_resume true
parcae test --ckpt_path "checkpoints/$RUN/last.ckpt" --loops "$LOOPS"
parcae perplexity --ckpt_path "checkpoints/$RUN/last.ckpt" --text "$HELD_OUT" --loops "$LOOPS"
python scripts/demo_curves.py "checkpoints/$RUN" "$(basename "$HELD_OUT" .txt)"

cat <<MSG

Done. Where to look:
  TensorBoard:  tensorboard --logdir checkpoints/$RUN      (loss by loops, loop telemetry, perf)
  checkpoint:   checkpoints/$RUN/last.ckpt  (config: checkpoints/$RUN/config.yaml)
  tables:       checkpoints/$RUN/test_loops.csv (validation plays), checkpoints/$RUN/perplexity_$(basename "$HELD_OUT" .txt).json (held-out text)
  plots:        checkpoints/$RUN/test_loops.png (validation, with the L∞ + Z·e^(−zT) fit)
                checkpoints/$RUN/demo_loops.png (both curves side by side)
MSG
