"""CORE scorer on a synthetic bundle in the real format (tests/assets/core_bundle) with hand-checkable answers.

The language model is a fixed bigram table, so every score can be worked out on paper:
  toy_mc (4 choices, 2-shot; baseline 25%): after "pet" p(cat) .4 > p(dog) .3 > p(fish) = p(bird) .1 > p(cow) .05;
    "cow cat" scores (−ln .05 − ln .9)/2 = 1.55 > −ln .3 = 1.20, so it loses to "dog". Correct: items 0, 2, 3
    -> accuracy 3/5, centered (0.6 − 0.25)/0.75 = 0.4667.
  toy_schema (baseline 50%): p(sat | cat) .7 > p(sat | dog) .2 and p(ran | dog) .6 > p(ran | cat) .1: items 0 and
    2 correct -> 2/3, centered (0.6667 − 0.5)/0.5 = 0.3333.
  toy_lm (delimiter " answer ", 1-shot; baseline 0): greedy after "answer" is "sat", after "sat" is "down":
    "sat down" and "sat" are reproduced, "ran" and "sat cat" are not -> 2/4, centered 0.5.
"""

from pathlib import Path
import pytest
import torch

from parcae.eval.core import CoreScorer, Task, load_tasks, render, spans
from toy_models import Bigram, word_tokenizer

BUNDLE = Path(__file__).parent.parent / "assets" / "core_bundle"


def test_prompts_and_scored_spans_follow_the_protocol():
    mc = Task("t", "f", 1, "multiple_choice", delimiter=": ")
    item, shot = {"query": "Q", "choices": ["a", "b c"], "gold": 1}, {"query": "S", "choices": ["x", "y"], "gold": 0}
    assert render(mc, item, [shot]) == ["S: x\n\nQ: a", "S: x\n\nQ: b c"]
    lm = Task("t", "f", 0, "language_modeling", delimiter=" => ")
    assert render(lm, {"context": " ctx  ", "continuation": "go"}, []) == ["ctx =>", "ctx => go"]
    seqs, sp = spans(mc, [[0, 5, 6, 7], [0, 5, 6, 8, 9]])
    assert sp == [(3, 4), (3, 5)]                          # after the shared prefix
    seqs, sp = spans(Task("t", "f", 0, "schema"), [[0, 3, 9, 9], [0, 4, 4, 9, 9]])
    assert sp == [(2, 4), (3, 5)]                          # the shared suffix
    with pytest.raises(ValueError, match="prefix"):
        spans(lm, [[0, 1, 2], [0, 1, 3, 4]])


def test_hand_checked_accuracies_and_centered_scores():
    model = Bigram()
    scorer = CoreScorer(model, word_tokenizer(), loops=5, batch_size=3)
    result = scorer.evaluate(BUNDLE, load_tasks(str(BUNDLE / "core.yaml")), seeds=(1234, 2345, 3456), progress=False)
    tasks = result["tasks"]
    assert tasks["toy_mc"]["accuracy_mean"] == pytest.approx(3 / 5)
    assert tasks["toy_mc"]["centered_mean"] == pytest.approx((0.6 - 0.25) / 0.75)
    assert tasks["toy_schema"]["accuracy_mean"] == pytest.approx(2 / 3)
    assert tasks["toy_schema"]["centered_mean"] == pytest.approx((2 / 3 - 0.5) / 0.5)
    assert tasks["toy_lm"]["centered_mean"] == pytest.approx(0.5)
    expected_core = ((0.6 - 0.25) / 0.75 + (2 / 3 - 0.5) / 0.5 + 0.5) / 3
    assert result["core"]["mean"] == pytest.approx(expected_core) and result["core"]["std"] == pytest.approx(0)
    assert all(loops == 5 for _, loops in model.calls)     # every forward runs the requested loop count
    assert max(shape[0] for shape, _ in model.calls) <= 3  # batched, never more than batch_size sequences


def test_missing_task_files_are_skipped_and_reported(tmp_path):
    tasks = load_tasks(str(BUNDLE / "core.yaml")) + [Task("absent", "nowhere/absent.jsonl", 0, "schema", core=True)]
    result = CoreScorer(Bigram(), word_tokenizer(), loops=2).evaluate(BUNDLE, tasks, seeds=(1234,), progress=False)
    assert result["skipped_tasks"] == ["absent"] and "absent" not in result["tasks"]


def test_paper_task_tables():
    core, extended = load_tasks("core"), load_tasks("core_extended")
    assert len(core) == 22 and len(extended) == 46 and all(t.core for t in core)
    shots = {t.label: t.shots for t in extended}
    assert shots["agi_eval_lsat_ar"] == 3 and shots["mmlu_fewshot"] == 5 and shots["coqa"] == 0  # paper Table 15
    with pytest.raises(ValueError, match="core_extended"):
        load_tasks("core_plus")


def test_real_model_results_do_not_depend_on_batch_size(tiny_config):
    from parcae.data import load_tokenizer
    from parcae.model import LoopedLM

    from conftest import SHAKESPEARE_TOKENIZER

    torch.manual_seed(0)
    model = LoopedLM(tiny_config(vocab_size=4096, block_size=64)).eval()
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    tasks = load_tasks(str(BUNDLE / "core.yaml"))
    one = CoreScorer(model, tok, loops=3, batch_size=1).evaluate(BUNDLE, tasks, seeds=(1234,), progress=False)
    many = CoreScorer(model, tok, loops=3, batch_size=16).evaluate(BUNDLE, tasks, seeds=(1234,), progress=False)
    assert one["tasks"] == many["tasks"]


def test_an_existing_out_file_is_refused_before_any_work(tmp_path):
    from parcae.errors import UsageError
    from parcae.eval.core import core

    out = tmp_path / "core.json"
    out.write_text("earlier results\n")
    # the checkpoint does not even exist: the refusal comes first, and the file is untouched
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        core(ckpt_path=str(tmp_path / "missing.ckpt"), bundle=str(tmp_path), out=out)
    assert out.read_text() == "earlier results\n"
    with pytest.raises(UsageError, match="missing.ckpt"):  # with --overwrite it goes on (and fails on the checkpoint)
        core(ckpt_path=str(tmp_path / "missing.ckpt"), bundle=str(tmp_path), out=out, overwrite=True)
    assert out.read_text() == "earlier results\n"
