"""The one command-line mechanism of the verbs outside LightningCLI (``parcae.command_line``): flags and help come
from each verb's typed, documented function; every verb takes ``--config FILE`` and ``--print_config``; the depth
options are one dataclass (``parcae.inference.options.DepthOptions``) shared by generate, perplexity and predict;
every mistake on the command line is one ``parcae <verb>: error: ...`` line."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from parcae.cli import PREPARE_STEPS, VERBS, main, verb_function
from parcae.command_line import verb_parser
from parcae.inference.options import DepthOptions

ROOT = Path(__file__).resolve().parent.parent
TYPED_VERBS = [v for v in VERBS if v != "prepare"]  # prepare's steps are below (PREPARE_STEPS)
DEPTH_FLAGS = {f"--{f.name}" for f in dataclasses.fields(DepthOptions)}


def flags(verb: str) -> set[str]:
    return {s for a in verb_parser(verb, verb_function(verb))._actions for s in a.option_strings}


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return str(info.value.code)


@pytest.mark.parametrize("verb", TYPED_VERBS)
def test_every_verb_takes_a_config_file_and_prints_its_config(verb):
    assert {"--config", "--print_config", "--help"} <= flags(verb)


@pytest.mark.parametrize("step", PREPARE_STEPS)
def test_every_prepare_step_takes_a_config_file_and_prints_its_config(step):
    module, function = PREPARE_STEPS[step].split(":")
    parser = verb_parser(f"prepare {step}", getattr(importlib.import_module(module), function))
    assert {"--config", "--print_config", "--help"} <= {s for a in parser._actions for s in a.option_strings}


def test_prepare_reads_a_list_flag_from_the_command_line_and_from_a_config_file(tmp_path, capsys):
    """`--input a b` (several values, as the documented shards command has it) and the same list in --config."""
    with pytest.raises(SystemExit):
        main(["prepare", "shards", "--input", "a.jsonl", "b.parquet", "--vocab_size", "300", "--output", "out",
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["input"] == ["a.jsonl", "b.parquet"] and printed["vocab_size"] == 300
    config = tmp_path / "shards.yaml"
    config.write_text(yaml.safe_dump({**printed, "input": [str(tmp_path / "missing.jsonl")]}))
    message = error_of(["prepare", "shards", "--config", str(config)])
    assert message == f"parcae prepare: error: {tmp_path / 'missing.jsonl'}: no such file or folder"
    assert error_of(["prepare", "shards", "--input", "a", "--output", "o"]) == \
        "parcae prepare: error: give either --tokenizer or --vocab_size (to train one)"


def test_print_config_then_config_file_round_trip(tmp_path, capsys):
    """--print_config writes the YAML that --config reads back: the same call either way."""
    with pytest.raises(SystemExit) as info:
        main(["scaling-law", "runs.csv", "--out", "somewhere", "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {"table": "runs.csv", "sweep": None, "runs_dir": "checkpoints", "out": "somewhere"}
    table = tmp_path / "runs.csv"
    table.write_text("flops,mean_recurrence,tokens,loss,N\n")
    config = tmp_path / "law.yaml"
    config.write_text(yaml.safe_dump({**printed, "table": str(table)}))
    # the file's values reach the function: the (empty) table is read and refused by the verb itself
    message = error_of(["scaling-law", "--config", str(config)])
    assert message.startswith("parcae scaling-law: error: ") and "\n" not in message


def test_a_config_file_sets_switches(tmp_path, capsys):
    config = tmp_path / "report.yaml"
    config.write_text("list: true\n")
    main(["report", "--config", str(config)])
    listed = capsys.readouterr().out
    assert "table5" in listed and "mini" in listed


def test_help_comes_from_signatures_and_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help is wrapped to the terminal
    assert "Generate text with the KV-cached engine" in text  # the function's docstring
    assert "nucleus sampling mass" in text  # a parameter's docstring line
    assert "latent-diff (auto 0.03)" in text  # DepthOptions' own docstring, shown under generate


def test_depth_flags_are_one_dataclass_shared_by_the_decoding_verbs():
    assert DEPTH_FLAGS == {"--loops", "--exit", "--min_loops", "--max_loops", "--exit_every", "--kv_policy",
                           "--continuous"}
    assert DEPTH_FLAGS <= flags("generate")
    assert DEPTH_FLAGS <= flags("perplexity")  # its --loops is its own (a list of counts), the rest DepthOptions


def test_predict_takes_the_same_depth_flags(capsys):
    """parcae predict is LightningCLI's; its depth flags are DepthOptions' fields too, under the same names."""
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    shown = set(re.findall(r"(?<![\w-])--\w+", capsys.readouterr().out))
    assert DEPTH_FLAGS <= shown and not any(flag.startswith("--depth") for flag in shown)


@pytest.mark.parametrize("argv, says", [
    (["generate", "--ckpt_path", "x.ckpt", "--prompt", "a", "--max_new_tokens", "many"],
     "--max_new_tokens: 'many' is not int"),
    (["generate", "--ckpt_path", "x.ckpt", "--prompt", "a", "--no_such_flag", "1"], "unrecognized arguments"),
    (["generate", "--prompt", "a"], "--ckpt_path is required"),
    (["generate", "--ckpt_path", "x.ckpt"], "give --prompt TEXT or --prompts FILE.jsonl"),
    (["perplexity", "--ckpt_path", "x.ckpt", "--text", "t.txt", "--window", "1.5"], "--window"),
    (["export", "--format", "onnx", "run", "out"], "--format: 'onnx' is not one of 'official'"),
    (["export", "run"], "out is required"),
    (["model", "no-such-preset", "--meta"], "unknown model preset 'no-such-preset'"),
    (["report", "no-such-table"], "unknown table 'no-such-table'"),
    (["mini", "stability", "--config", "no/such/file.yaml"], "--config"),
    (["prepare", "no-such-step"], "unknown step 'no-such-step'"),
])
def test_command_line_mistakes_are_one_line(argv, says):
    message = error_of(argv)
    assert message.startswith(f"parcae {argv[0]}: error: "), message
    assert "\n" not in message and says in message, message


def test_switches_take_no_value_or_an_explicit_one(capsys):
    for argv, meta in ((["--meta"], True), (["--meta", "false"], False), (["--no_meta"], False), ([], False)):
        parsed = verb_parser("model", verb_function("model")).parse_args(["parcae-debug", *argv])
        assert parsed.meta is meta


def test_no_verb_writes_its_own_error_line():
    """One path prints user errors (parcae.command_line.exit_with_error); the verbs raise UsageError."""
    hand_written = []
    for path in (ROOT / "parcae").rglob("*.py"):
        if path == ROOT / "parcae" / "command_line.py":  # exit_with_error itself
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(sys\.exit|SystemExit)\(f?[\"']parcae", line):
                hand_written.append(f"{path.relative_to(ROOT)}:{n}")
    assert not hand_written, hand_written


@pytest.mark.parametrize("content, says", [("", "is empty"), ("# only a comment\n", "is empty"),
                                           ("- 1\n- 2\n", "holds a list, not options"),
                                           ("hello\n", "holds a str, not options")])
def test_a_config_that_is_not_options_is_one_clear_line(tmp_path, content, says):
    """Issue 26: `parcae generate --config empty.yaml` said "Unexpected config:" and nothing after it."""
    config = tmp_path / "c.yaml"
    config.write_text(content)
    for verb in ("generate", "model"):
        message = error_of([verb, "--config", str(config)])
        assert message == (f"parcae {verb}: error: --config {config} {says}: write them as `name: value`, one a line"
                           if "not options" in says else
                           f"parcae {verb}: error: --config {config} is empty: write the options as `name: value`, "
                           "one a line"), message


def test_help_and_an_unknown_command_need_neither_torch_nor_lightning():
    """`parcae --help` prints every command (the Lightning verbs too) from the table alone, in a fresh interpreter
    that never imports torch or Lightning; an unknown command is one line."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom parcae.cli import main\nmain(['--help'])\n"
            "print('loaded:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'litdata'}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^  (\S+) ", out.stdout, flags=re.M))
    assert {"fit", "validate", "test", "predict", *VERBS} <= listed
    assert "parcae fit --help" in out.stdout and out.stdout.strip().endswith("loaded: []")
    assert error_of(["no-such-verb"]) == "parcae no-such-verb: error: no such command (`parcae --help` lists them)"
