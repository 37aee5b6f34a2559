"""`nmtkit plot`: a trained run's curves become a valid PNG; a run without metrics, a broken metrics line, or a
missing matplotlib give one clear message (exit 2, no traceback)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from nmtkit.cli import main
from nmtkit.plot import PlotError, plot_training_curves, read_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_curves_png_into_the_run_directory(trained_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", run / "metrics.jsonl")
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip() == str(png)


def test_plot_out_writes_where_asked(trained_run: Path, tmp_path: Path) -> None:
    out = plot_training_curves(trained_run, tmp_path / "figs" / "tiny.png")
    assert out == tmp_path / "figs" / "tiny.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_a_figure_that_cannot_be_written_exits_2_naming_the_file_and_out(trained_run: Path, tmp_path: Path, capsys) -> None:
    """A read-only run directory, say: no traceback, and the flag that writes the figure elsewhere."""
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    out = tmp_path / "a-file" / "curves.png"
    assert main(["plot", str(trained_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"nmtkit plot: error: could not write {out}" in err and "write the figure elsewhere with --out" in err and "Traceback" not in err


def test_curves_hold_every_train_and_valid_record(trained_run: Path) -> None:
    curves = read_training_curves(trained_run)
    assert curves.train_steps == [3, 6, 9, 12] and curves.valid_steps == [6, 12]  # log_every 3, eval_every 6
    assert len(curves.lr) == len(curves.train_loss) == 4
    assert curves.train_tokens == sorted(curves.train_tokens) and curves.train_tokens[0] > 0


def test_run_without_metrics_exits_2_naming_the_file(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "metrics.jsonl") in err and "not found" in err and "Traceback" not in err


def test_broken_metrics_line_is_named_with_its_line_number(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 3, "train_loss": 7.0, "lr": 0.001}\n{"step": 6, "train_lo\n', encoding="utf-8"
    )
    with pytest.raises(PlotError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_training_curves(tmp_path)


def test_missing_matplotlib_names_the_install_command(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["plot", str(trained_run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_curves_of_a_resumed_run_keep_the_retrained_steps_once(tmp_path: Path) -> None:
    """A run killed at step 30 logged steps 10-30; resumed from its step-10 checkpoint, it marked the resume and
    trained 20-40 again. The curves hold each step once, from the resumed run, and nothing of the abandoned steps."""
    import json

    records = [{"step": s, "train_loss": 5.0, "lr": 1e-3} for s in (10, 20, 30)] + [{"step": 10, "valid_loss": 4.0}]
    records += [{"step": 20, "valid_loss": 9.0}, {"step": 10, "resumed": True}]
    records += [{"step": s, "train_loss": 3.0, "lr": 1e-3} for s in (20, 30, 40)] + [{"step": 40, "valid_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    curves = read_training_curves(tmp_path)
    assert curves.train_steps == [10, 20, 30, 40] and curves.train_loss == [5.0, 3.0, 3.0, 3.0]
    assert curves.valid_steps == [10, 40] and curves.valid_loss == [4.0, 2.0]


def test_resumed_training_marks_its_step_in_the_metrics(trained_run: Path, corpus: dict, tmp_path: Path) -> None:
    import json

    from conftest import tiny_config
    from nmtkit.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("cache"))
    train(tiny_config(corpus, run, train={"max_steps": 14}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"step": 12, "resumed": True} in records


def test_an_out_name_of_no_image_format_is_refused_and_one_without_a_suffix_is_a_png_under_that_name(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(PlotError, match=r"--out .*curves\.txt: '\.txt' is not an image format matplotlib writes; .*\(e\.g\. curves\.png\)"):
        plot_training_curves(trained_run, tmp_path / "curves.txt")
    written = plot_training_curves(trained_run, tmp_path / "curves")
    assert written == tmp_path / "curves" and written.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("line", ["[1, 2]", '{"train_loss": 1.0}'])
def test_a_metrics_line_that_is_no_record_is_named_with_its_line_number(tmp_path: Path, line: str) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0, "lr": 0.1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PlotError, match=r"metrics\.jsonl:2: not a metrics record"):
        read_training_curves(tmp_path)

