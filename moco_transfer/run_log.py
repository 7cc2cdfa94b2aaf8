"""Figures for TensorBoard and Weights & Biases, beside the JSON logs (which stay the record).

Pretraining and the evaluators write the same way, from rank 0 only. All figures of one run share one step
axis (pretraining: optimizer steps; linear probe: epochs; kNN: 0), because a resumed run hides what the stopped
run logged past its checkpoint with TensorBoard's purge (`SummaryWriter(purge_step=s)` writes a restart marker;
readers then drop every earlier-written event at step >= s, whatever its tag): the curves continue without
duplicate steps. W&B continues the same run, by the id kept in the output folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline")


class MonitorSetupError(ValueError):
    """A monitor was asked for that cannot run here (its package is missing, an unknown mode)."""


@dataclass(frozen=True)
class MonitorOptions:
    """`tensorboard` None: on when the package is importable; `wandb` None: off, else online or offline."""

    tensorboard: bool | None = None
    wandb: str | None = None

    def check(self) -> None:
        """Fail before any work when an asked-for monitor cannot run."""
        if self.tensorboard and not tensorboard_available():
            raise MonitorSetupError("--tensorboard: the package `tensorboard` is not installed "
                                    "(pip install tensorboard, or pip install 'moco-transfer[tensorboard]')")
        if self.wandb is not None:
            if self.wandb not in WANDB_MODES:
                raise MonitorSetupError(f"--wandb {self.wandb!r}: expected online or offline")
            if importlib.util.find_spec("wandb") is None:
                raise MonitorSetupError(f"--wandb {self.wandb}: the package `wandb` is not installed "
                                        "(pip install wandb, or pip install 'moco-transfer[wandb]')")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _numbers(figures: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures (bools and text left out; NaN and inf kept: a diverged value is worth seeing)."""
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_EVENT_FILE_SECOND = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _wait_past_older_event_files(folder: Path) -> None:
    """Sleep (at most a second) until this process's event file will sort after every older one.

    Readers apply a restart marker only to events in files that sort before it, by name. Names are
    `events.out.tfevents.<second>.<host>.<pid>.<counter>`: within one second, pid and counter decide, as text
    (".10" sorts before ".9"). A later second decides alone, so a writer opened in a later second than every
    older file is always read last. Only a restart within the same second (tests, a crash at start) waits.
    """
    seconds = [int(m.group(1)) for f in folder.glob("events.out.tfevents.*")
               if (m := _EVENT_FILE_SECOND.match(f.name))] if folder.is_dir() else []
    if seconds and time.time() < max(seconds) + 1:
        time.sleep(max(seconds) + 1 - time.time())


class RunLog:
    """One run's TensorBoard writer and W&B run; inert on ranks other than 0 and when nothing is on.

    `first_step`: the first step this process will log. Events an earlier process wrote at or after it are
    hidden (TensorBoard) or dropped (W&B refuses steps below its last one); 0 starts the curves afresh.
    """

    def __init__(self, folder: str | os.PathLike, options: MonitorOptions, *, name: str,
                 config: Mapping[str, Any] | None = None, first_step: int = 0, main_process: bool = True) -> None:
        options.check()
        self.folder = Path(folder)
        self._tb = None
        self._wandb = None
        if not main_process:
            return
        if options.tensorboard or (options.tensorboard is None and tensorboard_available()):
            from torch.utils.tensorboard import SummaryWriter

            _wait_past_older_event_files(self.folder / TENSORBOARD_DIR)
            self._tb = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=first_step, flush_secs=30)
            if config is not None:
                lines = "\n".join(f"{k}: {v!r}" for k, v in config.items())
                self._tb.add_text("config", f"```\n{lines}\n```", global_step=first_step)
        if options.wandb is not None:
            self._wandb = self._start_wandb(options.wandb, name, config, fresh=first_step == 0)

    def _start_wandb(self, mode: str, name: str, config: Mapping[str, Any] | None, fresh: bool) -> Any:
        import wandb

        id_file = self.folder / WANDB_ID_FILE
        run_id = None if fresh or not id_file.is_file() else id_file.read_text().strip() or None
        run_id = run_id or secrets.token_hex(4)  # W&B ids: short, lowercase alphanumeric
        self.folder.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "moco-transfer"), name=name, id=run_id,
                          resume="allow", mode=mode, dir=str(self.folder), config=dict(config or {}))

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def scalars(self, figures: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Each numeric figure as `<prefix><name>` at `step`."""
        if not self.active:
            return
        values = {prefix + k: v for k, v in _numbers(figures).items()}
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
