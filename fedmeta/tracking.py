"""Live tracking of a run's per-round values in TensorBoard or Weights & Biases.

A :class:`Tracker` receives ``log(step, values)`` after every round (iteration) and ``close()`` at the end. Every
runner writes to it: the simulation and a deployment (their ServerApp, :mod:`fedmeta.simulations.apps`), the
centralized runner (:func:`fedmeta.centralized.train`) and Dif-MAML (:func:`fedmeta.dif_maml.simulate` and its Flower
app). One setting chooses the backend, ``track`` (``--track tensorboard|wandb|none``, ``track = ...`` in pyproject),
and :func:`open_tracker` opens it with the run's provenance block (:func:`fedmeta.provenance.provenance`) as its
config.

**The names.** A value is logged under its place in the run's results JSON, so a name means the same thing in the
JSON, in TensorBoard and in W&B: ``results[section][round][key]`` is logged as ``<section>/<key>`` at step ``round``
(``train/train-loss``, ``evaluate/acc-after``, ``evaluate/acc-after-p10``, ``train/num-failures``), and a per-round
list or mapping ``results[key][round]`` as ``key`` (``round_seconds``; the centralized runner's ``train_loss`` and
``meta_loss``). :func:`round_values` builds one round's values.

**Values.** Numbers only (``bool`` counts as 0/1); anything else (a string, a list, ``None``) is a ``TypeError``
naming the key, since a value that vanished silently from a plot is worse than a run that says why. NaN and
infinities are logged as they are: they are what the run produced (a diverged loss), TensorBoard stores them as
float32 and W&B as ``"NaN"`` / ``"Infinity"``.

**Optional packages.** The backends are imported when a tracker opens: the base install needs neither. A backend
class names its extra (``extra``, one of :data:`fedmeta.extras.EXTRAS`); without the package, :func:`require`
(called before any work by the command lines and the simulation) raises :class:`fedmeta.extras.MissingExtra`, one
line naming the extra to install (``pip install 'fedmeta[tensorboard]'``).

No Flower import here.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from fedmeta.extras import need

NONE, TENSORBOARD, WANDB = "none", "tensorboard", "wandb"

TRACKING_DIR = "tracking"
"""Where trackers write by default: ``<results-dir>/tracking`` (fedmeta-sim, flwr run, deployments), ``./tracking``
(the centralized and Dif-MAML command lines)."""

WANDB_PROJECT = "fedmeta"
"""W&B project of the runs, unless ``WANDB_PROJECT`` says otherwise."""


@runtime_checkable
class Tracker(Protocol):
    """Where a run's per-round values go: ``log`` after every round (steps increase), ``close`` once at the end.

    An exception raised by ``log`` stops the run: the runner closes every tracker and re-raises it (a tuner raises
    ``optuna.TrialPruned`` there to stop a trial early)."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def require(track: str) -> None:
    """Check, before any work, that the backend of ``track`` can be imported: a :class:`fedmeta.extras.MissingExtra`
    if its package is missing. An unknown ``track`` is the ``track`` setting's ``ValueError`` (naming the choices)."""
    from fedmeta.config import HP  # fedmeta.config imports this module

    extra = getattr(BACKENDS[HP.track.check("track", track)], "extra", None)
    if extra is not None:
        need(extra, f"--track {track}")


