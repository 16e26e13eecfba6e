"""HybridMIM self-supervised pre-training (Xing et al., IEEE JBHI 2024, arXiv:2303.10333; docs/pretraining.md):
masking hierarchy, pretext model and
losses. Backbones come from the engine's network registry; their decoders are pre-trained too."""
