"""Hydra configuration groups of lsp (installed as ``lsp.configs`` so that ``lsp-train`` finds
them after a plain ``pip install``): model/, parallel/, data/, train/, experiment/."""
