"""What `inspector refit` is asked, and the checks of it that need no torch and no model.

`check_options` runs before the backbone is loaded (the command line calls it before importing the
refit pipeline), so a mistyped option or folder is told in well under a second. `check_training_folder`
refuses a folder laid out as a labelled data set: a fit learns whatever it is given as normal, so
defects (MVTec AD's `test/<kind>/`) or masks (`ground_truth/`) in it would silently teach the model
that they are good.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from inspector.config import Settings
from inspector.errors import ConfigError
from inspector.tools import groups
from inspector.tools.checks import check_folder, check_model

AUTO = "auto"
CROSS_FIT = "cross-fit"
HELD_OUT = "held-out"
CALIBRATIONS = (AUTO, CROSS_FIT, HELD_OUT)

GOOD = "good"
# Folders of pixel masks, not of parts (MVTec AD's `ground_truth/`, and the names other sets use).
MASK_FOLDERS = frozenset({"ground_truth", "groundtruth", "masks", "mask"})
ANY_FOLDER = "--any-folder"


@dataclass
class RefitOptions:
    data: Path
    model: str
    calibrate: bool = True
    target_false_reject: float = 0.005
    # A share asks for a plain hold-out of that share; None: `refit.held_out_share` under the automatic rule.
    held_out_share: float | None = None
    # AUTO, CROSS_FIT or HELD_OUT; None: HELD_OUT when a share is given, else AUTO.
    calibration: str | None = None
    folds: int = 0  # 0: automatic (auto_folds)
    # None: the [refit] settings (fold_order, group_pattern, group_sidecar, group_seconds, group_twins).
    fold_order: str | None = None
    group_pattern: str | None = None
    group_sidecar: Path | None = None
    group_seconds: float | None = None
    keep: int = 0
    # True: announce; False: never; None: announce only where a broker is configured (see will_announce).
    announce: bool | None = True
    any_folder: bool = False  # fit on every image under `data`, even in folders named for defects or masks


def broker_configured(settings: Settings) -> bool:
    """Whether `broker.url` was set, in the file or the environment, rather than left at its default."""
    return "url" in settings.broker.model_fields_set


def will_announce(settings: Settings, options: RefitOptions) -> bool:
    """Announce when asked to, or, unless told not to, when a broker was configured: a try-out with no
    configuration must not publish to whatever broker answers on the default URL."""
    if options.announce is None:
        return broker_configured(settings)
    return options.announce


def check_options(settings: Settings, options: RefitOptions) -> None:
    """Every option and the --data folder, before anything heavy: ConfigError (exit 2) naming the option."""
    check_model(settings, options.model)
    if not 0 < options.target_false_reject < 1:
        raise ConfigError(f"--target-false-reject {options.target_false_reject}: must be between 0 and 1 "
                          "(a rate: 0.005 is one good part in 200)")
    if options.held_out_share is not None and not 0 <= options.held_out_share < 1:
        raise ConfigError(f"--held-out {options.held_out_share}: must be at least 0 and below 1")
    if options.calibration is not None and options.calibration not in CALIBRATIONS:
        raise ConfigError(f"--calibration {options.calibration!r}: must be one of {', '.join(CALIBRATIONS)}")
    if options.calibration == CROSS_FIT and options.held_out_share is not None:
        raise ConfigError("--held-out sets the share of a held-out calibration, and --calibration cross-fit holds "
                          "nothing out: give one of them")
    if options.folds != 0 and options.folds < 2:
        raise ConfigError(f"--folds {options.folds}: cross-fitting needs at least 2 folds (0: automatic)")
    if options.fold_order is not None and options.fold_order not in groups.FOLD_ORDERS:
        raise ConfigError(f"--fold-order {options.fold_order!r}: must be one of {', '.join(groups.FOLD_ORDERS)}")
    if options.group_pattern:
        groups.compile_pattern(options.group_pattern, "--group-pattern")
    if options.group_seconds is not None and options.group_seconds < 0:
        raise ConfigError(f"--group-seconds {options.group_seconds}: must be 0 (off) or more")
    if options.keep < 0:
        raise ConfigError(f"--keep {options.keep}: must be 0 (keep all) or more")
    check_folder(options.data)
    if not options.any_folder:
        check_training_folder(options.data)


def check_training_folder(data: Path) -> None:
    """ConfigError when `data` holds defects or masks by the layout of a labelled data set: a folder beside
    a `good/` folder (MVTec AD's `test/<kind>/`, `data` itself included) or a mask folder (`ground_truth/`).
    The message names what was found and the folder to pass instead. Walks folders only; symlinked folders
    are not followed, as refit's scan does not follow them."""
    defects: list[str] = []
    masks: list[str] = []
    real = data.resolve()
    if real.name != GOOD and real.parent != real and _is_folder(real.parent / GOOD):
        defects.append(".")
    stack = [data]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                names = sorted(e.name for e in listing if not e.name.startswith(".")
                               and e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # refit's own scan reports a folder it cannot list
        for name in names:
            relative = (folder / name).relative_to(data).as_posix()
            if name.lower() in MASK_FOLDERS:
                masks.append(relative)
            elif name != GOOD and GOOD in names:
                defects.append(relative)
            else:
                stack.append(folder / name)
    if not defects and not masks:
        return
    found = []
    if defects:
        shown = ", ".join(f"{d}/" if d != "." else f"{data} itself" for d in sorted(defects)[:4])
        more = f" and {len(defects) - 4} more" if len(defects) > 4 else ""
        found.append(f"folders of defects beside a good/ folder ({shown}{more})")
    if masks:
        found.append(f"mask folders ({', '.join(f'{m}/' for m in sorted(masks)[:4])})")
    raise ConfigError(f"--data {data}: holds {' and '.join(found)}, the layout of a labelled data set; a fit "
                      f"learns every image it is given as a good part. {_instead(data)}, or pass {ANY_FOLDER} "
                      "to fit on every image under it")


def _instead(data: Path) -> str:
    """The folder of good training images to pass instead, where the layout names one."""
    real = data.resolve()
    for candidate in (real / "train" / GOOD, real.parent / "train" / GOOD, real.parent.parent / "train" / GOOD,
                      real / GOOD, real.parent / GOOD):
        if _is_folder(candidate):
            shown = candidate.relative_to(Path.cwd()) if candidate.is_relative_to(Path.cwd()) else candidate
            return f"Pass its good images: --data {shown}"
    return "Pass a folder of good parts only"


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False
