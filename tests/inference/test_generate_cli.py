"""`parcae generate` end to end on a tiny checkpoint in a run directory: streaming, prompt files, depth report and
one-line errors for bad input."""

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from conftest import SHAKESPEARE_TOKENIZER, perturb_weights
from parcae.cli import main
from parcae.data import load_tokenizer
from parcae.model import LoopedLM, ModelConfig


def make_run(root, name, block_size=48, **arch):
    """A run directory as `parcae fit` leaves it: <run>/last.ckpt (Lightning layout) + config.yaml + data folder."""
    data = root / "data"
    data.mkdir(exist_ok=True)
    shutil.copy(SHAKESPEARE_TOKENIZER, data / "tokenizer.json")
    cfg = ModelConfig(name=name, vocab_size=load_tokenizer(str(SHAKESPEARE_TOKENIZER)).get_vocab_size(),
                      block_size=block_size, d_model=32, n_heads=2, d_ff=64, n_prelude=1, n_recurrent=1, n_coda=1,
                      mean_recurrence=3, backprop_depth=2, **arch)
    torch.manual_seed(0)
    model = perturb_weights(LoopedLM(cfg))
    run = root / name
    run.mkdir()
    torch.save({"hyper_parameters": {"arch": dataclasses.asdict(cfg)},
                "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, run / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"datasets": [str(data)]}}))
    return run / "last.ckpt", model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return {"parcae": make_run(root, "parcae"), "gpt": make_run(root, "gpt", injection="none")}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_streams_the_greedy_continuation_of_the_full_forward(runs, capsys):
    ckpt, model = runs["parcae"]
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--loops", "2", "--max_new_tokens", "6",
          "--temperature", "0", "--show_depth"])
    captured = capsys.readouterr()
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    ids = [tok.token_to_id("<|bos|>"), *tok.encode("ROMEO:", add_special_tokens=False).ids]
    n_prompt = len(ids)
    with torch.no_grad():  # greedy by the uncached model, one full forward per token
        for _ in range(6):
            logits = model(torch.tensor([ids]), loops=2).logits[0, -1, : model.config.vocab_size]
            ids.append(int(logits.argmax()))
            if ids[-1] == tok.token_to_id("<|eos|>"):
                break
    expected = "ROMEO:" + tok.decode(ids[n_prompt:], skip_special_tokens=True)
    assert captured.out.strip() == expected.strip()
    assert "loops per token: mean 2.00" in captured.err


def test_generate_prompts_file_writes_json_lines_with_depths(runs, tmp_path, capsys):
    ckpt, _ = runs["parcae"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "To be"}\n{"text": ""}\n"KING:"\n')
    out = tmp_path / "out.jsonl"
    main(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--output", str(out), "--exit",
          "latent-diff:0.5", "--max_loops", "6", "--kv_policy", "latest", "--max_new_tokens", "5", "--batch_size", "2",
          "--show_depth"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "", "KING:"]
    assert all(1 <= d <= 6 for r in rows for d in r["loops"]) and all(r["tokens"] == len(r["loops"]) for r in rows)
    err = capsys.readouterr().err
    assert f"written: {out}" in err and "loops per token: mean" in err


@pytest.mark.parametrize("args, message", [
    (["--exit", "cosines"], "unknown exit rule"),
    (["--kv_policy", "half"], "unknown KV policy"),
    (["--exit", "kl:0"], "must be > 0"),
    (["--exit", "kl", "--min_loops", "5", "--max_loops", "2"], "max_loops (2) must be >= min_loops (5)"),
    (["--max_new_tokens", "-1"], "max_new_tokens must be >= 0"),
    (["--max_new_tokens", "40", "--prompt", "word " * 30], "exceeds the model's context of 48"),
])
def test_bad_generate_input_is_one_line(runs, args, message, tmp_path):
    ckpt, _ = runs["parcae"]
    base = ["generate", "--ckpt_path", str(ckpt), "--max_new_tokens", "3"]
    if "--prompt" not in args:
        base += ["--prompt", "hi"]
    with pytest.raises(SystemExit) as info:
        main(base + args)
    assert str(info.value).startswith("parcae generate: error:") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_exit_rule_on_a_fixed_depth_gpt_is_refused(runs, tmp_path):
    ckpt, _ = runs["gpt"]
    out = tmp_path / "never.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a"\n')
    with pytest.raises(SystemExit, match="fixed-depth model"):
        main(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--output", str(out), "--exit", "kl"])
    assert not out.exists()  # nothing half-written


def test_perplexity_exit_reports_loss_and_mean_loops(runs, tmp_path, capsys):
    ckpt, _ = runs["parcae"]
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York.")
    main(["perplexity", "--ckpt_path", str(ckpt), "--text", str(text), "--exit", "latent-diff:0.5", "--max_loops", "4",
          "--kv_policy", "latest", "--window", "16"])
    out = capsys.readouterr().out
    saved = json.loads((ckpt.parent / "perplexity_held_out_exit.json").read_text())["results"][0]
    assert 1 <= saved["mean_loops"] <= 4 and saved["loss"] > 0 and f"mean loops/token {saved['mean_loops']:.2f}" in out
    with pytest.raises(SystemExit, match="unknown exit rule"):
        main(["perplexity", "--ckpt_path", str(ckpt), "--text", str(text), "--exit", "sometimes"])


def test_speculate_with_no_new_tokens_exits_cleanly_and_reports_the_counts(runs, tmp_path, capsys):
    """--speculate with --max_new_tokens 0 used to end in AttributeError (the statistics lived on the engine and
    were set only by a round); they are return values now, reported summed over the prompts."""
    ckpt, _ = runs["parcae"]
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "hi", "--speculate", "2:4", "--max_new_tokens", "0"])
    assert "accepted 0/0 drafts" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"To be"\n"KING:"\n"a"\n')
    main(["generate", "--ckpt_path", str(ckpt), "--prompts", str(prompts), "--speculate", "1:3", "--loops", "3",
          "--max_new_tokens", "6", "--batch_size", "2", "--temperature", "0"])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("[speculate]"))
    accepted, drafted = (int(v) for v in line.split("accepted ")[1].split(" ")[0].split("/"))
    assert 0 <= accepted <= drafted and drafted >= 3 * 6 // 3   # every prompt's rounds counted, not the last batch's


@pytest.mark.parametrize("given", ["file", "run directory"])
def test_generate_opens_the_checkpoint_once_memory_mapped(runs, given, monkeypatch, capsys):
    """A one-token generate reads the checkpoint file once, through one memory-mapped torch.load (no separate
    opening to check its header or its zip directory first), whether given the file or its run directory."""
    import builtins

    ckpt, _ = runs["parcae"]
    loads, opens = [], []
    real_load, real_open = torch.load, builtins.open

    def counting_load(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("mmap")))
        return real_load(f, *args, **kwargs)

    def counting_open(file, *args, **kwargs):
        if str(file) == str(ckpt):
            opens.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(builtins, "open", counting_open)
    main(["generate", "--ckpt_path", str(ckpt if given == "file" else ckpt.parent), "--prompt", "ROMEO:",
          "--max_new_tokens", "1", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert loads == [(str(ckpt), True)]
    assert opens == [str(ckpt)]  # torch.load's own; the memory map itself is not an open() call
