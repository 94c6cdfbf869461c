"""The ``"triton"`` backend: Pallas kernels lowered through Triton (any sm80+ CUDA GPU).

``prefill`` (flash forward), ``decode`` (split-K flash-decoding over the cache), ``append`` (the
cache write), ``flash`` (head-dim rules, row packing, online softmax shared by the kernels),
``compat`` (the Pallas-Triton APIs used); ``backend`` is the registry entry. With
``interpret=True`` the same kernel code runs in Pallas interpret mode on the CPU.
"""
