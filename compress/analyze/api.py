"""analyze(): run one registered sensitivity method on a loaded model."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..errors import CompressError
from ..models import LoadedModel
from .base import Sensitivity, build_units, get_analyzer, make_config
from .calib import METRICS, Calibration


def analyze(loaded: LoadedModel, method: str, texts: list[str] | torch.Tensor, **config_overrides) -> Sensitivity:
    """Sensitivity of every unit of ``loaded`` by ``method`` on calibration ``texts``.

    texts: calibration texts, or for a causal LM an int64 tensor (n, T) of token windows.
    config_overrides: fields of the method's config (compress.analyze.REGISTRY[method][0]), e.g.
    samples=64, granularity="module", sparsity=0.5. The model is left bit-identical.
    A StreamedModel (compress.analyze.streamed.load_streamed) is analyzed block by block with its
    weights read from the checkpoint (the same scores, in bounded memory).
    """
    from .streamed import StreamedModel

    config = make_config(method, **config_overrides)
    _, fn = get_analyzer(method)
    if loaded.kind not in METRICS:
        raise CompressError(f"sensitivity analysis of {loaded.kind} models is not supported yet "
                            f"(supported: {', '.join(METRICS)})")
    model = loaded.model
    units = build_units(model, config.granularity, config.exclude, config.include_heads, config.include_embeddings)
    t0, c0 = time.perf_counter(), time.process_time()
    streamed = isinstance(loaded, StreamedModel)
    calib = Calibration(loaded, texts, config, units.blocks, device=loaded.device if streamed else None)
    was_training = model.training
    model.eval()
    try:
        if streamed:
            from .streamed_methods import run_streamed

            scores, damage, extra = run_streamed(method, loaded, units, calib, config)
        else:
            scores, damage, extra = fn(model, units, calib, config)
    finally:
        model.train(was_training)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    provenance = {
        "samples": calib.n_samples, "seq_len": calib.seq_len, "seed": config.seed, "seconds": seconds,
        "cpu_seconds": cpu_seconds, "model": str(loaded.path), "metric": calib.metric_name,
        "reference_metric": calib.base,
        "device": str(calib.device), "blocks": units.blocks.name if units.blocks else None,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        **extra,
    }
    return Sensitivity(method, config.granularity, {u: list(n) for u, n in units.units.items()},
                       units.params(), scores, damage, provenance)
