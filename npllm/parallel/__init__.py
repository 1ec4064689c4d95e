"""Parallel training under mpirun: data parallel, ZeRO-1 optimizer sharding, Megatron tensor parallel.

    threads.py    limit_blas_threads(): call before the first `import numpy` of an MPI rank
    comm.py       LocalComm / MPIComm collectives, make_comm(tp) -> ParallelComm(world, tp, dp), run_main
    mappings.py   copy_to_tp / reduce_from_tp / gather_from_tp / scatter_to_tp as forward/backward pairs
    tensor.py     which weight splits along which axis; column/row-parallel blocks, vocabulary-parallel
                  embedding and cross-entropy
    data.py       data-parallel gradient averaging, the global gradient norm, ZeRO-1 AdamW

This package's __init__ imports nothing (so not NumPy): ``from npllm.parallel.threads import limit_blas_threads``
must be able to run before NumPy loads. Import the other modules by name. See docs/parallelism.md.
"""
