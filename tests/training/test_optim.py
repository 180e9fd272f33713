"""Optimizers and schedules against torch.optim.Muon and hand-computed values (paper Tables 20-21)."""

import copy
import io

import pytest
import torch

from parcae.model import LoopedLM
from parcae.training.optim import (LRSchedule, Muon, MuonAdamW, OptimizerConfig, ScheduleConfig, build_optimizer,
                                   split_parameters, update_muon_schedules)


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 48), (48, 16), (32, 32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads


def test_muon_equals_torch_muon_with_the_same_orthogonalisation_dtype():
    ours, grads = _pairs()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype=torch.bfloat16)
    opt_torch = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_torch.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_muon_fp32_orthogonalisation_on_cpu_is_close_to_bf16():
    a, grads = _pairs()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fp32, bf16 = Muon(a, lr=0.02), Muon(b, lr=0.02, ns_dtype=torch.bfloat16)
    assert fp32.ns_dtype is None  # default: fp32 on CPU
    for p, q, g in zip(a, b, grads[0]):
        p.grad, q.grad = g.clone(), g.clone()
    fp32.step()
    bf16.step()
    for p, q in zip(a, b):
        assert (p - q).abs().max() < 0.02 * 0.05  # same update up to bf16 rounding of a unit-scale matrix


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))
    p.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]]) * 1e-3
    opt = Muon([p], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, cautious_weight_decay=True)
    before = p.detach().clone()
    from parcae.training.optim import _newton_schulz
    update = _newton_schulz(p.grad, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    opt.step()
    mask = (update * before >= 0).float()
    expected = before - 0.1 * 0.5 * before * mask - 0.1 * update  # 2x2: lr adjustment √max(1, 1) = 1
    torch.testing.assert_close(p.detach(), expected)


def test_parameter_split_follows_table_20(tiny_config):
    model = LoopedLM(tiny_config())
    matrices, rest = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in matrices}
    adamw = {names[id(p)] for p in rest}
    assert "recurrent.0.attn.q_proj.weight" in muon and "coda.0.mlp.down_proj.weight" in muon
    for name in ("wte.weight", "value_embeds.0.weight", "injection.A_log", "injection.dt_bias", "injection.B",
                 "readout.weight", "prelude_norm.weight", "final_norm.weight", "prelude.0.attn.ve_gate.weight",
                 "prelude.0.attn_norm.weight"):
        assert name in adamw, name
    assert not muon & adamw and len(muon) + len(adamw) == len(names)


def test_muon_adamw_checkpoint_round_trip_continues_identically(tiny_config):
    torch.manual_seed(0)
    cfg = OptimizerConfig(name="muon_adamw", lr=0.01, muon_lr=0.02)
    model = LoopedLM(tiny_config())
    ids = torch.randint(0, 128, (2, 8))

    def step(m, opt):
        opt.zero_grad()
        m(ids, ids, loops=2, state_seed=0).loss.backward()
        opt.step()

    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW) and {g["kind"] for g in opt.param_groups} == {"muon", "adamw"}
    step(model, opt)
    clone = LoopedLM(tiny_config())
    clone.load_state_dict(model.state_dict())
    opt_clone = build_optimizer(clone, cfg)
    buffer = io.BytesIO()  # through serialization, as a checkpoint would (load_state_dict does not copy)
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt_clone.load_state_dict(torch.load(buffer, weights_only=True))
    step(model, opt)
    step(clone, opt_clone)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_lambda_lr_drives_both_inner_optimizers(tiny_config):
    opt = build_optimizer(LoopedLM(tiny_config()), OptimizerConfig(name="muon_adamw", lr=0.01, muon_lr=0.02))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(ScheduleConfig("trapezoid"), total_steps=10))
    for _ in range(7):
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.6)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(0.01 * 0.6)


