"""``parcae export --format hf`` against parcae itself: the folder loads with transformers' Auto classes (with and
without parcae installed), its logits equal parcae's forward at T ∈ {1, μ_rec, 2·μ_rec}, greedy ``generate`` equals
parcae's engine token for token, and a left-padded batch equals each prompt alone."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import parcae  # noqa: E402
import parcae.hf  # noqa: E402,F401  (registers the Auto classes)
from hf_runs import ARCHS, export, make_run  # noqa: E402
from parcae.data.tokenizer import encode_prompt  # noqa: E402
from parcae.hf import ParcaeForCausalLM  # noqa: E402
from parcae.hf.modeling_parcae import REMOTE_CODE  # noqa: E402
from parcae.inference import Engine  # noqa: E402
from parcae.runs import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["The fox", "A", "Once upon a time there"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{arch: (run directory, exported folder)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, arch) in enumerate(ARCHS.items()):
        run = make_run(root, name, seed=i, **arch)
        out[name] = (run, export(run, root / f"{name}-hf"))
    return out


def _parcae(run):
    loaded = load_checkpoint(run / "last.ckpt")
    return loaded.model, loaded.tokenizer


def test_the_folder_holds_config_weights_code_tokenizer_and_generation_config(folders):
    run, folder = folders["parcae"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_parcae.py", "modeling_parcae.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "parcae" and config["architectures"] == ["ParcaeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parcae.ParcaeForCausalLM"
    assert config["num_loops"] == 3  # μ_rec by default
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)
    package = Path(parcae.__file__).parent
    assert {"configuration_parcae.py", "modeling_parcae.py", "looped.py", "layers.py", "config.py"} <= set(REMOTE_CODE)
    for name, source in REMOTE_CODE.items():  # verbatim copies of the package's own files: one model source
        assert (folder / name).read_text() == (package / source).read_text(), name
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(REMOTE_CODE)


def _imports(tree):
    """(relative module names, absolute top-level packages) imported outside try blocks (transformers' own rule
    for what remote code requires: a try block is an optional import)."""
    relative, absolute = set(), set()

    def visit(node):
        if isinstance(node, ast.Try):
            for handler_free in node.body:  # the try body is what runs in an exported folder
                visit(handler_free)
            return
        if isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module.split(".")[0] if not node.level else node.module)
        elif isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return relative, absolute


def test_the_remote_code_is_closed_and_needs_only_torch_transformers_and_the_standard_library():
    """Every file trust_remote_code runs imports the others relatively (each one shipped) and, outside the
    in-package fallbacks of try blocks, nothing of parcae: only torch, transformers and the standard library."""
    package = Path(parcae.__file__).parent
    for name, source in REMOTE_CODE.items():
        relative, absolute = _imports(ast.parse((package / source).read_text()))
        assert {f"{m}.py" for m in relative} <= set(REMOTE_CODE), (name, relative)
        assert absolute - set(sys.stdlib_module_names) <= {"torch", "transformers"}, (name, absolute)


def test_the_tokenizer_frames_text_as_parcae_does(folders):
    run, folder = folders["parcae"]
    tok = AutoTokenizer.from_pretrained(folder)
    _, ours = _parcae(run)
    for text in PROMPTS:
        assert tok(text)["input_ids"] == encode_prompt(ours, text)  # <|bos|> first, no <|eos|>
    assert (tok.bos_token, tok.eos_token) == ("<|bos|>", "<|eos|>") and tok.pad_token is not None
    assert tok.decode(tok("The fox")["input_ids"], skip_special_tokens=True) == "The fox"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_equal_parcae_forward_at_1_mu_and_2mu_loops(folders, arch):
    run, folder = folders[arch]
    ours, _ = _parcae(run)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, ParcaeForCausalLM) and not model.training
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    mu = ours.config.mean_recurrence
    depths = [1, mu, 2 * mu] if ours.config.looped else [None]
    with torch.no_grad():
        for loops in depths:
            # every row is sequence 0 for the initial state, in parcae's eval forward as in the HF model
            expected = ours(ids, **({"loops": loops} if loops else {})).logits[..., :512]
            got = model(ids, num_loops=loops, use_cache=False).logits
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if ours.config.looped:  # the default loop count is config.num_loops (= μ_rec)
        torch.testing.assert_close(model(ids).logits, ours(ids).logits[..., :512], rtol=0, atol=1e-5)


def _hf_generate(model, tok, prompts, new, **kwargs):
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, **kwargs)[:, enc["input_ids"].shape[1]:]
    rows = []
    for row in out.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("arch", ["parcae", "rdm", "gpt"])
def test_greedy_generate_equals_parcae_generate_alone_and_in_a_left_padded_batch(folders, arch):
    run, folder = folders[arch]
    ours, ours_tok = _parcae(run)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    loops = 2 * ours.config.mean_recurrence if ours.config.looped else None
    engine = Engine(ours, loops=loops)  # parcae generate's engine (sequence 0, greedy)
    kwargs = {"num_loops": loops} if loops else {}
    eos = ours_tok.token_to_id("<|eos|>")
    for prompt in PROMPTS:
        expected = engine.generate([encode_prompt(ours_tok, prompt)], 12, stop_ids=[eos])[0].tokens
        alone = _hf_generate(model, tok, [prompt], 12, **kwargs)[0]
        assert alone == expected, prompt
    batch = _hf_generate(model, tok, PROMPTS, 12, **kwargs)
    assert batch == [_hf_generate(model, tok, [p], 12, **kwargs)[0] for p in PROMPTS]


def test_greedy_generate_equals_the_parcae_generate_command(folders, capsys):
    from parcae.cli import main

    run, folder = folders["parcae"]
    main(["generate", "--ckpt_path", str(run / "last.ckpt"), "--prompt", "The fox", "--loops", "6",
          "--max_new_tokens", "10", "--temperature", "0"])
    printed = capsys.readouterr().out.strip()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["The fox"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=10, num_loops=6)
    assert printed == tok.decode(out[0], skip_special_tokens=True).strip()


def test_num_loops_is_a_config_field_set_at_export(folders, tmp_path):
    run, _ = folders["parcae"]
    folder = export(run, tmp_path / "deep", "--num_loops", "5")
    assert AutoConfig.from_pretrained(folder).num_loops == 5
    model = AutoModelForCausalLM.from_pretrained(folder)
    ours, _ = _parcae(run)
    ids = torch.tensor([[0, 5, 9, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids, loops=5).logits[..., :512], rtol=0, atol=1e-5)
        assert not torch.allclose(model(ids, num_loops=1).logits, model(ids).logits)


def test_cached_steps_equal_the_full_forward_and_a_cache_keeps_its_loop_count(folders):
    run, folder = folders["parcae"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, num_loops=4).logits
        out = model(ids[:, :5], num_loops=4, use_cache=True)
        cache = out.past_key_values
        assert len(cache.layers) == 1 + 4 * 2 + 1  # prelude, (iteration, recurrent block), coda
        steps = [out.logits]
        for t in range(5, 8):
            out = model(ids[:, t:t + 1], past_key_values=cache, num_loops=4, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="num_loops=4"):
            model(ids[:, :1], past_key_values=cache, num_loops=2, use_cache=True)


def test_the_folder_loads_as_remote_code_without_parcae(folders, tmp_path):
    """A fresh interpreter where ``import parcae`` fails: trust_remote_code gives the same logits."""
    run, folder = folders["parcae"]
    script = f"""
