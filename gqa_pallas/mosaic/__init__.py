"""The ``"mosaic"`` backend: Pallas kernels lowered through Mosaic GPU, for Hopper (sm90).

``prefill`` is a flash-attention forward built on Hopper's asynchronous units: TMA loads of
K/V into a shared-memory ring completed on barriers, ``wgmma`` for both products, a producer
warpgroup and two consumer warpgroups. ``compat`` imports the Mosaic GPU API once (and says
what is missing where a jax lacks it); ``backend`` is the registry entry. With
``interpret=True`` the kernel runs in Mosaic GPU's interpreter on the CPU.
"""
