"""Finished benchmark runs kept without checkpoints, and read back from them.

`benchmarks.results` writes `results_done.json` for a finished seed and reads
a seed with one back without training; `benchmarks.archive` copies finished
runs without their checkpoints. Together they let a table whose seeds take
longer than one session be continued on a fresh machine. Each test runs the
real harness on `configs/pseudo_label_digits.py:runlocal` (6 steps).

Break checks (each made the named test fail, then was restored):
  - `run_seed` ignoring an existing done file (always training):
    test_an_archived_seed_is_read_back_and_a_missing_one_trained.
  - `run_seed` not comparing the saved config:
    test_a_done_file_of_another_config_is_refused.
  - `archive.copy` without the ignore patterns (checkpoints copied):
    test_an_archived_seed_is_read_back_and_a_missing_one_trained.
  - `archive.copy` skipping the done-file comparison:
    test_archive_copies_only_finished_runs_and_refuses_a_different_one.
"""

import json
import os

import pytest

from benchmarks import archive
from benchmarks import compare
from benchmarks import results
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error

CONFIG = "configs/pseudo_label_digits.py:runlocal"
EVAL = ["--override", "eval_every_steps=2"]


def _argv(root, seeds):
  return ["--config", CONFIG, "--seeds", *map(str, seeds), "--root",
          str(root), *EVAL, "--name", "archive_test"]


def _table(text):
  return text[text.index("| stage"):]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("results") / "root"
  text = results.main(_argv(root, [0, 1]))
  return dict(root=str(root), text=text)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def test_an_archived_seed_is_read_back_and_a_missing_one_trained(
    finished, tmp_path, monkeypatch):
  root = finished["root"]
  for seed in (0, 1):
    with open(os.path.join(root, str(seed), results.DONE_FILE)) as f:
      done = json.load(f)
    assert done["config"]["seed"] == seed and done["wall_s"] > 0
  assert any("checkpoints" in p for p in _files(root))
  kept = tmp_path / "kept"
  assert archive.main([root, str(kept)]) == ["0", "1"]
  files = _files(kept)
  assert not any("checkpoint" in p for p in files), files
  assert {"0/results_done.json", "0/eval_history.jsonl", "0/split.json",
          "1/results_done.json"} <= set(files)

  calls = []
  real = train.train_and_evaluate

  def counting(config, workdir):
    calls.append(config.seed)
    return real(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", counting)
  # The archive alone (no checkpoints) gives the same table, training nothing.
  text = results.main(_argv(kept, [0, 1]))
  assert calls == []
  assert _table(text) == _table(finished["text"])
  # A seed the archive lacks is trained, the others are read back.
  text = results.main(_argv(kept, [0, 1, 2]))
  assert calls == [2]
  assert "3 seeds (0, 1, 2)" in text
  assert os.path.exists(kept / "2" / results.DONE_FILE)


def test_a_done_file_of_another_config_is_refused(finished):
  argv = _argv(finished["root"], [0]) + ["--override", "total_steps=7"]
  with pytest.raises(R2D2Error, match="another config.*total_steps"):
    results.main(argv)


def test_archive_copies_only_finished_runs_and_refuses_a_different_one(
    finished, tmp_path):
  src = tmp_path / "src"
  dst = tmp_path / "dst"
  archive.copy(finished["root"], str(src))
  os.makedirs(src / "7")
  (src / "7" / "config.json").write_text("{}")  # started, never finished
  logged = []
  assert archive.copy(str(src), str(dst), log=logged.append) == ["0", "1"]
  assert not (dst / "7").exists()
  assert any("not finished" in line and line.endswith("7") for line in logged)
  # Copying again keeps what is there; a different run under the name fails.
  assert archive.copy(str(src), str(dst), log=logged.append) == []
  done = dst / "1" / results.DONE_FILE
  record = json.loads(done.read_text())
  record["wall_s"] += 1
  done.write_text(json.dumps(record))
  with pytest.raises(R2D2Error, match="another run"):
    archive.copy(str(src), str(dst))
  with pytest.raises(R2D2Error, match="no finished run"):
    archive.copy(str(src / "7"), str(tmp_path / "x"))


def test_an_archived_comparison_is_read_back(tmp_path, capsys):
  root, kept = tmp_path / "root", tmp_path / "kept"
  argv = ["--setting", "digits", "--methods", "supervised", "--steps", "4",
          "--evals", "2", "--min-last-evals", "2", "--seeds", "0"]
  text = compare.main(argv + ["--root", str(root)])
  assert archive.main([str(root), str(kept)]) == ["supervised/0"]
  assert not any("checkpoint" in p for p in _files(kept))
  capsys.readouterr()
  again = compare.main(argv + ["--root", str(kept)])
  assert "read back" in capsys.readouterr().out
  table = lambda t: t[t.index("| method"):]
  assert table(again) == table(text)
