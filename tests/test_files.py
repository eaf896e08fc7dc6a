"""seqkd/files.py: an interrupted write leaves the previous file whole and no ``.partial`` behind."""

import json
import os

import pytest

from seqkd.files import save_figure_atomically, write_json_atomically, write_text_atomically


def test_a_failed_text_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = str(tmp_path / "results.md")
    write_text_atomically(path, "first\n")
    with pytest.raises(UnicodeEncodeError):  # fails inside the write, after the partial file was opened
        write_text_atomically(path, "second \ud800\n")
    assert open(path, encoding="utf-8").read() == "first\n"
    assert os.listdir(tmp_path) == ["results.md"]


def test_json_that_cannot_be_serialised_is_refused_before_anything_is_written(tmp_path):
    path = str(tmp_path / "rows.json")
    write_json_atomically(path, [{"run": "a", "bleu": 1.5}])
    with pytest.raises(TypeError):
        write_json_atomically(path, [{"run": "b", "bleu": object()}])
    assert json.load(open(path)) == [{"run": "a", "bleu": 1.5}]
    assert os.listdir(tmp_path) == ["rows.json"]


def test_a_figure_is_saved_as_png_under_its_final_name_only(tmp_path):
    # matplotlib refuses bad options before it opens a file, so no figure fails half-written here; the removal of a
    # failed write's partial file is the text writer's, tested above through the same path.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    path = str(tmp_path / "bleu.png")
    save_figure_atomically(fig, path, dpi=50)
    with pytest.raises(TypeError):
        save_figure_atomically(fig, str(tmp_path / "other.png"), no_such_option=1)
    plt.close(fig)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["bleu.png"]
