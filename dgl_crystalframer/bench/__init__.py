"""Measurements that print figures: speed, memory and scaling (``perf``), the invariance errors of
each frame type on real crystals (``invariance``), and the plain-PyTorch yardstick the fused
kernels are compared with (``reference``).  Run them as ``dgl-crystalframer perf`` and
``dgl-crystalframer invariance``."""
