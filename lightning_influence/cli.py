"""The ``lightning-influence`` command line (also ``python -m lightning_influence``).

Subcommands:

- ``fit`` (and ``validate``, ``test``, ``predict``): :class:`InfluenceCLI`, a
  ``pytorch_lightning.cli.LightningCLI`` that accepts any LightningModule and DataModule by import
  path (``--model CLASS --data CLASS``, ``class_path``/``init_args``, ``--config``,
  ``--print_config``, a saved ``config.yaml``) and trains with a
  :class:`~lightning_influence.TrajectoryRecorder` (the one in the config, e.g. from a preset in
  ``callbacks/``, or a default one writing ``<log_dir>/influence_store``).
- ``analyze STORE``: rebuilds the model from the store, computes each query's proponents and
  opponents, self-influence and a summary, writes the TensorBoard views, ``topk.csv`` and
  ``self_influence.csv``.
- ``record --ckpt A.ckpt B.ckpt ...``: a gradient store post hoc from saved Lightning checkpoints
  (:func:`~lightning_influence.trajectory.posthoc.record_from_checkpoints`; an approximation of
  recording during training, exact for a constant learning rate).
"""

from __future__ import annotations

import csv
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import move_data_to_device, rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_influence.data.batches import batch_inputs, batch_labels, gather_samples, iterate_batches, num_samples
from lightning_influence.gradients.factored import EngineName
from lightning_influence.gradients.noise import NoiseStream, fixed_noise
from lightning_influence.reporting.influence import log_embedding, log_influence
from lightning_influence.trajectory.analysis import InfluenceAnalysis, InfluenceSummary
from lightning_influence.trajectory.posthoc import record_from_checkpoints
from lightning_influence.trajectory.recorder import TrajectoryRecorder
from lightning_influence.trajectory.store import GradientStore
from lightning_influence.trajectory.store.layout import CLI_CONFIG
from lightning_influence.utils.arguments import check_count

__all__ = ["InfluenceCLI", "analyze", "main", "record", "run"]

PROG = "lightning-influence"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The LightningCLI config saved next to a store recorded by ``lightning-influence fit`` (part of the store's layout).
STORE_CONFIG = CLI_CONFIG


class InfluenceCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/DataModule that trains with a ``TrajectoryRecorder``.

    A recorder configured in ``trainer.callbacks`` (e.g. ``--config callbacks/influence_recorder.yaml``)
    is used as is; without one, a default recorder (one exact checkpoint per epoch) writes
    ``<log_dir>/influence_store``. After ``fit`` the store's path and the command that analyses it
    are printed, and the run's config is saved into the store as ``lightning_config.yaml`` so
    ``lightning-influence analyze STORE`` can rebuild the model and data without flags.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        super().__init__(None, None, subclass_mode_model=True, subclass_mode_data=True, args=args, **kwargs)

    def recorders(self) -> list[TrajectoryRecorder]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, TrajectoryRecorder)]

    def before_fit(self) -> None:
        if self.recorders():
            return
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        recorder = TrajectoryRecorder(root / "influence_store")
        callbacks = self.trainer.callbacks
        first_checkpoint = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
        callbacks.insert(first_checkpoint, recorder)  # Lightning keeps checkpoint callbacks last
        rank_zero_info(f"{PROG}: no TrajectoryRecorder configured; recording to {recorder.store_path}")

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        parser = self._parser(self.subcommand)
        config = self.config.get(str(self.subcommand), self.config)
        for rec in self.recorders():
            store = Path(rec.store_path)
            if (store / "manifest.json").is_file():
                (store / STORE_CONFIG).write_text(parser.dump(config, skip_none=False))
                print(f"Gradient store: {store}\n  analyze it: {PROG} analyze {_shown(store)}")


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it: the command to copy stays short."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def _import(path: str, argname: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"`{argname}` must be an import path like 'package.module.Name', got {path!r}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`{argname}`: cannot import {path!r} ({err}).") from err


