"""lsp.launch: entry points started by torchrun or mpirun (training, benchmarks)."""
