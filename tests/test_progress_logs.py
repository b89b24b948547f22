"""Issue 17: a run whose output goes to a file (nohup, SLURM, CI) shows plain progress lines, and its
tables are whole."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import save_tiny_classifier

from prune_attattr.progress import LOG_WIDTH, LineSchedule, _plain, console, is_log, progress_line

ROOT = Path(__file__).parent.parent
LINE = re.compile(r"^(?P<desc>.+): (?P<n>\d+)/(?P<total>\d+) \(\d+%\), [\d.]+ (it/s|s/it), elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d$", re.M)


def test_progress_line_format():
    assert progress_line("fine-tune epoch 1/3", 120, 500, 37.4) == "fine-tune epoch 1/3: 120/500 (24%), 3.21 it/s, elapsed 0:00:37, eta 0:01:58"
    assert progress_line("recovery", 3, 10, 12.0) == "recovery: 3/10 (30%), 4.00 s/it, elapsed 0:00:12, eta 0:00:28"
    assert progress_line("x", 7, None, 3600.0) == "x: 7 done, 514.29 s/it, elapsed 1:00:00"


def _due(total, seconds_per_item, items):
    s = LineSchedule(total, 0.0)
    return [n for n in range(1, items + 1) if s.due(n, n * seconds_per_item)], s


def test_line_every_ten_percent_or_thirty_seconds():
    fast, s = _due(100, 1.0, 100)  # 10% every 10 s: the 10% marks come first
    assert fast == list(range(10, 101, 10)) and not s.last(100)
    slow, s = _due(1000, 1.0, 230)  # 10% every 100 s: a line every 30 s, and at the 10% marks
    assert slow == [30, 60, 90, 100, 130, 160, 190, 200, 230]
    unknown, s = _due(None, 7.0, 20)  # no total: time only
    assert unknown == [5, 10, 15, 20] and not s.last(20)
    assert s.last(21)  # the final position still needs its line
    assert _due(5, 0.0, 5)[0] == [1, 2, 3, 4, 5]  # short loops: every item crosses a 10% mark


def test_plain_progress_writes_the_last_line_once():
    ticks = iter(range(0, 1000, 4))  # the clock advances 4 s per call
    lines = []
    assert list(_plain(range(23), "dev", 23, lines.append, clock=lambda: float(next(ticks)))) == list(range(23))
    positions = [int(LINE.match(x)["n"]) for x in lines]
    assert positions[-1] == 23 and positions.count(23) == 1 and positions == sorted(positions)
    assert len(lines) <= 11  # at most one per 10% (here the 30 s rule never fires first) plus the last
    lines.clear()
    assert list(_plain([], "empty", 0, lines.append)) == [] and lines == []


def test_console_is_wide_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert is_log() and console().width == LOG_WIDTH  # pytest's captured stdout is no terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's switch for "this is a terminal"
    monkeypatch.setenv("COLUMNS", "100")
    assert not is_log() and console().width == 100  # a terminal's own width again


def test_cli_with_stdout_in_a_file_prints_progress_lines_and_whole_tables(tmp_path):
    """A real run (fine-tuning, importance, curves, recovery, evaluation) with stdout and stderr redirected to
    a file, as under nohup or SLURM: plain n/total lines for every long loop, intermediate positions
    included, and no table cut to 80 columns (the recovery table is about 100 wide)."""
    save_tiny_classifier("bert", tmp_path / "m", id2label={0: "neg", 1: "pos"})
    words = "good bad great dull fun boring best worst".split()
    for name, n in (("train", 72), ("dev", 40)):
        rows = "".join(f"the {words[i % 8]} film {i},{'neg' if i % 8 % 2 else 'pos'}\n" for i in range(n))
        (tmp_path / f"{name}.csv").write_text("text,label\n" + rows)
    (tmp_path / "r.yaml").write_text(
        f"run_name: log\noutput_dir: {tmp_path / 'out'}\nmodel: {{path: {tmp_path / 'm'}, max_length: 16}}\n"
        "data: {task: custom, train_file: train.csv, dev_file: dev.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
        f"finetune: {{enabled: true, train_examples: 40, batch_size: 8, cache_dir: {tmp_path / 'cache'}}}\n"
        "importance: {methods: [attention, random], examples: 16, source: train_heldout, batch_size: 4}\n"
        "pruning: {step_fraction: 0.5, eval_batch_size: 16}\n"
        "export: {method: attention, heads: 6, onnx: false}\n"
        "recovery: {enabled: true, train_examples: 32, batch_size: 8}\n"
        "runtime: {cpu: true, threads: 1}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "prune_attattr.cli", "r.yaml"], cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    found = {}
    for m in LINE.finditer(text):
        found.setdefault(m["desc"], []).append((int(m["n"]), int(m["total"])))
    for desc in ("fine-tune epoch 1/1", "dev", "attention-score importance", "teacher logits", "recovery epoch 1/1"):
        assert desc in found, (desc, sorted(found))
        assert found[desc][-1][0] == found[desc][-1][1]  # the last line is the whole loop
    assert found["fine-tune epoch 1/1"][:2] == [(1, 5), (2, 5)]  # written while the loop runs, not only at its end
    assert "…" not in text, [x for x in text.splitlines() if "…" in x]
    header = next(x for x in text.splitlines() if "attn MFLOP/tok" in x)
    assert "total MFLOP/tok" in header and "ONNX ms" in header and "before" in header and "min" in header
    assert "(exported)" in text
