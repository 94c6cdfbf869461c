"""Shapes shared by the benchmarks and the GPU tests (the anchor grids of shared/anchors-h200.md).

Every tuple is ``(B, S, N, K, H)``: batch, sequence (prefill: ``T == S``; decode: ``S_max``),
query heads, kv heads, head dim.
"""

# Causal prefill, T == S.
PREFILL_GRID = [(8, 2048, 32, 8, 128), (4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128),
                (1, 16384, 32, 8, 128), (8, 2048, 14, 2, 64), (2, 8192, 14, 2, 64),
                (4, 4096, 40, 8, 128)]

# Chunked prefill: (B, T, S, N, K, H), T new tokens at the end of a cache of S (bottom-right
# causal), and the square-causal (B, S, N, K, H) each head config is held against.
CHUNKED_PREFILL = [(1, 1024, 32768, 32, 8, 128), (1, 256, 32768, 32, 8, 128),
                   (4, 1024, 32768, 8, 1, 128), (1, 1024, 131072, 8, 1, 128),
                   (1, 256, 131072, 8, 1, 128)]
CHUNKED_SQUARE = {(32, 8, 128): (2, 8192, 32, 8, 128), (8, 1, 128): (2, 8192, 8, 1, 128)}

# One query token per row over full caches.
DECODE_GRID = [(16, 2048, 8, 8, 64), (16, 2048, 32, 8, 128), (16, 8192, 32, 8, 128),
               (64, 4096, 32, 8, 128), (1, 32768, 32, 8, 128), (16, 4096, 14, 2, 64),
               (8, 16384, 28, 4, 128), (32, 8192, 40, 8, 128), (2, 65536, 16, 2, 128)]

# Ragged-length decode: lengths drawn in [0, S_max] and [0, S_max / 2] against the full cache.
RAGGED_DECODE = (16, 8192, 32, 8, 128)

# The jit decode step (append one token + decode, cache donated).
STEP_GRID = [(16, 8192, 32, 8, 128), (1, 32768, 32, 8, 128), (16, 4096, 14, 2, 64)]

# Sliding windows: ((B, S, N, K, H), window). Prefill T == S; decode one token per row over a
# full cache of S, timed against a full cache as long as the window.
WINDOW_PREFILL = [((1, 16384, 32, 8, 128), 4096), ((1, 32768, 32, 8, 128), 4096)]
WINDOW_DECODE = [((16, 32768, 32, 8, 128), 4096)]
