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
