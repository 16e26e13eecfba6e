"""Fine-tuning methods, defaults and the checks of a user's choice. Importable without torch: the Slicer panel
lists and checks them in Slicer's own process, which never imports torch."""

import math

from .errors import HybridMIMError

METHODS = ("supervised", "mean-teacher", "bcp")
AUTOMATIC = "auto"  # let default_method choose
#: The budget when none is given: whichever comes first. On this project's 2-core CPU the minutes end it; the
#: steps are meant to end it on a GPU (the GPU round time is not measured yet: docs/fine-tuning.md).
DEFAULT_MINUTES = 5.0
DEFAULT_STEPS = 3000
DEFAULT_LEARNING_RATE = 1e-3  # peak (AdamW, warm-up then cosine); lower values change a trained model less
MAX_LABELED = 20  # interactive fine-tuning is for a few volumes; more belongs to offline training

#: Display names and tooltips (the Slicer panel), in the order the panel lists them.
METHOD_LABELS = {"auto": "Automatic", "supervised": "Supervised", "mean-teacher": "Mean Teacher", "bcp": "BCP"}
METHOD_TOOLTIPS = {
    "auto": "BCP for a single corrected segmentation with unlabelled volumes, otherwise Supervised: what measured "
            "best on the left-atrium benchmark for a few minutes of training (docs/fine-tuning.md).",
    "supervised": "Learns from the corrected segmentations only. Needs no unlabelled volumes.",
    "mean-teacher": "Also learns from the unlabelled volumes: a slowly averaged copy of the network labels them "
                    "and the network learns its confident voxels on perturbed views.",
    "bcp": "Bidirectional copy-paste: boxes are swapped between corrected and unlabelled volumes; the averaged "
           "copy labels the pasted unlabelled voxels.",
}


def default_method(labeled: int, unlabeled: int) -> str:
    """BCP for a single corrected volume with unlabelled ones, supervised otherwise. Measured (docs/fine-tuning.md):
    from one labelled left atrium, BCP beat supervised-only by 9 Dice points on the unlabelled
    volumes in the same minutes; from three or five, supervised-only was as good or better (the semi-supervised
    methods' extra passes cost it about half its steps)."""
    return "bcp" if labeled == 1 and unlabeled > 0 else "supervised"


def default_budget(steps: int | None, minutes: float | None) -> tuple[int | None, float | None]:
    """Neither given: ``DEFAULT_STEPS`` or ``DEFAULT_MINUTES``, whichever comes first."""
    if steps is None and minutes is None:
        return DEFAULT_STEPS, DEFAULT_MINUTES
    return steps, minutes


def resolve_method(method: str | None, labeled: int, unlabeled: int) -> str:
    """The method a run uses: None or 'auto' pick ``default_method``; an unknown method, or a semi-supervised one
    without unlabelled volumes, is an error."""
    if method in (None, AUTOMATIC):
        method = default_method(labeled, unlabeled)
    check_method(method, unlabeled)
    return method


def check_method(method: str, unlabeled: int) -> None:
    if method not in METHODS:
        raise HybridMIMError(f"Unknown method '{method}': use one of {', '.join(METHODS)}")
    if method != "supervised" and unlabeled == 0:
        raise HybridMIMError(f"Method '{method}' needs unlabelled volumes; give some or use 'supervised'")


def check_budget(steps: int | None, minutes: float | None) -> None:
    if not steps and not minutes:
        raise HybridMIMError("Give a budget: a number of steps, of minutes, or both")
    if (steps is not None and steps < 1) or (minutes is not None and not (0 < minutes < math.inf)):
        raise HybridMIMError("The budget (steps, minutes) must be positive and finite")
