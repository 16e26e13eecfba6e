"""Fine-tuning methods and defaults. Importable without torch: the Slicer panel lists them before the Python
packages are installed."""

METHODS = ("supervised", "mean-teacher", "bcp")
AUTOMATIC = "auto"  # let default_method choose
#: The budget when none is given: whichever comes first. On this project's 2-core CPU the minutes end it; the
#: steps are meant to end it on a GPU (the GPU round time is not measured yet: README, Fine-tuning).
DEFAULT_MINUTES = 5.0
DEFAULT_STEPS = 3000
DEFAULT_LEARNING_RATE = 1e-3  # peak (AdamW, warm-up then cosine); lower values change a trained model less
MAX_LABELED = 20  # interactive fine-tuning is for a few volumes; more belongs to offline training


def default_method(labeled: int, unlabeled: int) -> str:
    """BCP for a single corrected volume with unlabelled ones, supervised otherwise. Measured (README,
    "Fine-tuning"): from one labelled left atrium, BCP beat supervised-only by 9 Dice points on the unlabelled
    volumes in the same minutes; from three or five, supervised-only was as good or better (the semi-supervised
    methods' extra passes cost it about half its steps)."""
    return "bcp" if labeled == 1 and unlabeled > 0 else "supervised"
