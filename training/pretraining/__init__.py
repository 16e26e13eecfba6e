"""HybridMIM self-supervised pre-training (see ../shared/HYBRIDMIM.md): masking hierarchy, pretext model and
losses. Backbones come from the engine's network registry; their decoders are pre-trained too."""
