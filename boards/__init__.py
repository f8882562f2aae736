"""llmfab.boards: board facts (YAML per card) and accelerator configurations."""
