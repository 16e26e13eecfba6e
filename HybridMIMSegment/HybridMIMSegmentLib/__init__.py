"""Slicer-side helpers of the HybridMIMSegment module: the MRML bridge, the background worker and the
dependency installer. The engine itself lives in the ``hybridmim`` package next to this one."""
