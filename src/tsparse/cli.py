"""Command-line plumbing shared by the entry points: every bad input is one `error:` line on stderr and exit 2.

- `ArgumentParser` (argparse CLIs) folds argparse's usage-plus-message errors into one line.
- `one_line_errors()` turns the errors of bad input (ConfigError, an unreachable hub, OmegaConf and Hydra
  errors) raised inside a CLI into that line.
- `hydra_main(config_name, check)` is `@hydra.main` on the tsparse config tree that first composes every
  job of the command line (each combination of a `-m` sweep, the sweeper's `params` included) and runs
  `check` on it, so bad overrides fail before Hydra creates a run directory.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn

import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from tsparse.checks import ConfigError
from tsparse.config import config_dir
from tsparse.hub import HubUnreachableError

BAD_INPUT = (ConfigError, HubUnreachableError, OmegaConfBaseException, HydraException, yaml.YAMLError)
_DETAIL = ("full_key:", "object_type=", "reference_type=")


# Exit codes a scheduler or sweep can act on (docs/reliability.md#faults): 0 done; resume with ckpt_path=auto on 75 and 76.
EXIT_BAD_INPUT = 2      # one `error:` line, nothing written
EXIT_NON_FINITE = 3     # optim.on_non_finite=stop: a NaN/inf loss or gradient
EXIT_DISK_FULL = 74     # EX_IOERR: a write did not fit; the previous checkpoint is intact
EXIT_PREEMPTED = 75     # EX_TEMPFAIL: SIGTERM/SIGUSR1, checkpointed at the current step
EXIT_LOST_RANK = 76     # another rank of a multi-process run died; resume from its last checkpoint


def fail(message: str, code: int = EXIT_BAD_INPUT, prefix: str = "error") -> NoReturn:
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def one_line(err: BaseException) -> str:
    """The message of `err` (and of its cause) as one line: Hydra's search path and links dropped, its list
    of available options joined, OmegaConf's `full_key` put in front."""
    text = str(err).split("\nConfig search path:")[0].split("\nSee https://")[0]
    text = re.sub(r"\s*Available options in '([^']+)':((?:\n\t\S+)+)",
                  lambda m: f" (available options in '{m[1]}': {', '.join(m[2].split())})", text)
    message = " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(_DETAIL))
    key = getattr(err, "full_key", None)
    if key and key not in message:
        message = f"{key}: {message}"
    if err.__cause__ is not None:
        message += f" ({one_line(err.__cause__)})"
    return message or type(err).__name__


@contextmanager
def one_line_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Bad input raised inside the block (BAD_INPUT, plus `extra`, e.g. OSError for path arguments) exits 2 in one line."""
    try:
        yield
    except (*BAD_INPUT, *extra) as err:
        fail(one_line(err))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (missing or unknown arguments, bad values) are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def probability(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def device_type(text: str) -> str:
    """argparse type: cpu, or cuda when a CUDA device is there."""
    import torch

    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no CUDA device is available")
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu or cuda")
    return text


def _job_overrides(config_name: str, overrides: list[str], multirun: bool) -> tuple[list[list[str]], bool]:
    """The override list of every job the command line starts, and whether the sweeper could be expanded
    (only Hydra's basic sweeper is; other sweepers' jobs are checked as the primary config)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not multirun:
        return [overrides], True
    gh = GlobalHydra.instance().hydra
    primary = gh.compose_config(config_name, overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    params = [f"{k}={v}" for k, v in (primary.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=gh.config_loader).parse_overrides([*params, *overrides])
    if primary.hydra.sweeper._target_ != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return [[o.input_line for o in parsed if not o.is_sweep_override()]], False
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], True


def compose_job(config_name: str, overrides: list[str], num: int = 0, multirun: bool = False) -> DictConfig:
    """The job config (no `hydra` node) Hydra will run for `overrides`, unresolved, its `${hydra:...}`
    resolvable until the next compose."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)  # for the ${hydra:...} of the output dir itself
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.runtime.output_dir = (f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}" if multirun
                                        else cfg.hydra.run.dir)
        HydraConfig.instance().set_config(cfg)
        cfg.pop("hydra")
    return cfg


def precheck(config_name: str, argv: list[str], check: Callable[[DictConfig], None]) -> DictConfig | None:
    """Compose and `check` every job of `argv` as Hydra would run it; bad input exits 2 in one line. Returns
    the job's config for a single run (None for a sweep, or when Hydra only prints)."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = lambda message: fail(f"{message} (see --help)")  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    commands = [flag for flag, given in (("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg),
                                         ("--info", args.info), ("--shell-completion", args.shell_completion)) if given]
    if len(commands) > 1 and not (args.help or args.hydra_help):  # Hydra raises a ValueError for these
        fail(f"{' and '.join(commands)} cannot be combined: give one of --run, --multirun, --cfg, --info, "
             "--shell-completion (see --help)")
    if args.resolve and not (args.cfg or args.help):
        fail("--resolve needs --cfg (see --help)")
    if (args.help or args.hydra_help or args.info or args.cfg or args.shell_completion or args.config_path
            or args.config_dir or args.experimental_rerun):
        return None  # Hydra prints or reruns; nothing to check
    name = args.config_name or config_name
    with one_line_errors(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        jobs, expanded = _job_overrides(name, args.overrides, args.multirun)
        for num, overrides in enumerate(jobs):
            cfg = compose_job(name, overrides, num, args.multirun)
            if expanded:  # before resolving: a bad value is named by its key, not by an interpolation reading it
                check(cfg)
            OmegaConf.resolve(cfg)
    return None if args.multirun else cfg


def hydra_main(config_name: str, check: Callable[[DictConfig], None] = lambda cfg: None, lock_run_dir: bool = False):
    """`@hydra.main` on the tsparse config tree, with `precheck` first (on rank 0 only: DDP re-launches
    the command line for the other ranks). With `lock_run_dir`, a single run takes its run dir's lock
    (`paths.output_dir`) before Hydra writes anything there; a sweep's jobs lock their own dirs."""
    import hydra
    from lightning.pytorch.utilities import rank_zero_only

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)

        @functools.wraps(task)
        def main() -> Any:
            if getattr(rank_zero_only, "rank", 0) == 0:
                cfg = precheck(config_name, sys.argv[1:], check)
                if lock_run_dir and cfg is not None:
                    from tsparse.rundir import lock_run_dir as lock

                    with one_line_errors():
                        lock(cfg.paths.output_dir)
            return app()

        return main

    return decorate