def test_schedules_by_hand():
    trap = LRSchedule(ScheduleConfig("trapezoid", cooldown_fraction=0.5), total_steps=100)
    assert [trap(s) for s in (0, 49, 50, 75, 99, 100)] == pytest.approx([1, 1, 1, 0.5, 0.02, 0])  # (T − s)/cooldown
    wc = LRSchedule(ScheduleConfig("warmup_cooldown", warmup_steps=10, cooldown_steps=20), total_steps=100)
    assert [wc(s) for s in (0, 4, 9, 10, 79, 80, 90, 100)] == pytest.approx([0.1, 0.5, 1, 1, 1, 1, 0.5, 0])
    short = LRSchedule(ScheduleConfig("warmup_cooldown", warmup_steps=60, cooldown_steps=60), total_steps=100)
    values = [short(s) for s in range(100)]  # ramps overlap: continuous, peaks where they cross
    assert max(abs(a - b) for a, b in zip(values, values[1:])) < 0.02
    assert max(values) == pytest.approx(50 / 60)  # (s + 1)/60 meets (100 − s)/60 at s = 49.5
    cos = LRSchedule(ScheduleConfig("cosine", warmup_steps=0, min_lr_ratio=0.1), total_steps=100)
    assert [cos(s) for s in (0, 50, 100)] == pytest.approx([1, 0.55, 0.1])
    with pytest.raises(ValueError, match="max_steps"):
        LRSchedule(ScheduleConfig("trapezoid"), total_steps=-1)
    with pytest.raises(ValueError, match="cooldown_fraction"):
        ScheduleConfig("trapezoid", cooldown_fraction=1.5)


def test_muon_momentum_warmup_and_weight_decay_decay(tiny_config):
    cfg = OptimizerConfig(name="muon_adamw")
    opt = build_optimizer(LoopedLM(tiny_config()), cfg)
    for step, momentum, wd in ((0, 0.85, 0.2), (150, 0.90, 0.15), (300, 0.95, 0.1), (600, 0.95, 0.0)):
        update_muon_schedules(opt, cfg, step, total_steps=600)
        assert opt.muon.param_groups[0]["momentum"] == pytest.approx(momentum)
        assert opt.muon.param_groups[0]["weight_decay"] == pytest.approx(wd)


def test_muon_adamw_state_dict_has_torch_layout_and_reads_the_old_one(tiny_config):
    """Standard {state, param_groups} (what torch.distributed.checkpoint needs); the earlier {muon, adamw} layout
    of existing checkpoints still loads and continues identically."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    cfg = OptimizerConfig(name="muon_adamw", lr=0.01, muon_lr=0.02)
    models = [LoopedLM(tiny_config()) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, cfg) for m in models]

    def step(m, opt):
        opt.zero_grad()
        m(ids, ids, loops=2, state_seed=0).loss.backward()
        opt.step()

    step(models[0], opts[0])
    standard = opts[0].state_dict()
    assert set(standard) == {"state", "param_groups"} and len(standard["state"]) == len(list(models[0].parameters()))
    n_muon = len(opts[0].muon.param_groups)

    def inner(groups):  # an inner optimizer's own state_dict: its parameters numbered from 0
        renumber = {old: new for new, old in enumerate(i for g in groups for i in g["params"])}
        return {"state": {renumber[i]: s for i, s in standard["state"].items() if i in renumber},
                "param_groups": [{**g, "params": [renumber[i] for i in g["params"]]} for g in groups]}

    old_layout = {"muon": inner(standard["param_groups"][:n_muon]), "adamw": inner(standard["param_groups"][n_muon:])}
    for m, opt, sd in ((models[1], opts[1], standard), (models[2], opts[2], old_layout)):
        m.load_state_dict(models[0].state_dict())
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.muon.state is opt.state and opt.adamw.param_groups[0] is opt.param_groups[-1]
    for m, opt in zip(models, opts):
        step(m, opt)
    for a, b, c in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b) and torch.equal(a, c)
