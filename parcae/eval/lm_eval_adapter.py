"""lm-evaluation-harness adapter: a parcae checkpoint as an ``lm_eval`` model at a fixed loop count (optional extra:
``pip install -e '.[eval]'``).

    parcae lm-eval --ckpt_path checkpoints/run/last.ckpt --tasks hellaswag,arc_easy,piqa --loops 8
    lm_eval --model parcae --model_args ckpt_path=checkpoints/run/last.ckpt,loops=8 --tasks lambada_openai
        (the second form needs ``import parcae.eval.lm_eval_adapter`` to register; ``parcae lm-eval`` does it)

All three request types — ``loglikelihood``, ``loglikelihood_rolling`` (perplexity tasks such as WikiText) and
``generate_until`` — run exactly ``loops`` iterations (the official adapter's rolling path forgot the depth and
ran at a random one). Sequences start with ``<|bos|>``, as in training (``parcae.data.tokenizer``); scores are
``parcae.model.loss.token_nll`` (the padded vocabulary excluded) and ``generate_until`` decodes greedily with the
KV-cached engine, as ``parcae generate --temperature 0`` does. The initial recurrent state is seeded per request,
so scores do not depend on batching. Paper Table 3 reports HellaSwag, ARC-c/e, PIQA, BoolQ, SciQ
(0-shot) and WikiText perplexity; lm-eval reports both ``acc`` and ``acc_norm`` (the paper does not say which).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Optional

import torch

from parcae.data.tokenizer import TextStream, bos_id, encode_prompt, encode_text, eos_id, stop_ids
from parcae.model.loss import IGNORE_INDEX, real_logits, token_nll

try:
    # lm-eval imports its own models (hf, vllm, ...) only while its registry is empty; registering ours first would
    # hide them from `--model hf` in the same process, so let it register them now.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # optional extra
    raise ImportError("the lm-eval adapter needs the optional extra: pip install -e '.[eval]'") from err


@register_model("parcae")
class ParcaeEvalLM(TemplateLM):
    def __init__(self, ckpt_path: Optional[str] = None, loops: Optional[int] = None, batch_size: int | str = 16,
                 device: Optional[str] = None, tokenizer: Optional[str] = None, max_length: Optional[int] = None,
                 model=None, tokenizer_obj=None) -> None:
        super().__init__()
        if model is None:
            from parcae.runs import load_checkpoint

            if ckpt_path is None:
                raise ValueError("ParcaeEvalLM needs ckpt_path (or a model and tokenizer_obj)")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            run = load_checkpoint(ckpt_path, device, tokenizer)
            model, tokenizer_obj = run.model, run.tokenizer
        self.model, self.tok = model, tokenizer_obj
        self._device = next(model.parameters()).device
        looped = getattr(model.config, "looped", True)
        self.loops = (int(loops) if loops is not None else model.config.mean_recurrence) if looped else None
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length or model.config.block_size)

    # -- TemplateLM plumbing ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return eos_id(self.tok)

    @property
    def prefix_token_id(self) -> int:
        return bos_id(self.tok)  # empty contexts are conditioned on <|bos|>, like the start of a training document

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """A context starts a document (<|bos|> first); lm-eval asks for a continuation without special tokens."""
        return encode_text(self.tok, string) if add_special_tokens is False else encode_prompt(self.tok, string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    # -- scoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and greedy-match flag for (context tokens, continuation tokens) pairs."""
        out = []
        vocab = self.model.config.vocab_size
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            fulls = [(context + continuation)[-(self.max_length + 1):] for context, continuation in chunk]  # crop the oldest context
            width = max(len(f) for f in fulls) - 1
            ids = torch.full((len(fulls), width), self.prefix_token_id, dtype=torch.long)
            targets = torch.full((len(fulls), width), IGNORE_INDEX, dtype=torch.long)
            for row, ((_, continuation), full) in enumerate(zip(chunk, fulls)):
                ids[row, : len(full) - 1] = torch.tensor(full[:-1])
                n = len(continuation)  # only the continuation is scored
                targets[row, len(full) - 1 - n: len(full) - 1] = torch.tensor(full[-n:])
            kwargs = {"loops": self.loops} if self.loops is not None else {}
            logits = self.model(ids.to(self._device), **kwargs).logits  # h₀ of (seed 0, position): as alone
            targets = targets.to(logits.device)
            nll = token_nll(logits, targets, vocab)
            greedy = real_logits(logits, vocab).argmax(-1)
            for row in range(len(chunk)):
                scored = targets[row] != IGNORE_INDEX
                out.append((-nll[row, scored].sum().item(), bool((greedy[row, scored] == targets[row, scored]).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._score(windows)
            results.append(sum(lp for lp, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with the KV-cached engine (``parcae generate --temperature 0``), cut at the
        first ``until`` string; the context is cropped from the left to leave room for ``max_gen_toks``."""
        from parcae.inference import Engine, Sampling

        outputs = []
        for context, gen_kwargs in [req.args for req in requests]:
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(0, min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - 1))
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            engine = Engine(self.model, loops=self.loops, seed=0)  # greedy; h₀ of (seed 0, position) as in scoring
            text, halt = TextStream(self.tok), set()
            for event in engine.stream([prompt], max_new, Sampling(temperature=0.0), stop_ids(self.tok), halt=halt):
                text.push(event.tokens[0])
                if any(stop in text.text for stop in until):
                    halt.add(0)  # the first stop string is complete: no more tokens
            outputs.append(min((text.text.split(stop)[0] for stop in until), key=len, default=text.text))
        return outputs


def lm_eval_command(*, ckpt_path: str, tasks: str, loops: Optional[int] = None, num_fewshot: int = 0,
                    batch_size: int = 16, limit: Optional[float] = None, include_path: Optional[str] = None,
                    device: Optional[str] = None) -> None:
    """lm-evaluation-harness tasks at a fixed loop count (optional extra `.[eval]`).

    Args:
        ckpt_path: the checkpoint to evaluate.
        tasks: comma-separated lm-eval task names (e.g. hellaswag,arc_easy).
        loops: loop count (default: the model's μ_rec).
        num_fewshot: few-shot examples per prompt.
        batch_size: requests scored together.
        limit: at most this many examples per task (a fraction below 1).
        include_path: folder of local task YAMLs (offline tasks).
        device: cpu, cuda, ... (default: cuda when available).
    """
    args = SimpleNamespace(ckpt_path=ckpt_path, tasks=tasks, loops=loops, num_fewshot=num_fewshot,
                           batch_size=batch_size, limit=limit, include_path=include_path, device=device)
    from parcae.options import check_options
    from parcae.runs import lm_eval_result, results_dir_for, write_text_atomically

    check_options(loops=(args.loops, 1), batch_size=(args.batch_size, 1), num_fewshot=(args.num_fewshot, 0))
    out_dir, note = results_dir_for(args.ckpt_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = ParcaeEvalLM(args.ckpt_path, loops=args.loops, batch_size=args.batch_size, device=args.device)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=TaskManager(include_path=args.include_path))
    from lm_eval.utils import make_table

    print(make_table(results))
    if out_dir is None:
        print(f"[parcae] {note}")
        return
    out = out_dir / lm_eval_result(lm.loops)
    write_text_atomically(out, json.dumps(results["results"], indent=2, default=str) + "\n")
    print(f"written: {out}")

