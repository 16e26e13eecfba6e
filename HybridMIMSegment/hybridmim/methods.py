"""Fine-tuning methods and defaults. Importable without torch: the Slicer panel lists them before the Python
packages are installed."""

METHODS = ("supervised", "mean-teacher", "bcp")
#: The method used when none is asked for and there are unlabelled volumes (why: README, "Fine-tuning").
DEFAULT_METHOD = "mean-teacher"
#: The budget when none is given: whichever comes first. On this project's 2-core CPU the minutes end it; on a
#: GPU the steps do, in about a minute or two.
DEFAULT_MINUTES = 5.0
DEFAULT_STEPS = 3000
MAX_LABELED = 20  # interactive fine-tuning is for a few volumes; more belongs to offline training
