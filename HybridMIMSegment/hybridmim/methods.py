"""Fine-tuning methods and defaults. Importable without torch: the Slicer panel lists them before the Python
packages are installed."""

METHODS = ("supervised", "mean-teacher", "bcp")
#: The method used when none is asked for and there are unlabelled volumes (why: README, "Fine-tuning").
DEFAULT_METHOD = "mean-teacher"
DEFAULT_MINUTES = 5.0
MAX_LABELED = 20  # interactive fine-tuning is for a few volumes; more belongs to offline training
