"""Tools beside the training core: the benchmarks' machinery (bench.py, behind the root bench.py) and the ablation
study (ablate.py, `python -m nanopalm.tools.ablate`). The core (model, trainer, checkpoints, data) imports none
of them; they import the core."""