def numbers_of(values: Mapping[str, Any]) -> dict[str, float]:
    """``values`` as ``{key: float}``: every key a string, every value a real number (``bool`` as 0 / 1; NaN and
    infinities kept), else a ``TypeError`` naming the key."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"a tracked value's name must be a string, got {key!r}")
        if not isinstance(value, numbers.Real):
            raise TypeError(f"tracked value {key!r} must be a number, got {value!r}")
        out[key] = float(value)
    return out


def round_values(sections: Mapping[str, Mapping[str, Any] | None] | None = None, **values: Any) -> dict[str, float]:
    """One round's values under their results-JSON names: each ``sections[section]`` (a round's metrics, e.g.
    ``train`` and ``evaluate``; ``None``: not in this round) as ``<section>/<key>``, each further keyword as
    itself (``round_seconds=...``; ``None`` is left out)."""
    out: dict[str, Any] = {}
    for section, metrics in (sections or {}).items():
        if metrics is not None:
            out.update({f"{section}/{key}": value for key, value in dict(metrics).items()})
    out.update({key: value for key, value in values.items() if value is not None})
    return numbers_of(out)


def _unique(directory: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = directory / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = directory / f"{name}-{stamp}-{n}"
    return path


class NoTracker:
    """``track = "none"``: logs nothing (the values are still checked, as every backend checks them)."""

    extra: str | None = None
    path: Path | None = None

    def __init__(self, directory: str | Path = TRACKING_DIR, run_name: str = "", config: Mapping[str, Any] | None = None) -> None:
        pass

    def log(self, step: int, values: Mapping[str, float]) -> None:
        numbers_of(values)

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """TensorBoard event files in ``<directory>/<run_name>-<time>/`` (``tensorboard --logdir <directory>``): a scalar
    per value and step, written through at every ``log`` (visible while the run goes), and the provenance block as
    the run's text ``provenance`` (JSON)."""

    extra: str | None = "tensorboard"

    def __init__(self, directory: str | Path, run_name: str, config: Mapping[str, Any] | None = None) -> None:
        require(TENSORBOARD)
        from torch.utils.tensorboard import SummaryWriter

        self.path = _unique(Path(directory), run_name)
        self._writer = SummaryWriter(log_dir=str(self.path))
        if config is not None:
            self._writer.add_text("provenance", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        self._writer.flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in numbers_of(values).items():
            self._writer.add_scalar(key, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A W&B run in ``<directory>/wandb/``: offline unless ``WANDB_MODE`` says otherwise (``wandb sync
    <run directory>`` uploads it later), in project ``WANDB_PROJECT`` (default ``fedmeta``), named ``run_name``, its
    config the provenance block; ``log`` is one history row at ``step``."""

    extra: str | None = "wandb"

    def __init__(self, directory: str | Path, run_name: str, config: Mapping[str, Any] | None = None) -> None:
        require(WANDB)
        import wandb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_name, dir=str(directory),
                               mode=os.environ.get("WANDB_MODE", "offline"), config=dict(config or {}), reinit="create_new",
                               settings=wandb.Settings(console="off"))  # the run's console stays fedmeta's (progress bar)
        self.path = Path(self._run.dir).parent  # the run directory, holding run-<id>.wandb

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(numbers_of(values), step=int(step))

    def close(self) -> None:
        self._run.finish()


BACKENDS: dict[str, type] = {NONE: NoTracker, TENSORBOARD: TensorBoardTracker, WANDB: WandbTracker}
"""``track`` value -> its tracker class, called as ``cls(directory, run_name, config)``; a backend with an optional
package names its extra as the class's ``extra`` (``None``: none needed)."""
TRACKS = tuple(BACKENDS)
"""Values of the ``track`` setting."""


def open_tracker(track: str, run_name: str, directory: str | Path = TRACKING_DIR,
                 config: Mapping[str, Any] | None = None) -> Tracker:
    """The tracker of the ``track`` setting for a run named ``run_name``, writing under ``directory``, with
    ``config`` (the run's provenance block) as its configuration."""
    require(track)
    return BACKENDS[track](directory, run_name, config)


class Trackers:
    """Several trackers as one: ``log`` goes to each in turn, ``close`` closes each once (all of them, even when one
    fails; the first error is re-raised after; a second ``close`` does nothing). An exception from a tracker's
    ``log`` propagates at once."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)
        self.closed = False
        for t in self.trackers:
            if not isinstance(t, Tracker):
                raise TypeError(f"a tracker must have log(step, values) and close(), got {t!r}")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log(step, values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        first: BaseException | None = None
        for t in self.trackers:
            try:
                t.close()
            except BaseException as err:  # close the others first
                first = first or err
        if first is not None:
            raise first

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            self.close()
        except BaseException:
            if exc_type is None:  # else the error that ends the block is the one to see
                raise


__all__ = ["BACKENDS", "NONE", "NoTracker", "TENSORBOARD", "TRACKING_DIR", "TRACKS", "TensorBoardTracker",
           "Tracker", "Trackers", "WANDB", "WandbTracker", "numbers_of", "open_tracker", "require", "round_values"]
