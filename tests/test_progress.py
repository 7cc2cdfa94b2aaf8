"""Progress display: live tqdm bars on a terminal, plain periodic lines (no carriage returns) in a log."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tqdm import tqdm

from moco_transfer import progress as progress_module
from moco_transfer.progress import PlainProgress, progress, set_log_every


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_appear_at_the_interval_without_carriage_returns():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(range(10), desc="epoch 3/200", file=out, log_every=30, clock=clock)
    for _ in bar:
        clock.now += 10  # each item takes 10 s: a line after items 3, 6, 9 and the final state at the end
        bar.set_postfix(loss=f"{6.5:.4f}", lr=0.03, refresh=False)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [re.match(r"epoch 3/200: (\d+)/10 ", line).group(1) for line in lines] == ["3", "6", "9", "10"]
    assert lines[0] == "epoch 3/200: 3/10 (30%) 00:30<01:10, 0.10 it/s, loss=6.5000, lr=0.03"
    assert lines[-1].startswith("epoch 3/200: 10/10 (100%) 01:40<00:00")


def test_plain_writer_leave_false_and_zero_interval_print_nothing_extra():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=4, desc="inner", file=out, log_every=5, leave=False, clock=clock)
    for _ in range(4):
        clock.now += 2
        bar.update()
    bar.close()
    assert out.getvalue().splitlines() == ["inner: 3/4 (75%) 00:06<00:02, 0.50 it/s"]  # no line on close
    silent = io.StringIO()
    bar = PlainProgress(range(3), file=silent, log_every=0, clock=clock)
    for _ in bar:
        clock.now += 100
    assert silent.getvalue() == ""


def test_plain_writer_does_not_repeat_the_last_line_on_close_and_leaves_quietly_on_break():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(range(2), desc="x", file=out, log_every=1, clock=clock)
    for _ in bar:
        clock.now += 1
    assert len(out.getvalue().splitlines()) == 2  # items 1 and 2; close adds nothing new
    bar.close()
    assert len(out.getvalue().splitlines()) == 2
    out2 = io.StringIO()
    for _ in PlainProgress(range(5), desc="y", file=out2, log_every=100, clock=clock):
        break
    assert out2.getvalue() == ""


def test_setting_n_and_refreshing_prints_on_the_interval():
    """The tqdm idiom of a bar fed from elsewhere (eval voc polls its trials): `bar.n = done; bar.refresh()`."""
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=100, desc="VOC trials", file=out, log_every=30, clock=clock)
    for done in (10, 20, 30, 40):
        clock.now += 20
        bar.n = done
        bar.refresh()
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["VOC trials: 20/100", "VOC trials: 40/100"]


def test_progress_picks_plain_lines_for_files_and_tqdm_for_terminals(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        bar = progress(total=3, desc="file", file=log, log_every=0.0)
        assert isinstance(bar, PlainProgress)
        bar.close()
    assert isinstance(progress(range(2), disable=True), tqdm)  # other ranks: tqdm's no-op bar

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as terminal:
            bar = progress(range(3), desc="tty", file=terminal, mininterval=0)
            assert isinstance(bar, tqdm)
            for _ in bar:
                pass  # the loop's end closes the bar: its last frame, then a newline (leave=True)
            terminal.flush()
            drawn = read_until(master, lambda text: re.search(r"3/3[^\n]*\n", text) is not None)
    finally:
        os.close(master)
    assert "\r" in drawn and "tty" in drawn and "3/3" in drawn, repr(drawn)  # the live bar, redrawn in place


def read_until(fd: int, done: Callable[[str], bool], timeout: float = 10.0) -> str:
    """Everything readable from `fd` until `done(text)` holds or `timeout` seconds pass (then what came)."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other end is closed and nothing is left
            break
        if not chunk:
            break
        text += chunk.decode(errors="replace")
    return text


def test_default_interval_comes_from_set_log_every():
    try:
        set_log_every(7.5)
        assert PlainProgress(total=1, file=io.StringIO()).log_every == 7.5
        assert PlainProgress(total=1, file=io.StringIO(), log_every=2).log_every == 2
        with pytest.raises(ValueError, match="--log-every -1"):
            set_log_every(-1)
    finally:
        set_log_every(progress_module.DEFAULT_LOG_EVERY)


def test_every_progress_bar_goes_through_the_progress_module():
    """A direct tqdm bar would bring back carriage-return logs; only moco_transfer/progress.py may import tqdm."""
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("moco_transfer", "pretrain", "eval")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    offenders += ["cli.py"] if re.search(r"^\s*(from tqdm|import tqdm)", (root / "cli.py").read_text(), re.M) else []
    assert offenders == []


def test_commands_take_log_every():
    from click.testing import CliRunner

    from moco_transfer.cli import main

    runner = CliRunner()
    for command in (["pretrain"], ["eval", "linear"], ["eval", "knn"], ["eval", "voc"]):
        assert "--log-every" in runner.invoke(main, [*command, "--help"]).output
    bad = runner.invoke(main, ["eval", "knn", "missing.pth", "--log-every", "-1"])
    assert bad.exit_code == 2 and "--log-every" in bad.output
    try:
        runner.invoke(main, ["eval", "knn", "missing.pth", "--log-every", "12"])  # fails later: no such file
        assert progress_module.get_log_every() == 12.0
    finally:
        set_log_every(progress_module.DEFAULT_LOG_EVERY)
    assert "--data-pipeline [auto|cpu|gpu]" in runner.invoke(main, ["pretrain", "--help"]).output
