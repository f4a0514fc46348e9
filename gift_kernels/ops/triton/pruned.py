"""Tile configurations that spill registers or exceed shared memory, as measured by
``python benchmarks/compile_kernels.py --update-pruned`` (generated: do not edit by hand).

Measured with triton 3.9.0 for sm_80 and sm_90. Key: (kernel, path, arch,
element bytes, Theta element bytes, rank tile, tile fields); see configs.prune_key.
"""

PRUNED = frozenset({
    ('bwd', 'fused', 8, 2, 2, 16, (128, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 2, 32, (128, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 2, 64, (64, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 2, 64, (128, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 4, 16, (128, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 4, 64, (64, 128, 32, 8, 3)),
    ('bwd', 'fused', 8, 2, 4, 64, (128, 128, 32, 8, 3)),
    ('bwd', 'split', 8, 2, 2, 16, (128, 128, 32, 8, 4)),
    ('bwd', 'split', 8, 2, 2, 16, (128, 128, 64, 8, 3)),
    ('bwd', 'split', 8, 2, 4, 16, (128, 128, 32, 8, 4)),
    ('bwd', 'split', 8, 2, 4, 16, (128, 128, 64, 8, 3)),
    ('fwd', 'fused', 8, 2, 2, 32, (16, 64, 128, 4, 3)),
    ('fwd', 'fused', 8, 2, 2, 64, (16, 64, 64, 4, 3)),
    ('fwd', 'fused', 8, 2, 2, 64, (16, 64, 128, 4, 3)),
    ('fwd', 'fused', 8, 2, 2, 64, (16, 128, 64, 8, 3)),
    ('fwd', 'fused', 8, 2, 2, 64, (64, 128, 32, 8, 3)),
    ('fwd', 'fused', 8, 2, 2, 64, (128, 128, 32, 8, 3)),
    ('skinny', 'skinny', 9, 4, 4, 64, (64, 32, 4, 3)),
})