import sys
sys.modules["parcae"] = None  # any import of parcae now raises
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.tensor([tok("The fox jumps")["input_ids"]])
torch.save(model(ids, num_loops=6).logits, {str(tmp_path / "logits.pt")!r})
print(ids.tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    ids = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    ours, _ = _parcae(run)
    got = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        torch.testing.assert_close(got, ours(ids, loops=6).logits[..., :512], rtol=0, atol=1e-5)


def test_rows_equal_parcae_eval_forward_alone_at_batch_1_and_8_in_any_position(folders):
    """One h₀ rule (docs/design.md §1.4): the exported model's row i of a batch of 8 equals that row alone, and both
    equal parcae's plain eval forward of the whole batch (no per-row seeds: every row is sequence 0)."""
    run, folder = folders["parcae"]
    ours, _ = _parcae(run)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 512, (8, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = ours(ids).logits[..., :512]
        batch = model(ids, use_cache=False).logits
        flipped = model(ids.flip(0), use_cache=False).logits.flip(0)
        for i in range(len(ids)):
            alone = model(ids[i:i + 1], use_cache=False).logits[0]
            for got in (batch[i], flipped[i], alone):
                torch.testing.assert_close(got, reference[i], rtol=0, atol=1e-5)


def _padded_vocab_pair():
    """A parcae model with 100 real tokens and 128 embedding rows, and the same weights as ParcaeForCausalLM."""
    from conftest import perturb_weights
    from parcae.interop.hf_folder import hf_config
    from parcae.model import LoopedLM, ModelConfig

    torch.manual_seed(0)
    ours = perturb_weights(LoopedLM(ModelConfig(name="p", vocab_size=100, block_size=32, d_model=64, n_heads=2,
                                                d_ff=128, n_prelude=1, n_recurrent=1, n_coda=1, mean_recurrence=2,
                                                backprop_depth=1)), 0.2).eval()
    hf = ParcaeForCausalLM(hf_config(ours.config)).eval()
    hf.model.load_state_dict(ours.state_dict())
    return ours, hf


def test_hf_loss_is_over_the_real_vocabulary_as_parcae_scores_not_the_padded_training_loss():
    """Stated rule (docs/ecosystem.md): the HF loss (labels=) is the cross-entropy over the tokenizer's vocabulary —
    parcae's scoring rule (parcae.model.loss.token_nll: test, perplexity, CORE, lm-eval) — while parcae's training
    loss is over the padded embedding rows; the two differ when the padded rows carry probability."""
    import torch.nn.functional as F

    from parcae.model import token_nll

    ours, hf = _padded_vocab_pair()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = hf(ids, labels=ids, use_cache=False).loss
        logits = ours(ids[:, :-1]).logits
    real = token_nll(logits, ids[:, 1:], 100).mean()
    padded = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())  # what LoopedLM.forward(labels=) trains
    torch.testing.assert_close(loss, real, rtol=0, atol=1e-5)
    assert abs(loss.item() - padded.item()) > 1e-3


@pytest.mark.parametrize("init", ["scaled-zero", "scaled"])
def test_a_fresh_hf_model_has_parcaes_initialisation(init):
    """``ParcaeForCausalLM(config)`` without weights is initialised by parcae's own init (parcae/model/init.py), as
    ``parcae fit`` starts, not by transformers' normal(0.02): same seed, same tensors."""
    from parcae.interop.hf_folder import hf_config
    from parcae.model import LoopedLM, ModelConfig

    config = ModelConfig(name="p", vocab_size=128, block_size=32, d_model=64, n_heads=2, d_ff=128, n_prelude=1,
                         n_recurrent=1, n_coda=1, mean_recurrence=2, backprop_depth=1, init=init)
    torch.manual_seed(0)
    ours = LoopedLM(config).state_dict()
    torch.manual_seed(0)
    hf = ParcaeForCausalLM(hf_config(config)).model.state_dict()
    assert ours.keys() == hf.keys() and all(torch.equal(ours[k], hf[k]) for k in ours)
    if init == "scaled-zero":
        assert float(hf["prelude.0.attn.out_proj.weight"].abs().max()) == 0.0


def test_auto_model_gives_the_final_normed_hidden_states_of_the_same_model(folders):
    """AutoModel (remote code) loads the same weights (``model.`` + LoopedLM names) and returns the tied head's input."""
    from transformers import AutoModel

    run, folder = folders["parcae"]
    ours, _ = _parcae(run)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
        torch.testing.assert_close(torch.nn.functional.linear(hidden, ours.wte.weight), ours(ids).logits,
                                   rtol=0, atol=1e-5)
