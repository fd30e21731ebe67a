"""lsp.parallel: sequence, tensor and expert parallelism for lsp (DESIGN.md §1, §4)."""
