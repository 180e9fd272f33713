"""PEFT on an exported folder: LoRA on the attention and MLP projections of every block (prelude, recurrent, coda)
trains with the loss going down, and the merged model saves to a folder that loads as remote code and that
``parcae import`` turns back into a run whose logits are the merged model's."""

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import parcae.hf  # noqa: E402,F401
from hf_runs import ARCHS, export, make_run  # noqa: E402
from parcae.cli import main  # noqa: E402
from parcae.runs import load_checkpoint  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj", "gate_proj"]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 2


@pytest.mark.parametrize("arch", ["parcae", "rdm"])
def test_lora_trains_on_every_block_and_the_merged_model_exports_back(tmp_path, arch):
    run = make_run(tmp_path, arch, seed=5, **ARCHS[arch])
    folder = export(run, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    cfg = model.config
    wrapped = {name.rsplit(".", 1)[0] for name, _ in lora.named_parameters() if "lora_A" in name}
    per_block = 6 if cfg.mlp == "relu2" else 7  # q, k, v, out + up, down (+ gate for SwiGLU)
    assert len(wrapped) == per_block * cfg.n_layers
    for stage, count in (("prelude", cfg.n_prelude), ("recurrent", cfg.n_recurrent), ("coda", cfg.n_coda)):
        assert sum(f".{stage}." in w for w in wrapped) == per_block * count
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())

    ids = torch.tensor([tok(TEXT)["input_ids"][:48]])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    lora.train()
    losses = []
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    merged = lora.merge_and_unload().eval()
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parcae.ParcaeForCausalLM"
    assert (out / "modeling_parcae.py").is_file() and (out / "configuration_parcae.py").is_file()
    main(["import", str(out), "--runs_dir", str(tmp_path / "runs"), "--run_name", "tuned"])
    tuned = load_checkpoint(tmp_path / "runs" / "tuned" / "last.ckpt").model
    original = load_checkpoint(run / "last.ckpt").model
    with torch.no_grad():
        expected = merged(ids, num_loops=3).logits
        got = tuned(ids, loops=3, state_seed=[0]).logits[..., :cfg.vocab_size]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(original(ids, loops=3, state_seed=[0]).logits[..., :cfg.vocab_size], expected)