def _instantiate(spec: Any, argname: str) -> Any:
    """An object from a jsonargparse class_path/init_args node (or a plain class path string)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return _import(spec, argname)()
    if isinstance(spec, Namespace):
        spec = spec.as_dict()
    if isinstance(spec, dict) and "class_path" in spec:
        return _import(spec["class_path"], argname)(**dict(spec.get("init_args") or {}))
    return spec


_NO_DEFAULT = object()


def _init_defaults(cls: type) -> dict[str, Any]:
    # As the command line's parser fills them (it follows **kwargs into base classes, as a signature does not).
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init_args")
    return parser.get_defaults().as_dict()["init_args"]


def _set_init_args(spec: Any) -> Any:
    """A parsed ``--model`` without the init args the parser filled with the class's defaults.

    The parser fills every init arg, so only values other than the default can be told apart as set;
    :func:`rebuild_model` puts those on top of the store's hyperparameters.
    """
    if not (isinstance(spec, dict) and isinstance(spec.get("class_path"), str) and spec.get("init_args")):
        return spec
    defaults = _init_defaults(_import(spec["class_path"], "--model"))
    given = {k: v for k, v in dict(spec["init_args"]).items() if defaults.get(k, _NO_DEFAULT) != v}
    return {**spec, "init_args": given}


def _same_class(class_path: Any, extra: dict[str, Any]) -> bool:
    recorded = extra.get("model_class")
    if not isinstance(class_path, str) or not recorded:
        return False
    try:
        return _import(class_path, "--model") is _import(recorded, "the manifest's model_class")
    except (ImportError, ValueError, AttributeError):
        return False


def _store_config(store: GradientStore) -> dict[str, Any]:
    path = store.path / STORE_CONFIG
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def rebuild_model(store: GradientStore, model: Any = None) -> pl.LightningModule:
    """The store's model: ``model`` if given, else the manifest's ``model_class`` with its ``hparams``, else the
    config saved by ``lightning-influence fit``, else ``model_class`` with its defaults.

    A ``model`` of the recorded class starts from the store's ``hparams``; every one of its own ``init_args``
    overrides them (the command line passes only the values that differ from the class's defaults, see
    :func:`run`).
    """
    if isinstance(model, torch.nn.Module):
        return model
    extra = store.manifest.get("extra", {})
    if model is not None:
        spec = model.as_dict() if isinstance(model, Namespace) else model
        spec = {"class_path": spec} if isinstance(spec, str) else spec
        if isinstance(spec, dict) and extra.get("hparams") and _same_class(spec.get("class_path"), extra):
            # The recorded class: the store's hyperparameters, with the given init args on top (the class's
            # defaults would silently score another model: another likelihood, another width).
            spec = {**spec, "init_args": {**extra["hparams"], **dict(spec.get("init_args") or {})}}
        return _instantiate(spec, "--model")
    if extra.get("model_class") and extra.get("hparams") is not None:
        return _import(extra["model_class"], "the manifest's model_class")(**extra["hparams"])
    saved = _store_config(store).get("model")
    if saved:
        return _instantiate(saved, f"model in {store.path / STORE_CONFIG}")
    if extra.get("model_class"):  # no save_hyperparameters(): the class's defaults
        return _import(extra["model_class"], "the manifest's model_class")()
    raise ValueError(
        f"Cannot rebuild the model of the store at {str(store.path)!r}: its manifest has no `model_class` and there"
        f" is no {STORE_CONFIG}. Pass --model CLASS (with --model.init_args.* as needed)."
    )


def rebuild_data(store: GradientStore, data: Any = None) -> pl.LightningDataModule:
    """The DataModule: ``data`` if given, else the one in the store's saved config."""
    if isinstance(data, pl.LightningDataModule):
        return data
    if data is not None:
        return _instantiate(data, "--data")
    saved = _store_config(store).get("data")
    if saved:
        return _instantiate(saved, f"data in {store.path / STORE_CONFIG}")
    raise ValueError(
        f"The store at {str(store.path)!r} does not say which data it was recorded on; pass --data CLASS"
        " (e.g. --data lightning_influence.data.DigitsDataModule)."
    )


def _split(dm: pl.LightningDataModule, stage: str) -> Any:
    dm.setup(stage)
    loader = {"fit": dm.train_dataloader, "test": dm.test_dataloader, "validate": dm.val_dataloader}[stage]()
    return loader.dataset if isinstance(loader, DataLoader) else loader


def _queries(dm: pl.LightningDataModule, split: str, n: int) -> Any:
    stage = {"test": "test", "val": "validate", "train": "fit"}[split]
    try:
        data = _split(dm, stage)
    except NotImplementedError as err:
        raise ValueError(
            f"--split {split}: {type(dm).__name__} has no {split} dataloader; choose another --split."
        ) from err
    return Subset(data, range(min(n, num_samples(data, f"{split} set"))))


