"""Result files are written whole or not at all (parcae.runs.storage)."""

import pytest


def test_a_result_file_is_complete_or_the_previous_one(tmp_path):
    from parcae.runs import write_text_atomically

    out = tmp_path / "perplexity_x.json"
    out.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):  # the write fails half-way (an unencodable character at the end)
        write_text_atomically(out, "new " * 1000 + "\ud800")
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging left
    write_text_atomically(out, "new\n")
    assert out.read_text() == "new\n"


def test_an_interrupt_during_a_checkpoint_write_is_an_interrupt_not_a_storage_fault(tmp_path, monkeypatch):
    """torch.save turns an exception raised by its file writes into RuntimeError("... unexpected pos ..."), which
    looks like a full disk; a Ctrl-C landing there must still end the command as an interrupt (status 130), and
    the previous checkpoint must survive with no staging file left."""
    import io
    import signal

    import torch

    from parcae.command_line import Interrupted
    from parcae.runs import storage

    target = tmp_path / "last.ckpt"
    storage.save_atomically({"step": 1}, target)
    before = target.read_bytes()

    class InterruptedMidWrite(io.FileIO):
        writes = 0

        def write(self, data):
            InterruptedMidWrite.writes += 1
            if InterruptedMidWrite.writes == 3:  # as if SIGINT's handler ran here
                raise Interrupted(signal.SIGINT)
            return super().write(data)

    monkeypatch.setattr(storage, "open", lambda path, mode: InterruptedMidWrite(path, mode.replace("b", "")),
                        raising=False)
    with pytest.raises(Interrupted):
        storage.save_atomically({"step": 2, "weights": torch.zeros(10_000)}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [target.name]
