"""Tile configurations that spill registers or exceed shared memory, per triton version
(major.minor), as measured by ``python benchmarks/compile_kernels.py --update-pruned``
with that version for its targets (generated: do not edit by hand; each run rewrites
the entry of the triton it runs with and keeps the others). Key: (kernel, path, sm_XY,
element bytes, Theta element bytes, rank tile, tile fields); see configs.prune_key;
configs.pruned_table picks the entry.

"""

# the full triton version each entry was last measured with
MEASURED = {
    '3.6': '3.6.0',
    '3.9': '3.9.0',
}

# the targets (sm_XY) each entry was measured for
TARGETS = {
    '3.6': (80, 90),
    '3.9': (80, 90),
}

PRUNED = {
    '3.6': frozenset({
        ('bwd', 'fused', 80, 2, 2, 32, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 2, 64, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 4, 64, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 90, 2, 4, 16, (128, 128, 64, 8, 3)),
        ('bwd', 'fused', 90, 2, 4, 32, (128, 128, 64, 8, 3)),
        ('bwd', 'fused', 90, 2, 4, 64, (64, 128, 64, 8, 3)),
        ('bwd', 'fused', 90, 2, 4, 64, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 80, 2, 2, 16, (128, 128, 32, 8, 4)),
        ('bwd', 'split', 80, 2, 2, 16, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 80, 2, 4, 16, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 90, 2, 4, 16, (64, 128, 64, 4, 4)),
        ('bwd', 'split', 90, 2, 4, 16, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 90, 2, 4, 16, (128, 128, 64, 8, 4)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 64, 64, 4, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 64, 128, 4, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 128, 64, 8, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (64, 128, 32, 8, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (128, 128, 32, 8, 3)),
        ('fwd', 'split', 90, 2, 4, 16, (128, 256, 64, 8, 3)),
        ('input_bwd', 'input', 90, 2, 4, 32, (64, 64, 8, 3)),
        ('input_bwd', 'input', 90, 2, 4, 64, (16, 128, 4, 3)),
        ('input_bwd', 'input', 90, 2, 4, 64, (32, 64, 4, 3)),
        ('input_bwd', 'input', 90, 2, 4, 64, (32, 128, 8, 3)),
        ('input_bwd', 'input', 90, 2, 4, 64, (64, 64, 8, 3)),
        ('input_bwd', 'input', 90, 4, 4, 64, (16, 32, 4, 2)),
        ('input_bwd', 'input', 90, 4, 4, 64, (16, 64, 8, 2)),
        ('input_bwd', 'input', 90, 4, 4, 64, (32, 32, 8, 2)),
        ('input_fwd', 'input', 80, 4, 4, 16, (32, 32, 8, 3)),
        ('input_fwd', 'input', 90, 2, 2, 16, (16, 128, 4, 4)),
        ('input_fwd', 'input', 90, 2, 4, 16, (32, 128, 8, 3)),
        ('input_fwd', 'input', 90, 2, 4, 32, (16, 64, 4, 2)),
        ('input_fwd', 'input', 90, 2, 4, 32, (64, 128, 4, 3)),
        ('input_fwd', 'input', 90, 2, 4, 64, (16, 128, 4, 4)),
        ('input_fwd', 'input', 90, 2, 4, 64, (32, 128, 8, 3)),
        ('input_fwd', 'input', 90, 2, 4, 64, (64, 128, 4, 3)),
        ('skinny', 'skinny', 80, 2, 2, 32, (64, 128, 4, 4)),
        ('skinny', 'skinny', 80, 2, 2, 64, (64, 128, 4, 4)),
        ('skinny', 'skinny', 80, 2, 4, 64, (64, 64, 4, 4)),
    }),
    '3.9': frozenset({
        ('bwd', 'fused', 80, 2, 2, 16, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 2, 32, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 2, 64, (64, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 2, 64, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 4, 64, (64, 128, 32, 8, 3)),
        ('bwd', 'fused', 80, 2, 4, 64, (128, 128, 32, 8, 3)),
        ('bwd', 'fused', 90, 2, 4, 64, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 80, 2, 2, 16, (128, 128, 32, 8, 4)),
        ('bwd', 'split', 80, 2, 2, 16, (128, 128, 64, 8, 3)),
        ('bwd', 'split', 80, 2, 4, 16, (128, 128, 32, 8, 4)),
        ('bwd', 'split', 80, 2, 4, 16, (128, 128, 64, 8, 3)),
        ('fwd', 'fused', 80, 2, 2, 32, (16, 64, 128, 4, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 64, 64, 4, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 64, 128, 4, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (16, 128, 64, 8, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (64, 128, 32, 8, 3)),
        ('fwd', 'fused', 80, 2, 2, 64, (128, 128, 32, 8, 3)),
        ('skinny', 'skinny', 90, 2, 4, 64, (32, 64, 4, 3)),
        ('skinny', 'skinny', 90, 4, 4, 64, (64, 32, 4, 3)),
    }),
}
