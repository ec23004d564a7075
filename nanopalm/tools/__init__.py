"""Tools beside the training core: the benchmarks (benchmarks.py, root bench.py's subcommands, and bench.py, their
machinery) and the ablation study (ablate.py, `python -m nanopalm.tools.ablate`). The core (model, trainer,
checkpoints, data) imports none of them; they import the core."""