def _labels_of(data: Any) -> list[int] | None:
    try:
        y = batch_labels(gather_samples(data, list(range(num_samples(data)))))
    except ValueError:
        return None
    return [int(v) for v in y] if isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() else None


def per_sample_losses(model: pl.LightningModule, store: GradientStore, data: Any, batch_size: int) -> Tensor:
    """Per-sample training loss of every recorded sample at the store's last checkpoint's weights."""
    model.load_state_dict(store.checkpoints[-1].state(), strict=False)
    model.eval()
    out = []
    with torch.no_grad():
        for ids, batch in iterate_batches(data, batch_size, name="train_data"):
            # The ELBO's noise keyed by sample, as in the recorded rows: the same losses on every run.
            with fixed_noise(ids.to(model.device), store.noise_seed, NoiseStream.TRAIN):
                loss = model.per_sample_loss(move_data_to_device(batch, model.device))
            out.append(loss.detach().float().cpu())
    return torch.cat(out)


def encoder_means(model: pl.LightningModule, data: Any, batch_size: int) -> Tensor | None:
    """Posterior means ``encode(x)[0]`` of every sample (``None`` for a model without ``encode``)."""
    if not callable(getattr(model, "encode", None)):
        return None
    out = []
    with torch.no_grad():
        for _, batch in iterate_batches(data, batch_size, name="train_data"):
            encoded = model.encode(move_data_to_device(batch_inputs(batch), model.device))
            out.append((encoded[0] if isinstance(encoded, (tuple, list)) else encoded).flatten(1).float().cpu())
    return torch.cat(out)


