"""HybridMIMSegment offline training: supervised training, evaluation and export of model folders that the
engine (``hybridmim``) loads, and HybridMIM pre-training (``pretraining/``). Configs: ``config.py``."""
