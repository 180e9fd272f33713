"""lm-evaluation-harness's own ``hf`` backend on an exported folder scores a local multiple-choice task like
``parcae lm-eval`` on the checkpoint: the same accuracy, and per-choice log-likelihoods that agree (exactly when the
initial state is zero; within the like-init noise otherwise, which parcae seeds per request and the folder per
position)."""


import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import write_choice_task  # noqa: E402
from hf_runs import export, make_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = [("The cat sat on the", ["mat", "dog", "sky", "fish"], 0), ("Once upon a", ["time", "tree", "boat", "cat"], 0),
         ("To be or not to", ["be", "go", "see", "run"], 0), ("The fox jumps over the", ["lazy dog", "moon", "sea", "A"], 1),
         ("Romeo and", ["Juliet", "Hamlet", "the", "king"], 0), ("All the world's a", ["stage", "play", "cat", "x"], 0),
         ("Good", ["morning", "night", "day", "bye"], 2), ("1 2 3", ["4", "5", "x", "y z"], 0)]


def _task(folder):
    write_choice_task(folder, "toy_choices", ITEMS, metrics=("acc", "acc_norm"))
    return folder


def _loglikelihoods(results):
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(results["samples"]["toy_choices"],
                                                                        key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("arch,tolerance", [({"state_init": "zero"}, 1e-4), ({}, 0.05)], ids=["zero-init", "like-init"])
def test_lm_eval_hf_backend_equals_parcae_lm_eval(tmp_path, arch, tolerance):
    run = make_run(tmp_path, "model", seed=3, **arch)
    folder = export(run, tmp_path / "hf")
    tasks = _task(tmp_path / "tasks")
    manager = TaskManager(include_path=str(tasks))
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
                                 tasks=["toy_choices"], task_manager=manager, batch_size=4, device="cpu",
                                 log_samples=True)
    # parcae lm-eval's model: the same adapter and simple_evaluate call, at the folder's loop count (μ_rec = 3)
    from parcae.eval.lm_eval_adapter import ParcaeEvalLM

    ours = lm_eval.simple_evaluate(model=ParcaeEvalLM(str(run / "last.ckpt"), loops=3, batch_size=4),
                                   tasks=["toy_choices"], task_manager=manager, log_samples=True)
    for metric in ("acc,none", "acc_norm,none"):
        assert hf["results"]["toy_choices"][metric] == ours["results"]["toy_choices"][metric], metric
    for a, b in zip(_loglikelihoods(hf), _loglikelihoods(ours)):
        assert a == pytest.approx(b, abs=tolerance)