def write_csvs(
    outdir: Path,
    summary: InfluenceSummary,
    losses: Tensor | None,
    train_labels: list[int] | None,
    query_labels: list[int] | None,
) -> tuple[Path, Path]:
    """``topk.csv`` (one row per query, kind and rank) and ``self_influence.csv`` (one row per training sample)."""
    outdir.mkdir(parents=True, exist_ok=True)
    topk, selfinf = outdir / "topk.csv", outdir / "self_influence.csv"
    with open(topk, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "query_label", "kind", "rank", "train_index", "train_label", "score"])
        for kind, top in (("proponent", summary.proponents), ("opponent", summary.opponents)):
            for q in range(top.indices.shape[0]):
                for r, (i, s) in enumerate(zip(top.indices[q].tolist(), top.scores[q].tolist())):
                    if i < 0:
                        continue
                    ql = query_labels[q] if query_labels else ""
                    tl = train_labels[i] if train_labels else ""
                    w.writerow([q, ql, kind, r + 1, i, tl, f"{s:.8g}"])
    order = torch.argsort(torch.nan_to_num(summary.self_influence, nan=float("-inf")), descending=True).tolist()
    with open(selfinf, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_index", "label", "self_influence", "loss", "rank"])
        for rank, i in enumerate(order):
            label = train_labels[i] if train_labels else ""
            loss = f"{float(losses[i]):.8g}" if losses is not None else ""
            w.writerow([i, label, f"{float(summary.self_influence[i]):.8g}", loss, rank + 1])
    return topk, selfinf


def analyze(
    store: str,
    model: Any = None,
    data: Any = None,
    k: int = 8,
    queries: int = 8,
    split: Literal["test", "val", "train"] = "test",
    logdir: Optional[str] = None,
    measurement: Optional[Callable] = None,
    n_self: int = 16,
    unbiased: bool = False,
    embedding: bool = True,
    batch_size: int = 256,
    engine: EngineName = "auto",
    device: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Explain a gradient store: proponents/opponents of ``queries`` test samples, self-influence, views, CSVs.

    Args:
        store: the gradient store directory.
        model: the LightningModule (class_path/init_args); default: from the store. The recorded class keeps the
            store's hyperparameters; init args other than the class's defaults change them.
        data: the DataModule (class_path/init_args); default: from the store's saved config.
        k: proponents and opponents per query.
        queries: how many samples of the split to explain (its first ones).
        split: where the queries come from.
        logdir: where the TensorBoard views and CSVs go (default: ``<store>_analysis``).
        measurement: optional ``fn(module, batch) -> Tensor[B]`` (import path) asked of each query
            instead of the training loss (cross-loss TracIn).
        n_self: training samples in the self-influence gallery.
        unbiased: the unbiased self-influence (an independent noise draw per checkpoint).
        embedding: also write TensorBoard's embedding projector (training samples at the encoder's
            posterior means, coloured by self-influence), for models with ``encode(x) -> (mu, ...)``.
        batch_size: samples per gradient batch.
        engine: the per-sample gradient engine of the queries (``auto``: factored where layers have rules,
            the loop engine wherever the recording used it; any engine gives the same rows).
        device: where to compute (default: CPU).
        progress: progress bars over checkpoints.

    Returns:
        Paths of ``logdir``, ``topk.csv`` and ``self_influence.csv``.
    """
    for name, value in (("--k", k), ("--queries", queries), ("--n_self", n_self)):
        check_count(name, value)
    gs = GradientStore(store)
    if k > gs.n_samples:
        raise ValueError(f"--k {k} exceeds the {gs.n_samples} training samples of the store at {store!r}.")
    net = rebuild_model(gs, model)
    dm = rebuild_data(gs, data)
    train = _split(dm, "fit")
    if num_samples(train, "train_data") != gs.n_samples:
        raise ValueError(
            f"--data {type(dm).__name__}'s training set has {num_samples(train)} samples but the store at {store!r}"
            f" recorded {gs.n_samples}; pass the --data (and init_args) the store was recorded with."
        )
    if device is not None:
        net.to(device)
    test = _queries(dm, split, queries)
    analysis = InfluenceAnalysis(gs, net, train_data=train, batch_size=batch_size, engine=engine, progress=progress)
    summary = analysis.summary(test, k=k, measurement=measurement, unbiased=unbiased)
    losses = per_sample_losses(net, gs, train, batch_size)
    out = Path(logdir) if logdir else gs.path.with_name(gs.path.name + "_analysis")
    logger = TensorBoardLogger(str(out), name="", version="")
    step = gs.checkpoints[-1].step
    log_influence(logger, summary, test, train_data=train, losses=losses, n_self=n_self, step=step)
    features = encoder_means(net, train, batch_size) if embedding else None
    if features is not None:
        log_embedding(logger, features, summary.self_influence, train_data=train, step=step)
    logger.experiment.close()
    topk, selfinf = write_csvs(out, summary, losses, _labels_of(train), _labels_of(test))
    print(f"{gs}\nExplained {len(test)} {split} samples (k={k}).")
    print(f"  proponents/opponents: {topk}\n  self-influence:       {selfinf}")
    print(f"  TensorBoard views:    {out}\n  view them: tensorboard --logdir {out}")
    return {"logdir": out, "topk": topk, "self_influence": selfinf}


def record(
    ckpt: list[str],
    model: str,
    data: Any,
    dirpath: str = "runs/influence_posthoc",
    params: Optional[list[str]] = None,
    projection_dim: Optional[int] = None,
    projection_kind: Literal["sjlt", "rademacher", "gaussian", "kronecker"] = "sjlt",
    grad_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    engine: EngineName = "auto",
    factored_storage: bool = False,
    steps_per_epoch: Optional[int] = None,
    accumulate_grad_batches: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> GradientStore:
    """Build a gradient store post hoc from Lightning checkpoints (see ``record_from_checkpoints``).

    Args:
        ckpt: the Lightning ``.ckpt`` files of one run (with optimizer state).
        model: the LightningModule class (import path); its hyperparameters come from the checkpoint.
        data: the DataModule the run trained on (class_path/init_args).
        dirpath: the new store's directory.
        params: parameter names or module prefixes to track (default: all trainable).
        projection_dim: random projection width (default: exact gradients).
        projection_kind: the projection (``kronecker``: per layer, from the factored engine's factors).
        grad_dtype: storage dtype.
        engine: the per-sample gradient engine (``auto``: factored where layers have rules, else vmap;
            ``loop`` for layers vmap cannot batch, such as GRU).
        factored_storage: store exact gradients of large layers as their factors (exact rows only).
        steps_per_epoch: optimizer steps per epoch (default: from the training DataLoader).
        accumulate_grad_batches: the run's gradient accumulation.
        batch_size: samples per gradient batch.
        seed: projection and noise seed.
        overwrite: replace an existing store.
    """
    cls = _import(model, "--model")
    dm = _instantiate(data, "--data")
    gs = record_from_checkpoints(
        ckpt,
        dirpath,
        cls,
        dm,
        params=params,
        projection_dim=projection_dim,
        projection_kind=projection_kind,
        grad_dtype=grad_dtype,
        engine=engine,
        factored_storage=factored_storage,
        steps_per_epoch=steps_per_epoch,
        accumulate_grad_batches=accumulate_grad_batches,
        batch_size=batch_size,
        seed=seed,
        overwrite=overwrite,
    )
    (gs.path / STORE_CONFIG).write_text(yaml.safe_dump({"data": data.as_dict() if hasattr(data, "as_dict") else data}))
    print(f"{gs}\n  analyze it: {PROG} analyze {_shown(gs.path)}")
    return gs


def build_parser() -> ArgumentParser:
    """The top-level parser: ``analyze`` and ``record``, and the LightningCLI subcommands (listed for ``--help``)."""
    parser = ArgumentParser(
        prog=PROG,
        description="Training-data influence for PyTorch Lightning: record, analyze, view in TensorBoard.",
    )
    subcommands = parser.add_subcommands(dest="subcommand")
    for name in LIGHTNING_SUBCOMMANDS:
        sub = ArgumentParser(
            description=f"LightningCLI {name} with the TrajectoryRecorder (--model CLASS --data CLASS --config"
            f" FILE --trainer.*); `{PROG} {name} --help` lists every option."
        )
        subcommands.add_subcommand(
            name,
            sub,
            help=f"LightningCLI `{name}` (trains with the recorder)" if name == "fit" else f"LightningCLI `{name}`",
        )
    an = ArgumentParser(prog=f"{PROG} analyze", description=analyze.__doc__.splitlines()[0])
    an.add_argument("--config", action=ActionConfigFile)
    an.add_argument("store", type=str, help="the gradient store directory")
    an.add_argument(
        "--model",
        type=Optional[pl.LightningModule],
        default=None,
        help="the LightningModule (CLASS, --model.init_args.*); default: from the store",
    )
    an.add_argument(
        "--data",
        type=Optional[pl.LightningDataModule],
        default=None,
        help="the DataModule (CLASS, --data.init_args.*); default: from the store's saved config",
    )
    an.add_function_arguments(analyze, skip={"store", "model", "data"})
    subcommands.add_subcommand("analyze", an, help="explain a gradient store: proponents, self-influence, views")
    rec = ArgumentParser(prog=f"{PROG} record", description=record.__doc__.splitlines()[0])
    rec.add_argument("--config", action=ActionConfigFile)
    rec.add_argument("--ckpt", type=str, nargs="+", required=True, help="the Lightning .ckpt files of one run")
    rec.add_argument(
        "--model",
        type=str,
        required=True,
        help="the LightningModule class (import path); hyperparameters come from the checkpoint",
    )
    rec.add_argument(
        "--data",
        type=pl.LightningDataModule,
        required=True,
        help="the DataModule the run trained on (CLASS, --data.init_args.*)",
    )
    rec.add_function_arguments(record, skip={"ckpt", "model", "data"})
    subcommands.add_subcommand("record", rec, help="build a gradient store post hoc from Lightning checkpoints")
    return parser


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one command; returns what it produced (the ``LightningCLI``, ``analyze``'s paths, the store)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        return InfluenceCLI(args=None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    parser = build_parser()
    cfg = parser.parse_args(args)
    name = cfg.subcommand
    if name is None:
        parser.print_help()
        return None
    sub = cfg[name].as_dict()
    sub.pop("config", None)
    sub.pop("__path__", None)
    if name == "analyze":
        sub["model"] = _set_init_args(sub.get("model"))
        measurement = sub.pop("measurement", None)
        if isinstance(measurement, str):
            measurement = _import(measurement, "--measurement")
        return analyze(measurement=measurement, **sub)
    return record(**sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-influence`` and ``python -m lightning_influence``: exit status 0 on success.

    The console script calls ``sys.exit(main())``, so ``main`` returns a status, not the command's result
    (a result object would be printed and turned into exit status 1); use :func:`run` for the result.
    """
    run(argv)
    return 0
