"""Sub-commands of the medfed CLI, one module per command group."""
