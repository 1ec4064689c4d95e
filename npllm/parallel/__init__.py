"""Parallel training under mpirun: data parallel, ZeRO-1 optimizer sharding, Megatron tensor parallel.

    threads.py    limit_blas_threads(): call before the first `import numpy` of an MPI rank
    cores.py      this process's cores at run time: BLAS on one thread for a block, one-core threads, side_by_side
                  (the row groups of a batch, the flash core's slices)
    comm.py       LocalComm / MPIComm collectives, make_comm(tp) -> ParallelComm(world, tp, dp), run_main, the
                  job-wide abort on an error or a signal
    mappings.py   copy_to_tp (f) / reduce_from_tp (g) as forward/backward pairs
    tensor.py     slicing tensors by a model's split axes (its param_specs), the vocabulary-parallel embedding
                  and cross-entropy
    data.py       data-parallel gradient averaging, the global gradient norm, ZeRO-1 AdamW

This package's __init__ imports nothing (so not NumPy): ``from npllm.parallel.threads import limit_blas_threads``
must be able to run before NumPy loads. Import the other modules by name. See docs/parallelism.md.
"""
