"""HybridMIMSegment offline training: supervised training, evaluation and export of model folders that the
engine (``hybridmim``) loads. Pre-training grows here too."""
