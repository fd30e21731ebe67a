"""Kernels shared by both op families: gates, pairwise products, chunk-state passes, gradients."""
