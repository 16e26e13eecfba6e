"""Slicer-side helpers of the HybridMIMSegment module: the MRML bridge, the worker process (the ``hybridmim`` command
line tool), Segment and Fine-tune from the scene, the dependency installer and the live plot. The engine itself
lives in the ``hybridmim`` package next to this one; nothing here imports torch."""
