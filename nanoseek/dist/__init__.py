"""Scale-out on torch.distributed: transforms of a built model and the helpers a training run needs on more than
one process (docs/distributed.md). Nothing here is imported by the model package.

- mesh.py: ParallelDims (the layout, validated) and the DeviceMeshes;
- parallel.py: Parallel, what a run does differently per rank (transforms, row slicing, reductions);
- fsdp.py: apply_fsdp (FSDP2 per block, HSDP); expert_parallel.py: apply_ep (all-to-all around the experts);
- pipeline.py: pipeline stages and schedules (1F1B, Interleaved1F1B, ZBVZeroBubble, DualPipeV);
- grad.py: gradient-norm clipping across meshes and stages; checkpoint.py: torch.distributed.checkpoint I/O.
"""

from .mesh import PP_SCHEDULES, ParallelDims

__all__ = ["PP_SCHEDULES", "ParallelDims"]
