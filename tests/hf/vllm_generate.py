"""Greedy generation with vLLM (run by tests/hf/test_vllm.py inside .venv-vllm; prints one JSON line).

    .venv-vllm/bin/python tests/hf/vllm_generate.py FOLDER PROMPTS.json LOOPS MAX_NEW_TOKENS [--ignore_eos]

PROMPTS.json holds token-id lists. Prints {"batch": [...], "alone": [...], "seconds": ..., "tokens": ...}: the
generated ids of all prompts in one call, of each prompt in a call of its own, and the wall time and token count of
the batched call.
"""

import json
import sys
import time

if __name__ == "__main__":  # vLLM starts an engine-core process that re-imports this file
    from vllm import LLM, SamplingParams

    folder, prompts_file, loops, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = [{"prompt_token_ids": ids} for ids in json.load(open(prompts_file))]
    llm = LLM(model=folder, dtype="float32", max_model_len=128, enforce_eager=True, hf_overrides={"num_loops": loops},
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos="--ignore_eos" in sys.argv[5:])
    start = time.perf_counter()
    batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    alone = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    print(json.dumps({"batch": batch, "alone": alone, "seconds": seconds, "tokens": sum(map(len, batch))}))
