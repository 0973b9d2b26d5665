"""Live progress of a run, fed by the driver's Tune callback.

On a terminal: one line per running trial (name, epoch or iteration of total, last
metric, throughput, ETA) and an overall line (done / running / pending / failed, elapsed,
ETA), redrawn in place. Anywhere else (CI, a log file): one plain line per event.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


#: result keys that are Tune's bookkeeping, not the trial's metrics
_TUNE_KEYS = ("time", "timestamp", "training_iteration", "done", "pid", "node_ip", "hostname", "date",
              "trial_id", "experiment_tag", "iterations_since_restore", "checkpoint_dir_name", "config")


class Progress:
    """The run's progress as the driver sees it; ``live`` redraws a block of lines."""

    def __init__(self, total: int, stream: TextIO | None = None, live: bool | None = None) -> None:
        self._stream = stream          # None: sys.stdout when written to (Tune pickles its callbacks)
        self.live = live if live is not None else (self.stream.isatty() and os.environ.get("TERM") != "dumb")
        self.total, self.done, self.failed, self.retries = total, 0, 0, 0
        self.running: dict[str, dict[str, Any]] = {}
        self.durations: list[float] = []
        self.start = time.monotonic()
        self._drawn, self._last_draw = 0, 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}

    # ------------------------------------------------------------------ events
    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {"since": time.monotonic(), "pos": None, "of": None, "unit": "", "metric": "", "ips": None}

    def started(self, name: str) -> None:
        self.running[name] = self._fresh()
        self._event(f"  start  {name}")

    def result(self, name: str, result: dict[str, Any]) -> None:
        info = self.running.setdefault(name, self._fresh())
        if "progress" in result:           # a tick: where training is
            info.update(pos=result["progress"], of=result.get("of"), unit=result.get("unit", ""),
                        ips=result.get("images_per_s"))
            self.draw()
            return
        shown = ", ".join(f"{k}={v:.3f}" for k, v in result.items()
                          if isinstance(v, float) and not k.startswith(_TUNE_KEYS) and not k.startswith("_"))
        info["metric"] = shown.split(", ")[0] if shown else ""
        self._event(f"  {name}: epoch {result.get('epoch', '?')}: {shown}")

    def ended(self, name: str, failed: bool) -> None:
        info = self.running.pop(name, None)
        if info is not None:
            self.durations.append(time.monotonic() - info["since"])
        self.done += 1
        self.failed += bool(failed)
        self._event(f"  {'FAILED' if failed else 'done  '} {name}"
                    f"{' (error row written; see its error.txt)' if failed else ''}")

    def retried(self, name: str) -> None:
        self.retries += 1
        self._event(f"  RETRY  {name}: its worker or node died; resuming from its last checkpoint")

    def tick(self, trials: list[Any]) -> None:
        self.draw()

    def close(self) -> None:
        if self.live:
            self.draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = 0

    # ------------------------------------------------------------------ rendering
    def overall(self) -> str:
        elapsed = time.monotonic() - self.start
        pending = max(0, self.total - self.done - len(self.running))
        eta = None
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = mean * (pending + len(self.running)) / max(1, len(self.running))
        return (f"done {self.done}/{self.total}  running {len(self.running)}  pending {pending}  "
                f"failed {self.failed}  retried {self.retries}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}")

    def trial_line(self, name: str, info: dict[str, Any]) -> str:
        pos, of = info["pos"], info["of"]
        where = f"{info['unit']} {pos}/{of}" if pos is not None and of else "starting"
        eta = None
        if pos and of:
            eta = (time.monotonic() - info["since"]) * (of - pos) / pos
        ips = f"{info['ips']:.1f} img/s" if info["ips"] else ""
        return f"  {name[:56]:<56} {where:<18} {info['metric']:<22} {ips:<12} ETA {_clock(eta)}"

    def draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        lines = [self.trial_line(n, i) for n, i in self.running.items()] + [self.overall()]
        out = "".join("\x1b[1A\x1b[2K" for _ in range(self._drawn))      # up and clear the last block
        self.stream.write(out + "\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def _event(self, line: str) -> None:
        if self.live:       # events scroll above the live block
            self.stream.write("".join("\x1b[1A\x1b[2K" for _ in range(self._drawn)) + line + "\n")
            self._drawn = 0
            self.draw(force=True)
        else:
            print(line, file=self.stream, flush=True)
